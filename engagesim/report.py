"""Reports a person looks at: the EDA of a posts dataset (PNG plots + index.html).

The EDA is the analysis the Adobe paper opens with: how heavy the likes tail
is, the weekday/hour rhythm, which accounts dominate, what media is attached.
"""

from __future__ import annotations

import html
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from engagesim.config import StorageConfig  # noqa: E402
from engagesim.io import is_s3, join, read_table, write_bytes  # noqa: E402

WEEKDAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
# What each figure shows, under it in index.html (file names told a reader nothing).
CAPTIONS = {
    "likes_distribution.png": "How heavy the tail is: posts per likes bucket, both on log scales.",
    "likes_by_weekday_hour.png": "When posts do better: median log1p(likes) by weekday and by hour of posting (UTC).",
    "top_accounts.png": "Who dominates: the accounts with the most posts, and those with the highest median likes "
                        "among accounts with enough posts for a median to mean something.",
    "media_kinds.png": "What is attached: media items by kind, and posts without any.",
}


def log_axis(axis, decades: float = 3.0) -> None:
    """Plain numbers on a log axis (1, 10, 100, 1,000; also 2 and 5 × 10ᵏ where the values span under two
    decades, or one label would be all there is), no minor labels: matplotlib's default labelled minor ticks
    too, and they overlapped."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades < 2 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def value_axis(ax, values: np.ndarray) -> None:
    """The x axis of a bar chart of counts: log scale where the values span 20× or more (a few accounts with
    huge medians would flatten the rest), linear with thousands separators where they do not (a log axis
    inside one decade has no decade to label)."""
    from matplotlib.ticker import FuncFormatter

    values = np.asarray(values, float)
    if len(values) and values.max() >= 20 * max(values.min(), 1.0):
        ax.set_xscale("log")
        log_axis(ax.xaxis, float(np.log10(values.max() / max(values.min(), 1.0))))
    else:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))


def figures_html(plots: list[str], captions: dict[str, str]) -> str:
    return "".join(f'<figure><img src="{p}" alt="{html.escape(captions.get(p, p))}"><figcaption>'
                   f"{html.escape(captions.get(p, p))}</figcaption></figure>" for p in plots)


def _posts_frame(posts_uri: str, storage: StorageConfig | None) -> pl.DataFrame:
    table = read_table(posts_uri, storage, columns=["post_id", "username", "created_at", "likes", "media"])
    return pl.from_arrow(table).with_columns(
        pl.col("likes").cast(pl.Float64).log1p().alias("log_likes"),
        pl.col("created_at").dt.weekday().alias("weekday"),  # 1 = Monday
        pl.col("created_at").dt.hour().alias("hour"),
    )


def save_figure(fig: plt.Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _likes_distribution(df: pl.DataFrame, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    likes = df["likes"].drop_nulls().to_numpy()
    bins = np.logspace(0, np.log10(max(likes.max(), 10) + 1), 40)
    ax.hist(likes + 1, bins=bins, color="#4477aa")
    ax.set_xscale("log")
    log_axis(ax.xaxis)
    ax.set_xlabel("likes + 1 (log scale)")
    ax.set_ylabel("posts")
    ax.set_title("Likes per post")
    return save_figure(fig, out / "likes_distribution.png")


def _rhythm(df: pl.DataFrame, out: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    by_day = df.group_by("weekday").agg(pl.col("log_likes").median(), pl.len().alias("posts")).sort("weekday")
    by_hour = df.group_by("hour").agg(pl.col("log_likes").median(), pl.len().alias("posts")).sort("hour")
    axes[0].bar([WEEKDAYS[d - 1] for d in by_day["weekday"]], by_day["log_likes"], color="#66ccee")
    axes[0].set_title("Median log1p(likes) by weekday (UTC)")
    axes[1].plot(by_hour["hour"], by_hour["log_likes"], marker="o", color="#228833")
    axes[1].set_title("Median log1p(likes) by hour (UTC)")
    axes[1].set_xlabel("hour")
    return save_figure(fig, out / "likes_by_weekday_hour.png")


def _top_accounts(df: pl.DataFrame, out: Path, top: int, min_posts: int = 3) -> str:
    stats = df.group_by("username").agg(pl.len().alias("posts"), pl.col("likes").median().alias("median_likes"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.3 * top + 2))
    by_posts = stats.sort("posts", descending=True).head(top).reverse()
    axes[0].barh(by_posts["username"], by_posts["posts"], color="#ccbb44")
    axes[0].set_title(f"Top {top} accounts by posts")
    ranked = stats.filter(pl.col("median_likes").is_not_null() & (pl.col("posts") >= min_posts))
    by_likes = ranked.sort("median_likes", descending=True).head(top).reverse()
    if by_likes.height:
        axes[1].barh(by_likes["username"], by_likes["median_likes"] + 1, color="#ee6677")
        value_axis(axes[1], by_likes["median_likes"].to_numpy() + 1)
        axes[1].set_xlabel("median likes + 1")
        axes[1].set_title(f"Top {top} accounts by median likes (≥ {min_posts} posts)")
    else:
        axes[1].set_axis_off()
        axes[1].set_title("no like counts in this dataset" if stats["median_likes"].is_null().all()
                          else f"no account has {min_posts} posts with likes")
    return save_figure(fig, out / "top_accounts.png")


def _media_kinds(df: pl.DataFrame, out: Path) -> tuple[str | None, dict[str, int]]:
    """The media plot, or None (and only the counts) when no post has media: one bar of 'none' says less
    than the sentence the report prints instead."""
    kinds = df.select(pl.col("media").list.eval(pl.element().struct.field("kind")).alias("kinds"))
    counts = {"none": int((df["media"].list.len() == 0).sum())}
    exploded = kinds.explode("kinds").drop_nulls()
    for kind, n in exploded.group_by("kinds").len().iter_rows():
        counts[kind] = int(n)
    if set(counts) == {"none"}:
        return None, counts
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(list(counts), list(counts.values()), color="#aa3377")
    ax.set_title("Media items by kind ('none' = posts without media)")
    return save_figure(fig, out / "media_kinds.png"), counts


@contextmanager
def report_dir(uri: str) -> Iterator[Path]:
    """A local directory to draw a report in, published to ``uri`` (local or s3://) when the block ends."""
    if not is_s3(uri):
        path = Path(uri)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="engagesim-report-") as tmp:
        yield Path(tmp)
        for f in sorted(Path(tmp).iterdir()):
            write_bytes(join(uri, f.name), f.read_bytes())


