"""The behaviour job: data → EDA report (→ features → models → evaluation as they land).

One function, ``run(config)``, that ``jobs/behaviour.py``, ``engagesim
pipeline behaviour`` and tests all call, so the cluster job and the local
demo are the same code.
"""

from __future__ import annotations

from typing import Any, Callable

from engagesim import io
from engagesim.config import AppConfig
from engagesim.loaders import ingest
from engagesim.pipeline.run import Run, Timer
from engagesim.report import eda


def data_stage(run: Run) -> dict[str, str]:
    """Produce the posts (and, for synth, users and interactions) datasets of this run."""
    cfg = run.config
    if cfg.data.source == "synth":
        from engagesim.synth import generate

        summary = generate(cfg.synth, run.path("data"), cfg.storage, ray_config=cfg.ray)
        run.metrics("oracle", summary["oracle"])
        return summary["datasets"]
    sources = io.expand_paths(cfg.data.paths)
    run.add_inputs(sources)
    if cfg.data.source == "recsys":
        from engagesim.loaders.recsys_ingest import ingest_recsys

        summary = ingest_recsys(sources, run.path("data"), cfg, cfg.ingest.tokenizer)
        run.metrics("ingest", {k: summary[k] for k in ("read", "written", "rejected", "posts", "users")})
        return {k: v for k, v in summary["datasets"].items() if k in ("users", "posts", "interactions")}
    fmt = "adobe" if cfg.data.source == "adobe" else "parquet"
    summary = ingest(sources, fmt, run.path("data", "posts"), cfg)
    run.metrics("ingest", {"read": summary.read, "written": summary.written, "rejected": summary.rejected})
    return {"posts": summary.out, "rejects": summary.rejects}


def run(config: AppConfig, run_id: str | None = None, log: Callable[[str], None] = print) -> Run:
    """data → EDA → features → models → evaluation, each stage recorded in the run manifest."""
    from engagesim.models.progress import training_progress
    from engagesim.pipeline.evaluate import evaluate
    from engagesim.pipeline.features import run_features
    from engagesim.pipeline.train import train_impression_level, train_post_level
    from engagesim.report import behaviour_report

    if config.data.source != "synth":  # a missing input is found before a run directory is made or Ray starts
        from engagesim.loaders.route import check_sources

        check_sources(config.data.paths, config.storage)
    with Run.open(config, "behaviour", run_id, log) as job:
        with Timer() as t:
            datasets = data_stage(job)
        job.stage("data", datasets, t.seconds)
        log(f"data ({t.seconds:.1f}s): {', '.join(datasets)}")

        with Timer() as t:
            summary: dict[str, Any] = eda(datasets["posts"], job.path("reports", "eda"), config.storage,
                                          config.report.top_accounts, config.report.min_account_posts)
        job.stage("eda", {"report": summary["out"]}, t.seconds)
        log(f"eda report ({t.seconds:.1f}s): {summary['out']}")

        with Timer() as t:
            interactions = datasets.get("interactions") if config.train.impression_level else None
            feats = run_features(config, datasets["posts"], job.path("features"), datasets.get("users"),
                                 interactions, log=lambda m: log(f"  {m}"))
        job.stage("features", {"posts": job.path("features", "posts"),
                               **({"impressions": job.path("features", "impressions")} if "impressions" in feats else {}),
                               "manifest": job.path("features", "features.json")}, t.seconds)
        log(f"features ({t.seconds:.1f}s)")

        models_dir = job.path("models")
        with training_progress(lambda m: log(f"    {m}")):  # rounds / epochs of every Ray Train fit
            with Timer() as t:
                post = train_post_level(config, job.path("features", "posts"), models_dir, datasets.get("truth/posts"),
                                        log=lambda m: log(f"  {m}"))
            job.metrics("valid", {"post_level": post})
            job.stage("train_post_level", {"models": job.path("models", "post")}, t.seconds)
            log(f"post-level models ({t.seconds:.1f}s)")
            if "impressions" in feats:
                with Timer() as t:
                    impression = train_impression_level(config, job.path("features", "impressions"), models_dir,
                                                        datasets.get("truth/interactions"), log=lambda m: log(f"  {m}"))
                job.metrics("valid", {"post_level": post, "impression_level": impression})
                job.stage("train_impression_level", {"models": job.path("models", "impression")}, t.seconds)
                log(f"impression-level models ({t.seconds:.1f}s)")
        with Timer() as t:
            evaluation = evaluate(job.uri, config.storage)
        job.metrics("test", {k: v for k, v in evaluation.items() if k != "report"})
        job.stage("evaluate", {"predictions": job.path("predictions"), "report": evaluation["report"]}, t.seconds)
        log(f"evaluation ({t.seconds:.1f}s): {evaluation['report']}")
        with Timer() as t:
            report = behaviour_report(job.manifest["metrics"], job.path("reports", "behaviour"))
        job.stage("report", {"report": report}, t.seconds)
    return job
