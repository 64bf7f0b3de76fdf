"""The evaluation stage at post level: the saved models on the untouched test posts → predictions, RMSE
(overall and per author-popularity quintile) beside the baselines and the oracle, and the calibration plot.

Below ``train.stream_rows`` test posts they are read into this process. At or above it they never are:
scoring actors (``load_run``, as Serve) stream them into ``predictions/posts``, the account means of the
training posts reach each row by a Ray Data hash join (a groupby over the training split:
``validation.account_means``), as the oracle's expectation does, and the metrics come from squared-error
sums per (model, popularity group) — exact, as in memory. The calibration hexbin is drawn from a uniform
sample of at most 200k predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from engagesim import datasets, io
from engagesim.metrics import grouped, popularity_groups, quantile_edges, rmse
from engagesim.pipeline import validation
from engagesim.pipeline.evaluate import _dropped, _rows, _write, plt, quintile_labels, save_figure
from engagesim.pipeline.level_inputs import post_baselines, streams_split
from engagesim.runs import LoadedRun, load_run
from engagesim.runtime import ensure_ray

LABEL = "label_log1p_likes"
BASELINES = ("global_mean", "account_mean")


def _popularity_column(names: list[str]) -> tuple[str, str]:
    """(column, words): author followers, or (the Adobe files have none) the author's target-encoded mean."""
    if "author_follower_count" in names:
        return "author_follower_count", "author followers"
    return "te_author_id", "author's mean log1p(likes) (target-encoded; no follower counts in the data)"


def _oracle_posts(run: LoadedRun, post_ids: list[str]) -> np.ndarray | None:
    truth = _truth(run)
    if not truth:
        return None
    t = pl.from_arrow(io.read_table(truth, run.storage, columns=["post_id", "expected_log1p_likes"]))
    return (pl.DataFrame({"post_id": post_ids}).join(t, on="post_id", how="left", maintain_order="left")
            ["expected_log1p_likes"].to_numpy())


def _truth(run: LoadedRun) -> str | None:
    return run.manifest["stages"].get("data", {}).get("outputs", {}).get("truth/posts")


def evaluate_posts(run: LoadedRun, out: Path, predictions_uri: str | None = None,
                   stream: bool | None = None) -> dict[str, Any]:
    """Score the labelled test posts; streamed (``stream``, automatic: at ``train.stream_rows`` test posts or
    more) or in this process."""
    if not io.exists(run.path("models", "post", "ensemble.json"), run.storage):
        return {}
    uri = run.path("features", "posts")
    predictions_uri = predictions_uri or run.path("predictions", "posts")
    if stream is None:
        stream = streams_split(run.config, uri, "test")
    if stream:
        return _evaluate_posts_streamed(run, out, uri, predictions_uri)
    features = validation.labelled(_rows(run, "posts"))
    if features.num_rows == 0:
        return {}
    preds = run.score_post_features(features)
    y = features.column(LABEL).to_numpy()
    column, words = _popularity_column(features.column_names)
    popularity = np.nan_to_num(features.column(column).to_numpy(zero_copy_only=False))
    groups = popularity_groups(popularity, quantile_edges(popularity))
    models = [c for c in preds.column_names if c.startswith("log1p_likes")]
    train = validation.labelled(_rows(run, "posts", "train", ["author_id", LABEL]))
    result: dict[str, Any] = {"rows": features.num_rows, "baselines": post_baselines(train, features), "models": {},
                              # Without follower counts (the Adobe files), popularity is the author's target-
                              # encoded mean log1p(likes): say which, so the plot does not claim followers.
                              "popularity_by": words}
    for c in models:
        p = preds.column(c).to_numpy()
        result["models"][_model(c)] = {"rmse": rmse(y, p), "rmse_by_popularity": grouped(rmse, y, p, groups)}
    result.update(_dropped(run, "post_level"))
    oracle = _oracle_posts(run, features.column("post_id").to_pylist())
    if oracle is not None:
        result["oracle"] = {"rmse": rmse(y, oracle), "rmse_by_popularity": grouped(rmse, y, oracle, groups)}
        result["gap_to_oracle"] = result["models"]["ensemble"]["rmse"] / result["oracle"]["rmse"] - 1
    table = preds.append_column(LABEL, pa.array(y)).append_column("popularity_group", pa.array(groups))
    _write(predictions_uri, table, "post_predictions", run.storage)
    _plot_post(out, y, preds.column("log1p_likes").to_numpy(), result)
    return result


def _model(column: str) -> str:
    return "ensemble" if column == "log1p_likes" else column[len("log1p_likes_"):]


