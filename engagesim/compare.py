"""Side-by-side comparison of finished runs (behaviour and content): one table, plots, and measured costs.

Metrics come from each run's manifest (the evaluation the job wrote), so the
comparison never re-derives a number the run already reported. What a
manifest cannot hold is measured here on this machine: scoring throughput
and the latency of one prediction through ``load_run().predict`` (the
Synerise paper's CPU-latency figure), and model size on disk.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from engagesim import io

ENGAGEMENTS = ("like", "reply", "retweet", "quote")
TRAIN_STAGES = ("train_post_level", "train_impression_level", "llm", "hashtags", "images")


def _size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def measure_scoring(run_uri: str, rows: int = 1000, repeats: int = 5) -> dict[str, float]:
    """Post-level rows/s on ``rows`` of the run's own posts and the median latency of a one-post call."""
    from engagesim.runs import load_run

    run = load_run(run_uri)
    posts = io.read_table(io.join(run_uri, "data", "posts")).slice(0, rows)
    if posts.num_rows == 0:
        return {}
    run.predict(posts.slice(0, 8))  # warm: encoders and caches load on first use
    start = time.perf_counter()
    run.predict(posts)
    rows_per_s = posts.num_rows / (time.perf_counter() - start)
    single = []
    for i in range(repeats):
        start = time.perf_counter()
        run.predict(posts.slice(i, 1))
        single.append(time.perf_counter() - start)
    return {"rows_per_s": rows_per_s, "latency_ms": float(np.median(single) * 1000)}


def summarise(run_uri: str, measure: bool = True) -> dict[str, Any]:
    """One run as a flat record: identity, data size, headline metrics, oracle, fairness, costs."""
    manifest = io.read_json(io.join(run_uri, "manifest.json"))
    cfg, metrics = manifest["config"], manifest["metrics"]
    record: dict[str, Any] = {
        "run": manifest["run_id"], "job": manifest["job"], "preset": cfg.get("preset", {}).get("name") or "-",
        "data": cfg["data"]["source"], "status": manifest["status"],
        "train_seconds": round(sum(s["seconds"] for k, s in manifest["stages"].items() if k in TRAIN_STAGES), 1),
        "model_bytes": _size_bytes(Path(run_uri) / "models"),
    }
    if cfg["data"]["source"] == "synth":
        record["data_size"] = f"{cfg['synth']['posts']} posts, {cfg['synth']['impressions']} impressions"
    test = metrics.get("test", {})  # the untouched test split, as every command reports it
    post = test.get("post_level", {})
    if post.get("models"):
        ens = post["models"].get("ensemble", {})
        record["rmse"] = ens.get("rmse")
        record["rmse_fair"] = ens.get("rmse_by_popularity", {}).get("mean")
        record["rmse_oracle"] = post.get("oracle", {}).get("rmse")
        record["rmse_account_mean"] = post.get("baselines", {}).get("account_mean", {}).get("rmse")
        record["post_rows_test"] = post.get("rows")
    imp = test.get("impression_level", {})
    if imp.get("models"):
        ens = imp["models"]["ensemble"]
        for e in ENGAGEMENTS:
            record[f"rce_{e}"] = ens[e]["rce"]
            record[f"ap_{e}"] = ens[e]["ap"]
            record[f"rce_{e}_fair"] = ens[e]["rce_by_popularity"]["mean"]
            record[f"rce_{e}_oracle"] = imp.get("oracle", {}).get(e, {}).get("rce")
        record["impression_rows_test"] = imp.get("rows")
        groups = ens["like"]["rce_by_popularity"]
        record["rce_like_by_group"] = [groups[g] for g in sorted(groups) if g != "mean"]
    elif post.get("models"):
        groups = post["models"].get("ensemble", {}).get("rmse_by_popularity", {})
        record["rmse_by_group"] = [groups[g] for g in sorted(groups) if g != "mean"]
    if record.get("rmse") is not None and record.get("rmse_oracle"):
        record["rmse_gap"] = (record["rmse"] - record["rmse_oracle"]) / record["rmse_oracle"]
    if record.get("rce_like") is not None and record.get("rce_like_oracle"):
        record["rce_like_gap"] = (record["rce_like_oracle"] - record["rce_like"]) / record["rce_like_oracle"]
    if "llm" in metrics:
        llm = metrics["llm"]
        record.update({f"llm_{k}": llm[k] for k in ("valid_loss_before", "valid_loss_after", "bleu_base",
                                                     "bleu_tuned", "rouge_l_base", "rouge_l_tuned") if k in llm})
    if "hashtags" in metrics:
        ht = metrics["hashtags"]
        k = cfg["content"]["hashtags"]["k"]
        record["hashtag_k"] = k  # content.hashtags.k: the P@k rows below are at this k
        record["hashtag_precision_at_k"] = ht[f"model@{k}"][f"precision@{k}"]
        record["hashtag_precision_at_k_baseline"] = ht[f"baseline@{k}"][f"precision@{k}"]
        record["hashtag_bleu"] = ht[f"model@{k}"]["bleu"]
        record["hashtag_bleu_baseline"] = ht[f"baseline@{k}"]["bleu"]
    if measure and manifest["job"] == "behaviour" and manifest["status"] == "succeeded":
        record.update(measure_scoring(run_uri))
    record["differences"] = cfg.get("preset", {}).get("differences", [])
    return record


