"""A run directory: where every artifact of one job lives, with its manifest.

``runs/<run_id>/manifest.json`` records the config, the code version, input
fingerprints, each stage's outputs and the metrics, so a result can always be
traced back to what produced it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from engagesim import __version__
from engagesim.config import AppConfig
from engagesim.io import filesystem, join, write_json

REPO = Path(__file__).resolve().parents[2]


def code_version() -> dict[str, Any]:
    """Package version plus the git commit (and whether the tree was dirty) when run from a checkout."""
    info: dict[str, Any] = {"package": __version__}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                   capture_output=True, text=True, timeout=5)
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def fingerprint(uri: str, storage=None) -> dict[str, Any]:
    """Size and modification time of an input (content hash for small local files): enough to notice a change."""
    fs, path = filesystem(uri, storage)
    info = fs.get_file_info(path)
    out: dict[str, Any] = {"uri": uri, "size": info.size, "mtime": str(info.mtime) if info.mtime else None}
    if info.size is not None and info.size < 64 << 20 and not uri.startswith("s3://"):
        out["sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def new_run_id(prefix: str) -> str:
    return f"{prefix}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


@dataclass
class Run:
    """One job's run directory and manifest, updated as stages finish."""

    uri: str
    config: AppConfig
    job: str
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, config: AppConfig, job: str, run_id: str | None = None) -> Run:
        from engagesim.models.family import check_models

        check_models(config)  # before anything is written
        uri = join(config.output_root, run_id or new_run_id(job))
        run = cls(uri, config, job)
        run.manifest = {
            "job": job,
            "run_id": uri.rstrip("/").rsplit("/", 1)[-1],
            "started_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "config": config.model_dump(mode="json"),
            "code": code_version(),
            "inputs": [],
            "stages": {},
            "metrics": {},
            "status": "running",
        }
        run.save()
        return run

    @classmethod
    @contextlib.contextmanager
    def open(cls, config: AppConfig, job: str, run_id: str | None = None,
             log: Callable[[str], None] = print) -> Iterator[Run]:
        """A new run with Ray started; marked ``failed`` if the block raises (even on Ctrl-C), else ``succeeded``,
        so a manifest never stays ``running`` after its job has ended."""
        from engagesim.runtime import ensure_ray

        run = cls.create(config, job, run_id)
        log(f"run directory: {run.uri}")
        try:
            ensure_ray(config.ray)
            yield run
        except BaseException as exc:
            # The manifest says why, so a failed run directory explains itself without the terminal.
            run.manifest["error"] = {"type": type(exc).__name__, "message": str(exc)[:2000]}
            run.finish("failed")
            raise
        run.finish()

    def path(self, *parts: str) -> str:
        return join(self.uri, *parts)

    def add_inputs(self, uris: list[str]) -> None:
        self.manifest["inputs"].extend(fingerprint(u, self.config.storage) for u in uris)
        self.save()

    def stage(self, name: str, outputs: dict[str, Any], seconds: float, **extra: Any) -> None:
        from engagesim.runtime import release_freed_memory

        self.manifest["stages"][name] = {"outputs": outputs, "seconds": round(seconds, 2), **extra}
        self.save()
        release_freed_memory()  # before the next stage starts: its peak should not carry this one's freed pages

    def metrics(self, name: str, values: dict[str, Any]) -> None:
        self.manifest["metrics"][name] = values
        self.save()

    def finish(self, status: str = "succeeded") -> None:
        self.manifest["status"] = status
        self.manifest["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
        self.save()

    def save(self) -> None:
        write_json(self.path("manifest.json"), self.manifest, self.config.storage)


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