class _PostRunScorer:
    """One actor: the run loaded once, scoring test posts as ``load_run().score_post_features``, with each
    post's label, popularity group and the baselines' (and the oracle's) predictions beside."""

    def __init__(self, run_uri: str, storage: Any, column: str, edges: list[float], prior: float):
        self.run, self.column, self.edges, self.prior = load_run(run_uri, storage), column, np.asarray(edges), prior

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = self.run.score_post_features(batch)
        popularity = np.nan_to_num(batch.column(self.column).to_numpy(zero_copy_only=False))
        account = batch.column(validation.ACCOUNT_MEAN).to_numpy(zero_copy_only=False).astype(np.float64)
        extra = {LABEL: batch.column(LABEL), "popularity_group": popularity_groups(popularity, self.edges),
                 "baseline_global_mean": np.full(batch.num_rows, self.prior),
                 "baseline_account_mean": np.where(np.isnan(account), self.prior, account)}
        if validation.ORACLE in batch.column_names:
            extra["oracle"] = batch.column(validation.ORACLE)
        for name, values in extra.items():
            out = out.append_column(name, pa.array(values) if isinstance(values, np.ndarray) else values)
        return out


def _sums(batch: pa.Table) -> pa.Table:
    """A block of predictions → one row per (model, popularity group): squared-error sum and rows."""
    y = batch.column(LABEL).to_numpy(zero_copy_only=False).astype(np.float64)
    groups = batch.column("popularity_group").to_numpy(zero_copy_only=False)
    models = [c for c in batch.column_names if c.startswith(("log1p_likes", "baseline_")) or c == "oracle"]
    rows: dict[str, list] = {"model": [], "group": [], "sse": [], "n": []}
    for c in models:
        err = (y - batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64)) ** 2
        for g in np.unique(groups):
            rows["model"].append(c)
            rows["group"].append(int(g))
            rows["sse"].append(float(err[groups == g].sum()))
            rows["n"].append(int((groups == g).sum()))
    return pa.table(rows)


def _rmse_of(sums: pl.DataFrame) -> dict[str, Any]:
    """{rmse, rmse_by_popularity} of one model's (group, sse, n) rows, as ``grouped(rmse, ...)`` gives them."""
    per = {f"group_{g}": float(np.sqrt(s / n)) for g, s, n in sums.sort("group").select("group", "sse", "n").iter_rows()}
    per["mean"] = float(np.mean(list(per.values()))) if per else float("nan")
    return {"rmse": float(np.sqrt(sums["sse"].sum() / max(sums["n"].sum(), 1))), "rmse_by_popularity": per}


def _evaluate_posts_streamed(run: LoadedRun, out: Path, uri: str, target: str) -> dict[str, Any]:
    import ray

    cfg = run.config
    ensure_ray(cfg.ray)
    ds = datasets.read(uri, run.storage, cfg.features.blocks).map_batches(validation.labelled, batch_format="pyarrow")
    rows = validation.count_splits(ds)["test"]
    if rows == 0:
        return {}
    test = ds.map_batches(validation.rows_of, fn_kwargs={"split": "test"}, batch_format="pyarrow")
    column, words = _popularity_column(test.schema().names)
    sample = validation.sample_rows(test, [column], rows)
    edges = quantile_edges(np.nan_to_num(sample.column(0).to_numpy(zero_copy_only=False)))
    train = ds.map_batches(validation.rows_of, fn_kwargs={"split": "train"}, batch_format="pyarrow")
    means, prior = validation.account_means(train)
    test = validation.with_account_means_and_oracle(cfg, test, means, _truth(run))
    scored = test.map_batches(
        _PostRunScorer, fn_constructor_kwargs={"run_uri": run.uri, "storage": run.storage, "column": column,
                                               "edges": edges.tolist(), "prior": prior},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=validation.actors()),
        batch_size=validation.SCORE_BATCH, batch_format="pyarrow", num_cpus=1)
    written = datasets.write_streaming(scored, target, "post_predictions", run.storage)
    predictions = datasets.read(target, run.storage)
    sums = pl.from_arrow(datasets.collect(predictions.map_batches(_sums, batch_format="pyarrow")))
    sums = sums.group_by("model", "group").agg(pl.col("sse").sum(), pl.col("n").sum())
    by = {m: _rmse_of(sums.filter(pl.col("model") == m)) for m in sums["model"].unique().to_list()}
    result: dict[str, Any] = {"rows": written, "metrics_from": "squared-error sums on Ray Data (exact)",
                              "baselines": {b: {"rmse": by[f"baseline_{b}"]["rmse"]} for b in BASELINES},
                              "models": {_model(c): v for c, v in by.items() if c.startswith("log1p_likes")},
                              "popularity_by": words, **_dropped(run, "post_level")}
    if "oracle" in by:
        result["oracle"] = by["oracle"]
        result["gap_to_oracle"] = result["models"]["ensemble"]["rmse"] / result["oracle"]["rmse"] - 1
    shown = validation.sample_rows(predictions, [LABEL, "log1p_likes"], written)
    _plot_post(out, shown.column(LABEL).to_numpy(), shown.column("log1p_likes").to_numpy(), result)
    return result


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
    b.set_xticks(range(len(groups)), quintile_labels(len(groups)))
    b.set_xlabel(f"quintile of {result.get('popularity_by', 'author popularity')}")
    b.set_title("Error by author popularity")
    b.legend(loc="lower center")
    save_figure(fig, out / "post_calibration_and_groups.png")
