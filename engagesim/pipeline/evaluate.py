"""The evaluation stage: a run's saved models on its untouched test rows → predictions, metrics, plots.

(run URI) → ``<run>/predictions/{posts,impressions}``, ``<run>/reports/evaluation/``
(``metrics.json``, calibration and PR curves, feature importance, error by
author-popularity group, ``index.html``). It scores with ``load_run`` — the
objects Serve and ``engagesim score`` use — so these predictions are the
reference the online paths are checked against. Test splits of ``train.stream_rows`` rows or more
are never gathered: the test rows stream through scoring actors into the predictions dataset, whose
partial sums give the metrics and the curves (``pipeline/validation.py``; posts: ``evaluate_posts.py``).

The test split is the latest ``features.test_share`` of the held-out rows (forward in time). Early
stopping, the ensemble's weights and stacker and ``tune`` only ever see the validation rows before it,
so the served ensemble is scored here exactly as it is persisted, on rows nothing was fit or chosen on.
These are the figures ``pipeline``, ``evaluate``, ``/v1/models`` and ``report compare`` print; the
validation figures stay in the manifest (``metrics.valid``) for diagnosis.
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

from engagesim import datasets, io  # noqa: E402
from engagesim.metrics import AP_FROM_BINS, average_precision, grouped, quantile_edges, rce  # noqa: E402
from engagesim.models.data import label_matrix  # noqa: E402
from engagesim.pipeline import validation  # noqa: E402
from engagesim.pipeline.level_inputs import streams_split  # noqa: E402
from engagesim.report import figures_html, report_dir, save_figure  # noqa: E402
from engagesim.runs import LoadedRun, load_run  # noqa: E402
from engagesim.runtime import ensure_ray  # noqa: E402
from engagesim.schema import ENGAGEMENTS  # noqa: E402


def _rows(run: LoadedRun, name: str, split: str = "test", columns: list[str] | None = None) -> pa.Table:
    """A split's rows of a feature table, filtered part by part while reading (never the whole table)."""
    return io.read_table(run.path("features", name), run.storage, columns=columns, filters=[("split", "==", split)])


def _write(uri: str, table: pa.Table, kind: str, storage) -> str:
    writer = io.DatasetWriter(uri, kind, storage)
    writer.write(table)
    writer.commit()
    return uri


def _oracle_impressions(run: LoadedRun, keys: pa.Table) -> np.ndarray | None:
    truth = run.manifest["stages"].get("data", {}).get("outputs", {}).get("truth/interactions")
    if not truth:
        return None
    cols = ["user_id", "post_id", "impression_at", *[f"p_{e}" for e in ENGAGEMENTS]]
    # Only the test period's truth, part by part while reading: the test split is the latest rows (forward in
    # time), and the whole log's truth — every impression's keys — took the driver from 1.18 to 1.53 GB at 2M.
    at = keys.column("impression_at")
    period = (pc.field("impression_at") >= pc.min(at)) & (pc.field("impression_at") <= pc.max(at))
    t = pl.from_arrow(io.read_table(truth, run.storage, columns=cols, filters=period))
    joined = pl.from_arrow(keys).join(t, on=["user_id", "post_id", "impression_at"], how="left", maintain_order="left")
    return np.column_stack([joined[f"p_{e}"].to_numpy() for e in ENGAGEMENTS])


