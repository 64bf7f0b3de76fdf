"""The behaviour job: data → EDA report (→ features → models → evaluation as they land).

One function, ``run(config)``, that ``jobs/behaviour.py``, ``engagesim
pipeline behaviour`` and tests all call, so the cluster job and the local
demo are the same code.
"""

from __future__ import annotations

import glob
from typing import Any, Callable

from engagesim.config import AppConfig
from engagesim.loaders import ingest
from engagesim.pipeline.run import Run, Timer
from engagesim.report import eda


def _expand(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        out.extend(sorted(glob.glob(p)) if not p.startswith("s3://") and any(c in p for c in "*?[") else [p])
    return out


def data_stage(run: Run) -> dict[str, str]:
    """Produce the posts (and, for synth, users and interactions) datasets of this run."""
    cfg = run.config
    if cfg.data.source == "synth":
        from engagesim.synth import generate

        summary = generate(cfg.synth, run.path("data"), cfg.storage, ray_config=cfg.ray)
        run.metrics("oracle", summary["oracle"])
        return summary["datasets"]
    sources = _expand(cfg.data.paths)
    if not sources:
        raise ValueError(f"data.paths: no input files for data.source={cfg.data.source!r}")
    run.add_inputs(sources)
    fmt = "adobe" if cfg.data.source == "adobe" else "parquet"
    summary = ingest(sources, fmt, run.path("data", "posts"), cfg)
    run.metrics("ingest", {"read": summary.read, "written": summary.written, "rejected": summary.rejected})
    return {"posts": summary.out, "rejects": summary.rejects}


def run(config: AppConfig, run_id: str | None = None, log: Callable[[str], None] = print) -> Run:
    job = Run.create(config, "behaviour", run_id)
    log(f"run directory: {job.uri}")
    try:
        with Timer() as t:
            datasets = data_stage(job)
        job.stage("data", datasets, t.seconds)
        log(f"data: {datasets} ({t.seconds:.1f}s)")
        with Timer() as t:
            summary: dict[str, Any] = eda(datasets["posts"], job.path("reports", "eda"), config.storage,
                                          config.report.top_accounts)
        job.stage("eda", {"report": summary["out"]}, t.seconds)
        log(f"eda report: {summary['out']} ({t.seconds:.1f}s)")
    except BaseException:
        job.finish("failed")
        raise
    job.finish()
    return job
