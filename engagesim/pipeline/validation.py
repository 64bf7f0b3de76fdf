"""A level's validation split when training streams: a bounded fit sample in the driver, metrics over the
rest from partial sums on Ray Data.

Above ``train.stream_rows`` the validation split is as large as the log's latest days (at 40M impressions,
millions of rows × 160 columns), too large for the driver. It is cut in two by a hash of the level's keys
(user, post, impression time; a post's id at post level), the same rows in every pass:

- **fit rows** (at most ``train.valid_fit_rows``, gathered into the driver): XGBoost's and the NN's early
  stopping, the ensemble's loss weights and its stacker;
- **scored rows** (all the others, never gathered): an actor pool loads the saved members once per
  actor and predicts block by block. At impression level each block becomes a ``BinaryScores``
  (cross-entropy sums and per-bin counts) per model, summed in the driver: RCE is exact; AP comes from
  score bins whose edges are quantiles of the fit rows' predictions, within 3e-5 of the exact sort from 60k
  rows (``BinaryScores.ap``). At post level each block becomes a squared-error sum per model: RMSE is exact,
  baselines included (the account means reach the rows through a hash join).

The evaluation stage reuses the same pieces (``with_labels``, ``score_sums``) on the predictions dataset
it writes.

So the reported figures are on rows that neither early stopping nor the stacker saw; the loss-weighted
and stacked ensembles are scored as ``ensemble.json`` holds them. On synthetic worlds the data
generator's expectation (the oracle) is joined to the scored rows with Ray Data's hash join.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from engagesim import datasets, io
from engagesim.config import AppConfig
from engagesim.metrics import BinaryScores, popularity_groups, quantile_bin_edges, quantile_edges
from engagesim.models.bundle import ImpressionModels, apply_ensemble
from engagesim.models.data import SPLITS, label_matrix
from engagesim.models.family import IMPRESSION
from engagesim.schema import ENGAGEMENTS

KEYS = list(IMPRESSION.keys)
GROUPS = 5  # creator follower quintiles, as the in-memory scorer
SCORE_BATCH = 100_000
ORACLE = "oracle"


def is_fit_row(batch: pa.Table, fraction: float, seed: int, keys: tuple[str, ...] = IMPRESSION.keys) -> pa.Array:
    """Whether each row belongs to the fit rows: a hash of its ``keys`` (the level's), independent of block
    boundaries."""
    keys = list(keys)
    u = pl.from_arrow(batch.select(keys)).select(pl.struct(keys).hash(seed + 1) / float(2 ** 64)).to_series()
    return (u < fraction).to_arrow()


def rows_of(batch: pa.Table, split: str, fraction: float | None = None, seed: int = 0, fit: bool = True,
            keys: tuple[str, ...] = IMPRESSION.keys) -> pa.Table:
    """A block's rows of ``split``; with ``fraction``, only its fit rows (``fit``) or only the others."""
    batch = batch.filter(pc.equal(batch.column("split"), split))
    if fraction is None:
        return batch
    mask = is_fit_row(batch, fraction, seed, keys)
    return batch.filter(mask if fit else pc.invert(mask))


def _count_splits(batch: pa.Table) -> dict[str, np.ndarray]:
    return {s: np.array([int(pc.sum(pc.equal(batch.column("split"), s)).as_py() or 0)]) for s in SPLITS}


def fit_fraction(valid_rows: int, fit_rows: int) -> float:
    """The share of validation rows kept for fitting: ``fit_rows`` of them, never more than half."""
    return min(0.5, fit_rows / max(valid_rows, 1))


def split_valid(ds, fit_rows: int, seed: int, keys: tuple[str, ...] = IMPRESSION.keys) -> tuple[pa.Table, Any, int]:
    """(fit rows in the driver, scored rows as a Ray Dataset, all validation rows) of a feature dataset."""
    valid_rows = count_splits(ds)["valid"]
    fraction = fit_fraction(valid_rows, fit_rows)
    at = {"split": "valid", "fraction": fraction, "seed": seed, "keys": keys}
    fit = datasets.collect(ds.map_batches(rows_of, batch_format="pyarrow", fn_kwargs=at))
    scored = ds.map_batches(rows_of, batch_format="pyarrow", fn_kwargs={**at, "fit": False})
    return fit, scored, valid_rows


def count_splits(ds) -> dict[str, int]:
    """Rows per split, one pass: a row of counts per block, summed in the driver (a row per block is all it
    holds). Why not ``Dataset.sum`` or ``groupby("split").count()``: both run a hash shuffle of 200 reduce
    tasks for three numbers — 8–12 s on a 30k-row table, where this takes 1–3 s."""
    counts = datasets.collect(ds.select_columns(["split"]).map_batches(_count_splits, batch_format="pyarrow",
                                                                          batch_size=None))
    return {s: int(np.sum(counts.column(s).to_numpy())) if counts.num_rows else 0 for s in SPLITS}


def sample_rows(ds, columns: list[str], total_rows: int, rows: int = 200_000, seed: int = 0) -> pa.Table:
    """A uniform sample of at most about ``rows`` of a dataset's ``columns``, in the driver."""
    fraction = min(1.0, rows / max(total_rows, 1))
    sample = ds.select_columns(columns)
    return datasets.collect(sample.random_sample(fraction, seed=seed) if fraction < 1 else sample)


def popularity_edges(valid, valid_rows: int) -> np.ndarray:
    """Creator follower quintile edges from a uniform sample of the validation rows."""
    values = sample_rows(valid, ["creator_follower_count"], valid_rows)
    return quantile_edges(values.column(0).to_numpy(zero_copy_only=False) if values.num_rows else np.zeros(1),
                          GROUPS)


def score_edges(sample: pa.Table, models: list[str]) -> dict[str, np.ndarray]:
    """Per model, equal-count AP bin edges from a sample of its probability columns."""
    return {name: quantile_bin_edges(np.column_stack([sample.column(c).to_numpy(zero_copy_only=False)
                                                      for c in prob_columns(name)]))
            for name in models if sample.num_rows and all(c in sample.column_names for c in prob_columns(name))}


def with_labels(batch: pa.Table, preds: pa.Table, edges: np.ndarray) -> pa.Table:
    """Predictions + the rows' labels (``y_*``) and creator popularity group: what the metrics read."""
    y = label_matrix(batch, IMPRESSION.labels)
    for i, label in enumerate(IMPRESSION.labels):
        preds = preds.append_column(label, pa.array(y[:, i].astype(np.int8)))
    follower = np.nan_to_num(batch.column("creator_follower_count").to_numpy(zero_copy_only=False))
    return preds.append_column("popularity_group", pa.array(popularity_groups(follower, edges)))


def prob_columns(name: str) -> list[str]:
    """The columns of one model's four probabilities, as ``LoadedRun.score_impression_features`` names
    them (``ensemble``: the served one, without a suffix)."""
    suffix = "" if name == "ensemble" else f"_{name}"
    return [f"p_{e}{suffix}" for e in ENGAGEMENTS]


def as_method(spec: dict, method: str) -> dict:
    """An output's ensemble spec applied as ``method``. Where no stacker was fitted (one member kept on
    validation, or too few rows) "stacked" is the loss-weighted mean, as training scored it
    (``pipeline/train.py::_ensembles``)."""
    if method == "stacked" and "stacker" not in spec:
        return {**spec, "method": "loss_weighted"}
    return {**spec, "method": method}


class _MemberScorer:
    """One actor: this level's saved members and both ensembles (as ``ensemble.json`` holds them)."""

    def __init__(self, models_dir: str, edges: list[float]):
        self.models = ImpressionModels(models_dir)
        self.edges = np.asarray(edges)

    def __call__(self, batch: pa.Table) -> pa.Table:
        preds = self.models.member_predictions(batch)
        specs = (self.models.ensemble or {}).get("engagements", {})
        if len(preds) >= 2 and specs:
            members = dict(preds)
            for method in ("loss_weighted", "stacked"):
                preds[f"ensemble_{method}"] = np.column_stack([
                    apply_ensemble(as_method(specs[e], method), {k: v[:, i] for k, v in members.items()})
                    for i, e in enumerate(ENGAGEMENTS)])
        cols = {c: batch.column(c) for c in KEYS}
        for name, p in preds.items():
            cols.update(zip(prob_columns(name), (np.asarray(p[:, i], np.float32) for i in range(p.shape[1]))))
        return with_labels(batch, pa.table(cols), self.edges)


def _partial(batch: pa.Table, models: list[str], edges: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A block of predictions → one row: every model's ``BinaryScores`` stacked."""
    y = np.column_stack([batch.column(c).to_numpy(zero_copy_only=False) for c in IMPRESSION.labels])
    groups = batch.column("popularity_group").to_numpy(zero_copy_only=False)
    out: dict[str, list] = {"hist": [], "psum": [], "ce": []}
    for name in models:
        p = np.column_stack([np.nan_to_num(batch.column(c).to_numpy(zero_copy_only=False), nan=0.5)
                             for c in prob_columns(name)])
        s = BinaryScores(len(ENGAGEMENTS), GROUPS, edges.get(name)).add(y, p, groups)
        for key in out:
            out[key].append(getattr(s, key))
    return {key: np.stack(v)[None] for key, v in out.items()}


def score_sums(cfg: AppConfig, predictions, models: list[str], edges: dict[str, np.ndarray],
               truth_uri: str | None, log: Callable[[str], None]) -> dict[str, BinaryScores]:
    """Per model (and ``oracle`` with ``truth_uri``): the ``BinaryScores`` of a predictions dataset with
    ``with_labels`` columns, reduced block by block; the driver holds one block's sums at a time.
    ``edges``: each model's AP bins (``score_edges``; the oracle's from a sample of the truth)."""
    names, edges = list(models), dict(edges)
    if truth_uri:
        truth = (datasets.read(truth_uri, cfg.storage).select_columns(KEYS + [f"p_{e}" for e in ENGAGEMENTS])
                 .rename_columns(dict(zip([f"p_{e}" for e in ENGAGEMENTS], prob_columns(ORACLE)))))
        total = io.read_manifest(truth_uri, cfg.storage).get("rows", 0)
        edges.update(score_edges(sample_rows(truth, prob_columns(ORACLE), total), [ORACLE]))
        predictions = predictions.join(truth, "left_outer", num_partitions=max(cfg.features.blocks or 8, 1),
                                       on=tuple(KEYS))
        names.append(ORACLE)
    sums = {name: BinaryScores(len(ENGAGEMENTS), GROUPS, edges.get(name)) for name in names}
    blocks = 0
    parts = predictions.map_batches(_partial, batch_format="pyarrow", batch_size=SCORE_BATCH,
                                    fn_kwargs={"models": names, "edges": {n: sums[n].edges for n in names}})
    for part in parts.iter_batches(batch_size=1, batch_format="numpy"):
        for i, name in enumerate(names):
            s = sums[name]
            s.hist += part["hist"][0][i]
            s.psum += part["psum"][0][i]
            s.ce += part["ce"][0][i]
        blocks += 1
    log(f"impression validation: {sums[names[0]].rows} rows scored in {blocks} blocks")
    return sums


def metrics_of(s: BinaryScores, by_group: str = "mean") -> dict[str, Any]:
    """The impression metrics of one model; ``by_group="all"`` gives every group and the mean."""
    def grouped(metric: str, k: int):
        per = s.grouped(metric, k)
        return per if by_group == "all" else per["mean"]
    return {e: {"ap": s.ap(k), "ap_bounds": list(s.ap_bounds(k)), "rce": s.rce(k), "rce_by_popularity": grouped("rce", k),
                "ap_by_popularity": grouped("ap", k)} for k, e in enumerate(ENGAGEMENTS)}


def stream_scores(cfg: AppConfig, scored, models_dir: str, fit_preds: dict[str, np.ndarray], edges: np.ndarray,
                  truth_uri: str | None, log: Callable[[str], None]) -> tuple[dict[str, dict], int]:
    """Metrics of every member, both ensembles and (with ``truth_uri``) the oracle over the scored rows;
    and how many rows were scored. ``fit_preds``: each model's (n, 4) predictions of the fit rows (a
    uniform sample of the same split), whose quantiles are the AP bins; ``edges``: popularity groups."""
    import ray

    names = list(fit_preds)
    predictions = scored.map_batches(
        _MemberScorer, fn_constructor_kwargs={"models_dir": models_dir, "edges": edges.tolist()},
        # Half the CPUs at most: the oracle join's shuffle and the partial sums need the others.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors()),
        batch_size=SCORE_BATCH, batch_format="pyarrow", num_cpus=1)
    bins = {name: quantile_bin_edges(p) for name, p in fit_preds.items() if len(p)}
    sums = score_sums(cfg, predictions, names, bins, truth_uri, log)
    return {name: metrics_of(s) for name, s in sums.items()}, sums[names[0]].rows


def actors() -> int:
    """Scoring actors: half the cluster's CPUs (the join's shuffle and the partial sums need the rest)."""
    import ray

    return max(int(ray.cluster_resources().get("CPU", 2)) // 2, 1)


# --- post level: RMSE from partial sums ----------------------------------------------------------

POST_LABEL = "label_log1p_likes"
ACCOUNT_MEAN = "account_mean"  # the raw per-account training mean (the baseline, not the EB member)


def labelled(batch: pa.Table, label: str = POST_LABEL) -> pa.Table:
    """A block's posts with a label (an unlabelled post is NaN)."""
    return batch.filter(pc.invert(pc.is_nan(batch.column(label))))


def account_means(train, label: str = POST_LABEL) -> tuple[Any, float]:
    """(each account's training mean of ``label`` as a materialized Ray Dataset [author_id, account_mean],
    the global training mean): a hash-shuffled groupby, so no process holds every account."""
    from ray.data.aggregate import Count, Sum

    sums = (train.select_columns(["author_id", label]).groupby("author_id")
            .aggregate(Sum(label, alias_name="s"), Count(alias_name="n")).materialize())
    totals = sums.sum(["s", "n"]) or {}
    prior = float(totals.get("sum(s)") or 0.0) / max(float(totals.get("sum(n)") or 0), 1.0)
    means = sums.map_batches(lambda b: pa.table({"author_id": b.column("author_id"),
                                                 ACCOUNT_MEAN: pc.divide(pc.cast(b.column("s"), pa.float64()),
                                                                         pc.cast(b.column("n"), pa.float64()))}),
                             batch_format="pyarrow").materialize()
    return means, prior


def account_means_of(means, authors: list[str]) -> pl.DataFrame:
    """The [a, y] account means of ``authors`` only (the validation fit rows'), gathered into the driver."""
    wanted = pa.array(sorted(set(authors)), pa.string())
    rows = datasets.collect(means.map_batches(
        lambda b: b.filter(pc.is_in(pc.cast(b.column("author_id"), pa.string()), value_set=wanted)),
        batch_format="pyarrow"))
    return pl.DataFrame({"a": rows.column("author_id").cast(pa.string()).to_pylist(),
                         "y": rows.column(ACCOUNT_MEAN).to_numpy(zero_copy_only=False)},
                        schema={"a": pl.String, "y": pl.Float64})


def with_account_means_and_oracle(cfg: AppConfig, posts, means, truth_uri: str | None):
    """Posts (a Ray Dataset) + each one's account mean (``ACCOUNT_MEAN``) and, with ``truth_uri``, the data
    generator's expectation (``ORACLE``): two hash joins, what the training and the evaluation scorers read."""
    parts = max(cfg.features.blocks or 8, 1)
    posts = posts.join(means, "left_outer", num_partitions=parts, on=("author_id",))
    if truth_uri:
        truth = (datasets.read(truth_uri, cfg.storage).select_columns(["post_id", "expected_log1p_likes"])
                 .rename_columns({"expected_log1p_likes": ORACLE}))
        posts = posts.join(truth, "left_outer", num_partitions=parts, on=("post_id",))
    return posts


class _PostScorer:
    """One actor: the post level's saved members, what it serves, both fitted ensembles (as ``ensemble.json``
    holds them) and the two baselines → one row per model of each block: (model, squared-error sum, rows)."""

    def __init__(self, models_dir: str, prior: float):
        from engagesim.models.bundle import PostModels

        self.models, self.prior = PostModels(models_dir), prior
        spec = self.models.ensemble or {}
        self.fitted = spec.get("fitted", spec)  # what the standard-error rule set aside, if it chose

    def __call__(self, batch: pa.Table) -> pa.Table:
        y = batch.column(POST_LABEL).to_numpy(zero_copy_only=False).astype(np.float64)
        preds = self.models.predict(batch)
        members = {k: v for k, v in preds.items() if k != "ensemble"}
        if len(members) >= 2 and all(m in members for m in self.fitted.get("members", [None])):
            for method in ("loss_weighted", "stacked"):
                preds[f"ensemble_{method}"] = apply_ensemble(as_method(self.fitted, method), members)
        account = batch.column(ACCOUNT_MEAN).to_numpy(zero_copy_only=False) if ACCOUNT_MEAN in batch.column_names \
            else np.full(len(y), np.nan)
        preds["global_mean"] = np.full(len(y), self.prior)
        preds["account_mean"] = np.where(np.isnan(account.astype(np.float64)), self.prior, account)
        if ORACLE in batch.column_names:
            preds[ORACLE] = batch.column(ORACLE).to_numpy(zero_copy_only=False)
        names = list(preds)
        sse = [float(np.sum((y - np.asarray(preds[n], np.float64)) ** 2)) for n in names]
        return pa.table({"model": names, "sse": sse, "n": [len(y)] * len(names)})


def stream_post_scores(cfg: AppConfig, scored, models_dir: str, means, prior: float, truth_uri: str | None,
                       log: Callable[[str], None]) -> tuple[dict[str, float], int]:
    """RMSE over the scored validation posts of every member, the served ensemble (``ensemble``), the two
    fitted ones (``ensemble_loss_weighted``, ``ensemble_stacked``), the global and account-mean baselines
    and (``truth_uri``) the oracle; exact, from squared-error sums. The account means reach the rows through
    Ray Data's hash join, as the oracle's expectation does."""
    import ray

    scored = with_account_means_and_oracle(cfg, scored, means, truth_uri)
    sums = scored.map_batches(_PostScorer, fn_constructor_kwargs={"models_dir": models_dir, "prior": prior},
                              compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors()),
                              batch_size=SCORE_BATCH, batch_format="pyarrow", num_cpus=1)
    sse: dict[str, float] = {}
    rows: dict[str, int] = {}
    for part in sums.iter_batches(batch_format="pyarrow", batch_size=None):
        for name, e, n in zip(part.column("model").to_pylist(), part.column("sse").to_pylist(),
                              part.column("n").to_pylist()):
            sse[name], rows[name] = sse.get(name, 0.0) + e, rows.get(name, 0) + n
    scored_rows = max(rows.values(), default=0)
    log(f"post validation: {scored_rows} posts scored")
    return {name: float(np.sqrt(sse[name] / max(rows[name], 1))) for name in sse}, scored_rows