def eda(posts_uri: str, out_dir: str, storage: StorageConfig | None = None, top_accounts: int = 15,
        min_account_posts: int = 3) -> dict:
    """Write the EDA plots and index.html for a posts dataset; return the summary."""
    df = _posts_frame(posts_uri, storage)  # a wrong input fails before the report directory is made
    with report_dir(out_dir) as out:
        summary = _eda(df, out, top_accounts, posts_uri, min_account_posts)
    summary["out"] = join(out_dir, "index.html")
    return summary


def _eda(df: pl.DataFrame, out: Path, top_accounts: int, posts_uri: str, min_account_posts: int = 3) -> dict:
    has_likes = df["likes"].drop_nulls().len() > 0
    plots = []
    if has_likes:
        plots += [_likes_distribution(df, out), _rhythm(df, out)]
    plots.append(_top_accounts(df, out, top_accounts, min_account_posts))
    media_plot, media_counts = _media_kinds(df, out)
    if media_plot:
        plots.append(media_plot)
    log_likes = df["log_likes"].drop_nulls()
    summary = {
        "posts": df.height,
        "accounts": df["username"].n_unique(),
        "first_post": str(df["created_at"].min()),
        "last_post": str(df["created_at"].max()),
        "posts_with_likes": log_likes.len(),
        "median_likes": round(float(df["likes"].median()), 1) if has_likes else None,
        "max_likes": int(df["likes"].max()) if has_likes else None,
        "std_log1p_likes": round(float(log_likes.std()), 3) if has_likes else None,
        "media_items": media_counts,
        "plots": plots,
        "out": str(out / "index.html"),
    }
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(v) if isinstance(v, dict) else str(v))}</td></tr>"
        for k, v in summary.items()
        if k not in ("plots", "out")
    )
    note = "" if has_likes else "<p><b>No like counts in this dataset</b>: likes plots are omitted.</p>"
    if media_plot is None:
        note += "<p><b>No post has media attached</b>: the media plot is omitted.</p>"
    images = figures_html(plots, CAPTIONS)
    (out / "index.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>engagesim EDA</title>"
        f"<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} th{{text-align:left}}</style></head>"
        f"<body><h1>EDA of {html.escape(posts_uri)}</h1>{note}<table>{rows}</table>{images}</body></html>"
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# --- behaviour models ---------------------------------------------------------------------------

def _served(level: dict) -> str | None:
    """The row name of what is served: the evaluation's "ensemble" column, the training result's chosen
    ensemble variant, or its one member when there is no ensemble."""
    if "ensemble" in level.get("models", {}):
        return "ensemble"
    if "served" in level.get("ensemble", {}):
        return f"ensemble:{level['ensemble']['served']}"
    return next(iter(level["models"])) if len(level.get("models", {})) == 1 else None


def _note(*parts: str) -> str:
    return ", ".join(p for p in parts if p)


def metric_rows(metrics: dict) -> list[dict]:
    """Flat rows (level, model, metric, value, oracle, note) of one split's {post_level, impression_level}
    (a training result or the evaluation's): the one place that reads the metrics layout.

    ``note`` marks the served model, a member that loses to the best baseline (post level: RMSE above
    the account or global mean; impression level: RCE ≤ 0, no better than predicting the training rate),
    and "dropped": a member the served ensemble left out for losing to it on the validation rows."""
    rows: list[dict] = []
    post = metrics.get("post_level", {})
    oracle_rmse = post.get("oracle", {}).get("rmse")
    baselines, served = post.get("baselines", {}), _served(post)
    best = min(baselines, key=lambda k: baselines[k]["rmse"]) if baselines else None
    for name, values in baselines.items():
        rows.append({"level": "post", "model": name, "metric": "rmse", "value": values["rmse"], "oracle": oracle_rmse,
                     "note": "baseline"})
    members = {**post.get("models", {}),
               **{f"ensemble:{k}": v for k, v in post.get("ensemble", {}).items() if k in ("loss_weighted", "stacked")}}
    dropped = post.get("ensemble", {}).get("dropped", {}).get("log1p_likes", {})
    for name, values in members.items():
        loses = best is not None and values["rmse"] > baselines[best]["rmse"]
        rows.append({"level": "post", "model": name, "metric": "rmse", "value": values["rmse"], "oracle": oracle_rmse,
                     "note": _note("served" if name == served else "", f"loses to {best}" if loses else "",
                                   "dropped" if name in dropped else "")})
    imp = metrics.get("impression_level", {})
    oracle, served = imp.get("oracle", {}), _served(imp)
    dropped = imp.get("ensemble", {}).get("dropped", {})
    members = {**imp.get("models", {}), **{f"ensemble:{k}": v for k, v in imp.get("ensemble", {}).items()
                                           if k in ("loss_weighted", "stacked")}}
    for name, per in members.items():
        for engagement, values in per.items():
            for metric in ("ap", "rce"):
                flat = metric == "rce" and values[metric] <= 0
                rows.append({"level": "impression", "model": name, "metric": f"{metric}_{engagement}",
                             "value": values[metric], "oracle": oracle.get(engagement, {}).get(metric),
                             "note": _note("served" if name == served else "",
                                           "no better than the training rate" if flat else "",
                                           "dropped" if name in dropped.get(engagement, {}) else "")})
    return rows


def behaviour_report(metrics: dict, out_dir: str) -> str:
    """metrics.json, bar charts against baselines/oracle, and index.html (local or s3://)."""
    with report_dir(out_dir) as out:
        _behaviour_report(metrics, out)
    return join(out_dir, "index.html")


def _behaviour_report(metrics: dict, out: Path) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    # The plots show the test split (what every command reports); the table has both splits.
    rows = metric_rows(metrics.get("test", {}))
    plots = []
    post = [r for r in rows if r["level"] == "post"]
    if post:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.barh([r["model"] for r in post], [r["value"] for r in post], color="#4477aa")
        if post[0]["oracle"] is not None:
            ax.axvline(post[0]["oracle"], color="#ee6677", linestyle="--", label="oracle")
            ax.legend()
        ax.set_xlabel("RMSE on log1p(likes), test split (latest in time) — lower is better")
        plots.append(save_figure(fig, out / "post_rmse.png"))
    imp = [r for r in rows if r["level"] == "impression" and r["metric"].startswith("rce_")]
    if imp:
        models = list(dict.fromkeys(r["model"] for r in imp))
        engagements = list(dict.fromkeys(r["metric"][4:] for r in imp))
        fig, ax = plt.subplots(figsize=(8, 3.8))
        width = 0.8 / (len(models) + 1)
        for i, m in enumerate(models):
            vals = [next(r["value"] for r in imp if r["model"] == m and r["metric"] == f"rce_{e}") for e in engagements]
            ax.bar(np.arange(len(engagements)) + i * width, vals, width, label=m)
        oracle = [next((r["oracle"] for r in imp if r["metric"] == f"rce_{e}"), None) for e in engagements]
        if all(o is not None for o in oracle):
            ax.bar(np.arange(len(engagements)) + len(models) * width, oracle, width, label="oracle", color="#bbbbbb")
        ax.set_xticks(np.arange(len(engagements)) + 0.4 - width / 2, engagements)
        ax.set_ylabel("RCE, test split — higher is better")
        ax.legend(fontsize=7)
        plots.append(save_figure(fig, out / "impression_rce.png"))
    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    table = "".join(
        f"<tr><td>{split}</td><td>{r['level']}</td><td>{html.escape(r['model'])}</td><td>{r['metric']}</td>"
        f"<td>{cell(r['value'])}</td><td>{cell(r['oracle'])}</td><td>{html.escape(r['note'])}</td></tr>"
        for split in ("test", "valid") for r in metric_rows(metrics.get(split, {}))
    )
    images = "".join(f'<figure><img src="{p}" alt="{p}"></figure>' for p in plots)
    (out / "index.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>engagesim behaviour models</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto} td{padding:2px 8px}</style></head>"
        f"<body><h1>Behaviour models</h1><p>test: the latest rows, untouched by fitting, early stopping, "
        f"stacking and tuning (what every command reports); valid: the rows before them, which chose those. "
        f"RMSE: lower is better; AP, RCE: higher is better (RCE 0 = predicting the training rate).</p>"
        f"{images}<table><tr><th>split</th><th>level</th><th>model</th><th>metric</th><th>value</th>"
        f"<th>oracle</th><th>note</th></tr>{table}</table></body></html>"
    )