def evaluate_impressions(run: LoadedRun, out: Path, predictions_uri: str | None = None,
                         stream: bool | None = None) -> dict[str, Any]:
    """Score the impression test rows. ``train.stream_rows`` test rows or more (``stream``)
    are scored on Ray Data and their metrics come from partial sums; smaller ones in this process."""
    if not run.has_impression_models:
        return {}
    uri = run.path("features", "impressions")
    predictions_uri = predictions_uri or run.path("predictions", "impressions")
    if stream is None:
        stream = streams_split(run.config, uri, "test")
    if stream:
        return _evaluate_impressions_streamed(run, out, uri, predictions_uri)
    # Part by part: one part's features in memory at a time, and only its predictions and labels kept (the whole
    # test split at 2M impressions, 238k rows × 160 columns, was 0.47 GB of Arrow and its float32 matrix 0.15 GB).
    creators = _rows(run, "impressions", columns=["creator_follower_count"]).column(0)
    if len(creators) == 0:
        return {}
    edges = quantile_edges(np.nan_to_num(creators.to_numpy(zero_copy_only=False)))
    test = [("split", "==", "test")]
    table = pa.concat_tables([validation.with_labels(part, run.score_impression_features(part), edges)
                              for part in io.read_parts(uri, run.storage, filters=test) if part.num_rows])
    y = label_matrix(table).astype(float)
    groups = table.column("popularity_group").to_numpy()
    result: dict[str, Any] = {"rows": table.num_rows, "models": {}}
    scores: dict[str, np.ndarray] = {}
    for name in _model_names(table.column_names):
        p = np.column_stack([table.column(c).to_numpy() for c in validation.prob_columns(name)])
        scores[name] = p
        result["models"][name] = _engagement_metrics(y, p, groups)
    result.update(_dropped(run, "impression_level"))
    oracle = _oracle_impressions(run, table.select(["user_id", "post_id", "impression_at"]))
    if oracle is not None:
        result["oracle"] = _engagement_metrics(y, oracle, groups)
    _write(predictions_uri, table, "impression_predictions", run.storage)
    _plot_impressions(out, {e: _exact_curves(y[:, k], scores["ensemble"][:, k]) for k, e in enumerate(ENGAGEMENTS)},
                      result)
    return _with_gap(result)


def _dropped(run: LoadedRun, level: str) -> dict[str, Any]:
    """The members training dropped from the served ensemble (for the table's note), as training chose them."""
    dropped = run.metrics.get("valid", {}).get(level, {}).get("ensemble", {}).get("dropped")
    return {"ensemble": {"dropped": dropped}} if dropped else {}


def _model_names(columns: list[str]) -> list[str]:
    return sorted({c.split("_", 2)[2] if c.count("_") >= 2 else "ensemble" for c in columns if c.startswith("p_")})


def _with_gap(result: dict[str, Any]) -> dict[str, Any]:
    if "oracle" in result:
        result["gap_to_oracle"] = {e: 1 - result["models"]["ensemble"][e]["rce"] / result["oracle"][e]["rce"]
                                   for e in ENGAGEMENTS}
    return result


class _RunScorer:
    """One actor: the run loaded once, scoring feature blocks as ``load_run().score_impression_features``."""

    def __init__(self, run_uri: str, storage: Any, edges: list[float]):
        self.run, self.edges = load_run(run_uri, storage), np.asarray(edges)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return validation.with_labels(batch, self.run.score_impression_features(batch), self.edges)


def _evaluate_impressions_streamed(run: LoadedRun, out: Path, uri: str, predictions_uri: str) -> dict[str, Any]:
    """Test rows streamed through scoring actors into the predictions dataset; the metrics from
    that dataset's partial sums (RCE exact, AP from score bins) and the plots from its score histograms."""
    import ray

    ensure_ray(run.config.ray)
    ds = datasets.read(uri, run.storage, run.config.features.blocks)
    test_rows = validation.count_splits(ds)["test"]
    if test_rows == 0:
        return {}
    test = ds.map_batches(validation.rows_of, fn_kwargs={"split": "test"}, batch_format="pyarrow")
    edges = validation.popularity_edges(test, test_rows)
    scored = test.map_batches(
        _RunScorer, fn_constructor_kwargs={"run_uri": run.uri, "storage": run.storage, "edges": edges.tolist()},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=validation.actors()),
        batch_size=validation.SCORE_BATCH, batch_format="pyarrow", num_cpus=1)
    rows = datasets.write_streaming(scored, predictions_uri, "impression_predictions", run.storage)
    predictions = datasets.read(predictions_uri, run.storage)
    columns = predictions.schema().names
    names = _model_names(columns)
    bins = validation.score_edges(validation.sample_rows(predictions, [c for c in columns if c.startswith("p_")], rows),
                                  names)
    truth = run.manifest["stages"].get("data", {}).get("outputs", {}).get("truth/interactions")
    sums = validation.score_sums(run.config, predictions, names, bins, truth, lambda _: None)
    result: dict[str, Any] = {"rows": rows, "metrics_from": f"partial sums on Ray Data; {AP_FROM_BINS}",
                              "models": {n: validation.metrics_of(sums[n], "all") for n in names},
                              **_dropped(run, "impression_level")}
    if validation.ORACLE in sums:
        result["oracle"] = validation.metrics_of(sums[validation.ORACLE], "all")
    _plot_impressions(out, {e: sums["ensemble"].curves(k) for k, e in enumerate(ENGAGEMENTS)}, result)
    return _with_gap(result)


