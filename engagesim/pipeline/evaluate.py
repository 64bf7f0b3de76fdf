"""The evaluation stage: a run's saved models on its validation rows → predictions, metrics, plots.

(run URI) → ``<run>/predictions/{posts,impressions}``, ``<run>/reports/evaluation/``
(``metrics.json``, calibration and PR curves, feature importance, error by
author-popularity group, ``index.html``). It scores with ``load_run`` — the
objects Serve and ``engagesim score`` use — so these predictions are the
reference the online paths are checked against.

The ensemble scored here is the persisted one (its stacker was fit on these
validation rows); the out-of-fold ensemble figures in the training metrics
are the honest ones and both are reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from engagesim import io  # noqa: E402
from engagesim.metrics import average_precision, grouped, popularity_groups, quantile_edges, rce, rmse  # noqa: E402
from engagesim.models.data import label_matrix  # noqa: E402
from engagesim.report import report_dir, save_figure  # noqa: E402
from engagesim.runs import LoadedRun, load_run  # noqa: E402
from engagesim.schema import ENGAGEMENTS  # noqa: E402


def _valid(run: LoadedRun, name: str) -> pa.Table:
    """The validation rows of a feature table, filtered part by part while reading (never the whole table)."""
    return io.read_table(run.path("features", name), run.storage, filters=[("split", "==", "valid")])


def _write(uri: str, table: pa.Table, kind: str, storage) -> str:
    writer = io.DatasetWriter(uri, kind, storage)
    writer.write(table)
    writer.commit()
    return uri


def _oracle_posts(run: LoadedRun, post_ids: list[str]) -> np.ndarray | None:
    truth = run.manifest["stages"].get("data", {}).get("outputs", {}).get("truth/posts")
    if not truth:
        return None
    t = pl.from_arrow(io.read_table(truth, run.storage, columns=["post_id", "expected_log1p_likes"]))
    return (pl.DataFrame({"post_id": post_ids}).join(t, on="post_id", how="left", maintain_order="left")
            ["expected_log1p_likes"].to_numpy())


def _oracle_impressions(run: LoadedRun, keys: pa.Table) -> np.ndarray | None:
    truth = run.manifest["stages"].get("data", {}).get("outputs", {}).get("truth/interactions")
    if not truth:
        return None
    cols = ["user_id", "post_id", "impression_at", *[f"p_{e}" for e in ENGAGEMENTS]]
    t = pl.from_arrow(io.read_table(truth, run.storage, columns=cols))
    joined = pl.from_arrow(keys).join(t, on=["user_id", "post_id", "impression_at"], how="left", maintain_order="left")
    return np.column_stack([joined[f"p_{e}"].to_numpy() for e in ENGAGEMENTS])


def evaluate_posts(run: LoadedRun, out: Path) -> dict[str, Any]:
    features = _valid(run, "posts")
    features = features.filter(pc.invert(pc.is_nan(features.column("label_log1p_likes"))))
    if features.num_rows == 0 or not io.exists(run.path("models", "post", "ensemble.json"), run.storage):
        return {}
    preds = run.score_post_features(features)
    y = features.column("label_log1p_likes").to_numpy()
    popularity = (features.column("author_follower_count").to_numpy(zero_copy_only=False)
                  if "author_follower_count" in features.column_names else features.column("te_author_id").to_numpy())
    groups = popularity_groups(np.nan_to_num(popularity), quantile_edges(np.nan_to_num(popularity)))
    models = [c for c in preds.column_names if c.startswith("log1p_likes")]
    result: dict[str, Any] = {"rows": features.num_rows, "models": {}}
    for c in models:
        name = "ensemble" if c == "log1p_likes" else c[len("log1p_likes_"):]
        p = preds.column(c).to_numpy()
        result["models"][name] = {"rmse": rmse(y, p), "rmse_by_popularity": grouped(rmse, y, p, groups)}
    oracle = _oracle_posts(run, features.column("post_id").to_pylist())
    if oracle is not None:
        result["oracle"] = {"rmse": rmse(y, oracle), "rmse_by_popularity": grouped(rmse, y, oracle, groups)}
        result["gap_to_oracle"] = result["models"]["ensemble"]["rmse"] / result["oracle"]["rmse"] - 1
    table = preds.append_column("label_log1p_likes", pa.array(y)).append_column("popularity_group", pa.array(groups))
    _write(run.path("predictions", "posts"), table, "post_predictions", run.storage)
    _plot_post(out, y, preds.column("log1p_likes").to_numpy(), result)
    return result


def evaluate_impressions(run: LoadedRun, out: Path) -> dict[str, Any]:
    if not run.has_impression_models:
        return {}
    features = _valid(run, "impressions")
    if features.num_rows == 0:
        return {}
    preds = run.score_impression_features(features)
    y = label_matrix(features).astype(float)
    creators = np.nan_to_num(features.column("creator_follower_count").to_numpy(zero_copy_only=False))
    groups = popularity_groups(creators, quantile_edges(creators))
    names = sorted({c.split("_", 2)[2] if c.count("_") >= 2 else "ensemble" for c in preds.column_names
                    if c.startswith("p_")})
    result: dict[str, Any] = {"rows": features.num_rows, "models": {}}
    scores: dict[str, np.ndarray] = {}
    for name in names:
        suffix = "" if name == "ensemble" else f"_{name}"
        p = np.column_stack([preds.column(f"p_{e}{suffix}").to_numpy() for e in ENGAGEMENTS])
        scores[name] = p
        result["models"][name] = _engagement_metrics(y, p, groups)
    oracle = _oracle_impressions(run, features.select(["user_id", "post_id", "impression_at"]))
    if oracle is not None:
        result["oracle"] = _engagement_metrics(y, oracle, groups)
        result["gap_to_oracle"] = {e: 1 - result["models"]["ensemble"][e]["rce"] / result["oracle"][e]["rce"]
                                   for e in ENGAGEMENTS}
    table = preds
    for i, e in enumerate(ENGAGEMENTS):
        table = table.append_column(f"y_{e}", pa.array(y[:, i].astype(np.int8)))
    _write(run.path("predictions", "impressions"), table.append_column("popularity_group", pa.array(groups)),
           "impression_predictions", run.storage)
    _plot_impressions(out, y, scores["ensemble"], oracle, result)
    return result


def _engagement_metrics(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    return {e: {"ap": average_precision(y[:, k], p[:, k]), "rce": rce(y[:, k], p[:, k]),
                "rce_by_popularity": grouped(rce, y[:, k], p[:, k], groups),
                "ap_by_popularity": grouped(average_precision, y[:, k], p[:, k], groups)}
            for k, e in enumerate(ENGAGEMENTS)}


# --- plots --------------------------------------------------------------------------------------

def _plot_post(out: Path, y: np.ndarray, p: np.ndarray, result: dict) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.hexbin(p, y, gridsize=40, mincnt=1, cmap="Blues")
    lim = [min(y.min(), p.min()), max(y.max(), p.max())]
    a.plot(lim, lim, color="#ee6677", linestyle="--")
    a.set_xlabel("predicted log1p(likes)")
    a.set_ylabel("actual log1p(likes)")
    a.set_title("Post level: calibration")
    groups = [k for k in result["models"]["ensemble"]["rmse_by_popularity"] if k != "mean"]
    b.bar(groups, [result["models"]["ensemble"]["rmse_by_popularity"][g] for g in groups], color="#4477aa",
          label="ensemble")
    if "oracle" in result:
        b.plot(groups, [result["oracle"]["rmse_by_popularity"][g] for g in groups], "o--", color="#ee6677",
               label="oracle")
    b.set_ylabel("RMSE")
    b.set_title("Error by author popularity (quintile)")
    b.legend()
    save_figure(fig, out / "post_calibration_and_groups.png")


def _plot_impressions(out: Path, y: np.ndarray, p: np.ndarray, oracle: np.ndarray | None, result: dict) -> None:
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import precision_recall_curve

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for k, e in enumerate(ENGAGEMENTS):
        frac, mean = calibration_curve(y[:, k], p[:, k], n_bins=10, strategy="quantile")
        axes[0].plot(mean, frac, "o-", label=e)
        precision, recall, _ = precision_recall_curve(y[:, k], p[:, k])
        axes[1].plot(recall, precision, label=f"{e} (AP {result['models']['ensemble'][e]['ap']:.3f})")
    axes[0].plot([0, 1], [0, 1], "k--", lw=0.8)
    axes[0].set(xlabel="predicted probability", ylabel="observed rate", title="Calibration (ensemble)")
    axes[1].set(xlabel="recall", ylabel="precision", title="Precision–recall (ensemble)")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    groups = [g for g in result["models"]["ensemble"]["like"]["rce_by_popularity"] if g != "mean"]
    width = 0.8 / len(ENGAGEMENTS)
    for k, e in enumerate(ENGAGEMENTS):
        axes[2].bar(np.arange(len(groups)) + k * width,
                    [result["models"]["ensemble"][e]["rce_by_popularity"][g] for g in groups], width, label=e)
    axes[2].set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, fontsize=7)
    axes[2].set(ylabel="RCE", title="RCE by creator popularity (quintile)")
    axes[2].legend(fontsize=8)
    save_figure(fig, out / "impression_calibration_pr_groups.png")


def _plot_importance(run: LoadedRun, out: Path) -> list[str]:
    plots = []
    boosters = []
    if run.post_models.xgb:
        boosters.append(("post log1p(likes)", run.post_models.xgb[0]))
    if run.has_impression_models and "like" in run.impression_models.xgb:
        boosters.append(("impression P(like)", run.impression_models.xgb["like"][0]))
    for title, booster in boosters:
        gain = sorted(booster.get_score(importance_type="gain").items(), key=lambda kv: kv[1])[-20:]
        fig, ax = plt.subplots(figsize=(7, 5))
        ax.barh([k for k, _ in gain], [v for _, v in gain], color="#228833")
        ax.set(xlabel="total gain", title=f"XGBoost feature importance — {title}")
        ax.tick_params(axis="y", labelsize=7)
        plots.append(save_figure(fig, out / f"importance_{title.split()[0]}.png"))
    return plots


def evaluate(run_uri: str, storage=None) -> dict[str, Any]:
    """Score the validation rows with the saved models and write predictions, metrics.json and plots."""
    run = load_run(run_uri, storage)
    target = run.path("reports", "evaluation")
    with report_dir(target) as out:
        result = {"post_level": evaluate_posts(run, out), "impression_level": evaluate_impressions(run, out)}
        _plot_importance(run, out)
        io.write_json(str(out / "metrics.json"), result)
        images = "".join(f'<figure><img src="{p.name}" alt="{p.name}"></figure>' for p in sorted(out.glob("*.png")))
        (out / "index.html").write_text(
            "<!doctype html><html><head><meta charset='utf-8'><title>engagesim evaluation</title></head>"
            f"<body style='font-family:sans-serif'><h1>Evaluation of {run.run_id}</h1>{images}"
            "<p>Numbers: <a href='metrics.json'>metrics.json</a></p></body></html>")
    result["report"] = io.join(target, "index.html")
    return result