COLUMNS = [
    ("preset", "preset"), ("job", "job"), ("data", "data"), ("status", "status"), ("data_size", "world size"),
    ("rmse", "RMSE log1p(likes)"), ("rmse_oracle", "oracle RMSE"),
    ("rmse_gap", "RMSE gap to oracle (fraction)"), ("rmse_account_mean", "account-mean RMSE"), ("rmse_fair", "RMSE, mean over popularity groups"),
    *[(f"rce_{e}", f"RCE {e}") for e in ENGAGEMENTS], *[(f"rce_{e}_oracle", f"oracle RCE {e}") for e in ENGAGEMENTS],
    ("rce_like_gap", "RCE like gap to oracle (fraction)"),
    *[(f"ap_{e}", f"AP {e}") for e in ENGAGEMENTS], ("rce_like_fair", "RCE like, mean over popularity groups"),
    ("llm_valid_loss_before", "LLM held-out loss before"), ("llm_valid_loss_after", "after"),
    ("llm_bleu_base", "BLEU base"), ("llm_bleu_tuned", "BLEU tuned"), ("llm_rouge_l_tuned", "ROUGE-L tuned"),
    ("hashtag_k", "hashtags per post (k)"), ("hashtag_precision_at_k", "hashtag P@k"),
    ("hashtag_precision_at_k_baseline", "baseline P@k"),
    ("hashtag_bleu", "hashtag BLEU"), ("hashtag_bleu_baseline", "baseline BLEU"),
    ("train_seconds", "training s"), ("rows_per_s", "scoring rows/s"), ("latency_ms", "1-post latency ms"),
    ("model_bytes", "model MB"),
]


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key == "model_bytes":
        return f"{value / 1e6:.1f}"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def markdown_table(records: list[dict]) -> str:
    """Runs as columns, metrics as rows (only rows some run has)."""
    header = "| metric | " + " | ".join(r["run"] for r in records) + " |"
    lines = [header, "|---" * (len(records) + 1) + "|"]
    for key, label in COLUMNS:
        if any(r.get(key) is not None for r in records):
            lines.append(f"| {label} | " + " | ".join(_cell(key, r.get(key)) for r in records) + " |")
    return "\n".join(lines)


def _plots(records: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engagesim.report import save_figure

    paths = []
    names = [r["run"] for r in records]
    imp = [r for r in records if r.get("rce_like") is not None]
    if imp:
        fig, ax = plt.subplots(figsize=(8, 3.8))
        width = 0.8 / (len(imp) + 1)
        for i, r in enumerate(imp):
            ax.bar(np.arange(4) + i * width, [r[f"rce_{e}"] for e in ENGAGEMENTS], width, label=r["run"])
        if any(imp[0].get(f"rce_{e}_oracle") is not None for e in ENGAGEMENTS):  # only synthetic worlds have one
            ax.bar(np.arange(4) + len(imp) * width, [imp[0][f"rce_{e}_oracle"] or 0 for e in ENGAGEMENTS], width,
                   label="oracle", color="#bbbbbb")
        ax.set_xticks(np.arange(4) + 0.4 - width / 2, ENGAGEMENTS)
        ax.set_ylabel("RCE (validation)")
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, out / "rce_per_engagement.png"))
    post = [r for r in records if r.get("rmse") is not None]
    if post:
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(post)))
        ax.barh([r["run"] for r in post], [r["rmse"] for r in post], color="#4477aa", label="ensemble")
        # Real data has no oracle; an all-NaN scatter breaks matplotlib's legend, so only what exists is drawn.
        for key, style in (("rmse_oracle", {"color": "#ee6677", "label": "oracle"}),
                           ("rmse_account_mean", {"color": "#222222", "marker": "|", "s": 200,
                                                  "label": "account mean (baseline)"})):
            if any(r.get(key) is not None for r in post):
                ax.scatter([r.get(key) if r.get(key) is not None else np.nan for r in post],
                           [r["run"] for r in post], zorder=3, **style)
        ax.set_xlabel("RMSE on log1p(likes), validation")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        paths.append(save_figure(fig, out / "rmse.png"))
    for key, label, name in (("rce_like_by_group", "RCE like", "rce_like_by_popularity.png"),
                             ("rmse_by_group", "RMSE log1p(likes)", "rmse_by_popularity.png")):
        grouped = [r for r in records if r.get(key)]
        if grouped:
            fig, ax = plt.subplots(figsize=(6, 3.4))
            for r in grouped:
                ax.plot(range(1, len(r[key]) + 1), r[key], marker="o", label=r["run"])
            ax.set_xlabel("author popularity quintile (1 = fewest followers)")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
            paths.append(save_figure(fig, out / name))
    fig, axes = plt.subplots(1, 3, figsize=(11, 0.8 + 0.4 * len(records)))
    for ax, key, label in zip(axes, ("train_seconds", "rows_per_s", "model_bytes"),
                              ("training seconds", "scoring rows/s", "model size (MB)")):
        values = [(r.get(key) or 0) / (1e6 if key == "model_bytes" else 1) for r in records]
        ax.barh(names, values, color="#228833")
        ax.set_xlabel(label)
        if ax is not axes[0]:
            ax.set_yticklabels([])
    paths.append(save_figure(fig, out / "costs.png"))
    return paths


def compare(run_uris: list[str], out_dir: str, measure: bool = True) -> dict[str, Any]:
    """compare.md (table + plots), compare.json; returns the records and paths."""
    records = [summarise(u, measure) for u in run_uris]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = [str(out / Path(p).name) for p in _plots(records, out)]
    (out / "compare.json").write_text(json.dumps(records, indent=2, default=float))
    images = "\n".join(f"![{Path(p).stem}]({Path(p).name})" for p in plots)
    (out / "compare.md").write_text(f"# Run comparison\n\n{markdown_table(records)}\n\n{images}\n")
    return {"records": records, "table": str(out / "compare.md"), "plots": plots}