def _engagement_metrics(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    return {e: {"ap": average_precision(y[:, k], p[:, k]), "rce": rce(y[:, k], p[:, k]),
                "rce_by_popularity": grouped(rce, y[:, k], p[:, k], groups),
                "ap_by_popularity": grouped(average_precision, y[:, k], p[:, k], groups)}
            for k, e in enumerate(ENGAGEMENTS)}


# --- plots --------------------------------------------------------------------------------------

EVALUATION_CAPTIONS = {
    "post_calibration_and_groups.png": "Post level, test split: predicted vs actual log1p(likes) (the dashed line "
                                       "is perfect), and the served ensemble's RMSE per author-popularity quintile.",
    "impression_calibration_pr_groups.png": "Impression level, test split: calibration and precision–recall of the "
                                            "served ensemble per engagement, and its RCE per creator-popularity "
                                            "quintile (higher is better).",
    "importance_post.png": "What the post-level booster splits on most (total gain).",
    "importance_impression.png": "What the impression-level P(like) booster splits on most (total gain).",
}


def quintile_labels(n: int) -> list[str]:
    """Group tick labels that say which end is popular: "1 least" … "n most"."""
    return [f"{i + 1}" + (" least" if i == 0 else " most" if i == n - 1 else "") for i in range(n)]


def _exact_curves(y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """The curves ``BinaryScores.curves`` approximates, from every row (sklearn)."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import precision_recall_curve

    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="quantile")
    precision, recall, _ = precision_recall_curve(y, p)
    return {"precision": precision, "recall": recall, "predicted": predicted, "observed": observed}


def _plot_impressions(out: Path, curves: dict[str, dict[str, np.ndarray]], result: dict) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for e, c in curves.items():
        axes[0].plot(c["predicted"], c["observed"], "o-", label=e)
        axes[1].plot(c["recall"], c["precision"], label=f"{e} (AP {result['models']['ensemble'][e]['ap']:.3f})")
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
    axes[2].set_xticks(np.arange(len(groups)) + 0.4 - width / 2, quintile_labels(len(groups)), fontsize=7)
    axes[2].set(ylabel="RCE", xlabel="quintile of creator followers", title="RCE by creator popularity")
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
    """Score the test rows with the saved models and write predictions, metrics.json and plots.

    Returns the test metrics ({post_level, impression_level}) and the report's URI; metrics.json holds
    them as ``test`` beside the training stage's ``valid`` figures."""
    from engagesim.pipeline.evaluate_posts import evaluate_posts  # it reads this module's helpers

    run = load_run(run_uri, storage)
    target = run.path("reports", "evaluation")
    with report_dir(target) as out:
        result = {"post_level": evaluate_posts(run, out), "impression_level": evaluate_impressions(run, out)}
        _plot_importance(run, out)
        io.write_json(str(out / "metrics.json"), {"valid": run.metrics.get("valid", {}), "test": result})
        images = figures_html([p.name for p in sorted(out.glob("*.png"))], EVALUATION_CAPTIONS)
        (out / "index.html").write_text(
            "<!doctype html><html><head><meta charset='utf-8'><title>engagesim evaluation</title></head>"
            f"<body style='font-family:sans-serif'><h1>Evaluation of {run.run_id}</h1>{images}"
            "<p>Numbers: <a href='metrics.json'>metrics.json</a></p></body></html>")
    result["report"] = io.join(target, "index.html")
    return result
