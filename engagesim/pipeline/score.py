"""Offline scoring: (run, input dataset URI) → predictions dataset + rejects, with Ray Data.

An actor pool holds the run's models and feature state (loaded once per
actor, GPU when configured); blocks stream through it. Rows that fail the
contract go to ``<out>/_rejects`` with the reason, and the counts are checked:
read = scored + rejected.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from engagesim import datasets, io
from engagesim.features.state import Snapshot
from engagesim.models.bundle import Members
from engagesim.runs import load_run
from engagesim.runtime import ensure_ray
from engagesim.schema import make_rejects, validate

Kind = Literal["posts", "interactions"]


class ScoringActor:
    """One actor: the loaded run, scoring contract rows of one kind."""

    def __init__(self, run_uri: str, kind: Kind, rejects_uri: str, token: str, posts_uri: str | None = None,
                 snapshot: Snapshot = "latest", members: Members = "all"):
        self.run = load_run(run_uri, snapshot=snapshot)
        self.members = members
        self.kind, self.rejects_uri = kind, rejects_uri
        self.posts = io.read_table(posts_uri, self.run.storage) if posts_uri else None
        self.prefix = f"part-{token}-{uuid.uuid4().hex[:8]}"
        self.parts = 0

    def _reject(self, rejects: pa.Table) -> None:
        io.write_named_part(self.rejects_uri, f"{self.prefix}-{self.parts:05d}.parquet", rejects, "rejects",
                            self.run.storage)
        self.parts += 1

    def __call__(self, batch: pa.Table) -> pa.Table:
        good, bad = validate(batch, self.kind, "score", max_text_chars=self.run.config.ingest.max_text_chars)
        if bad.num_rows:
            self._reject(bad)
        try:
            return self.run.predict(good, posts=self.posts, members=self.members)
        except ValueError as exc:  # e.g. impressions of posts the run never saw, and no --posts given
            self._reject(make_rejects("score", list(range(good.num_rows)), [str(exc)[:200]] * good.num_rows,
                                      [json.dumps(r, default=str) for r in good.to_pylist()]))
            return self.run.predict(good.slice(0, 0), posts=self.posts, members=self.members)


def score(run_uri: str, in_uri: str, out_uri: str, kind: Kind | None = None, posts_uri: str | None = None,
          actors: int = 1, batch_size: int = 4096, storage=None, ray_config=None,
          snapshot: Snapshot = "latest", members: Members = "all") -> dict[str, Any]:
    """Score every row of ``in_uri`` (a posts or interactions dataset) with the run's served ensemble
    (``snapshot``: see ``load_run``; "cutoff" reproduces the run's own evaluation; ``members``: "all" adds a column
    per member the run kept, "served" only those the ensemble reads — the others cost as much to compute)."""
    import ray

    run = load_run(run_uri, storage)  # the run and the input are checked before Ray starts
    storage = storage or run.config.storage
    files = io.dataset_files(in_uri, storage)
    fs, _ = io.filesystem(in_uri, storage)
    ensure_ray(ray_config)
    if kind is None:
        kind = "interactions" if "impression_at" in pq.read_schema(files[0], filesystem=fs).names else "posts"
    started = time.perf_counter()
    ds = ray.data.read_parquet(files, filesystem=fs)
    # The committed count from the input's manifest, not ``ds.count()``: that ran the read once more before
    # scoring began, ~3 s of a cold start (Ray Data's first execution) in front of the actor's own start.
    read = io.read_manifest(in_uri, storage)["rows"]
    rejects_uri = io.join(out_uri, io.REJECTS_DIR)
    token = uuid.uuid4().hex[:12]
    scored = ds.map_batches(
        ScoringActor, fn_constructor_kwargs={"run_uri": run_uri, "kind": kind, "rejects_uri": rejects_uri, "token": token,
                                       "posts_uri": posts_uri, "snapshot": snapshot, "members": members},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size, batch_format="pyarrow",
        num_gpus=run.config.embed.gpus_per_actor or None, num_cpus=1)
    written = datasets.write_streaming(scored, io.join(out_uri, "predictions"), f"{kind}_predictions", storage,
                                       {"run": run_uri})
    rejected = _commit_rejects(rejects_uri, token, storage)
    seconds = time.perf_counter() - started
    if read != written + rejected:
        raise RuntimeError(f"row count check failed: read {read} != scored {written} + rejected {rejected}")
    return {"read": read, "scored": written, "rejected": rejected, "seconds": round(seconds, 2),
            "rows_per_s": round(read / seconds, 1), "out": io.join(out_uri, "predictions"), "rejects": rejects_uri,
            "kind": kind}


def _commit_rejects(uri: str, token: str, storage) -> int:
    """Publish the reject parts this scoring run's actors wrote (by token), nothing older."""
    writer = io.DatasetWriter(uri, "rejects", storage)
    writer.adopt_parts(f"part-{token}-")
    writer.commit()
    return writer.rows
