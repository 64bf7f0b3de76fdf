"""The impression level's validation split when it streams: a bounded fit sample in the driver, metrics
over the rest from partial sums on Ray Data.

Above ``train.stream_rows`` the validation split is as large as the log's latest days (at 40M impressions,
millions of rows × 160 columns), too large for the driver. It is cut in two by a hash of (user, post,
impression time), the same rows in every pass:

- **fit rows** (at most ``train.valid_fit_rows``, gathered into the driver): XGBoost's and the NN's early
  stopping, the ensemble's loss weights and its stacker;
- **scored rows** (all the others, never gathered): an actor pool loads the saved members once per
  actor and predicts block by block; each block becomes a ``BinaryScores`` (cross-entropy sums and
  per-bin counts) per model, summed in the driver. RCE is exact, AP within 5e-4 (``metrics.AP_BINS``).

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

from engagesim import datasets
from engagesim.config import AppConfig
from engagesim.metrics import BinaryScores, popularity_groups
from engagesim.models.bundle import ImpressionModels, apply_ensemble
from engagesim.models.data import label_matrix
from engagesim.models.family import IMPRESSION
from engagesim.schema import ENGAGEMENTS

KEYS = ["user_id", "post_id", "impression_at"]
GROUPS = 5  # creator follower quintiles, as the in-memory scorer
SCORE_BATCH = 100_000
ORACLE = "oracle"


def is_fit_row(batch: pa.Table, fraction: float, seed: int) -> pa.Array:
    """Whether each row belongs to the fit rows: a hash of its keys, independent of block boundaries."""
    u = pl.from_arrow(batch.select(KEYS)).select(pl.struct(KEYS).hash(seed + 1) / float(2 ** 64)).to_series()
    return (u < fraction).to_arrow()


def _part(batch: pa.Table, split: str, fraction: float | None = None, seed: int = 0, fit: bool = True) -> pa.Table:
    batch = batch.filter(pc.equal(batch.column("split"), split))
    if fraction is None:
        return batch
    mask = is_fit_row(batch, fraction, seed)
    return batch.filter(mask if fit else pc.invert(mask))


def _count_valid(batch: pa.Table) -> dict[str, np.ndarray]:
    return {"n": np.array([int(pc.sum(pc.equal(batch.column("split"), "valid")).as_py() or 0)])}


def fit_fraction(valid_rows: int, fit_rows: int) -> float:
    """The share of validation rows kept for fitting: ``fit_rows`` of them, never more than half."""
    return min(0.5, fit_rows / max(valid_rows, 1))


def split_valid(ds, fit_rows: int, seed: int) -> tuple[pa.Table, Any, int]:
    """(fit rows in the driver, scored rows as a Ray Dataset, all validation rows) of a feature dataset."""
    valid_rows = int(ds.select_columns(["split"]).map_batches(_count_valid, batch_format="pyarrow").sum("n") or 0)
    fraction = fit_fraction(valid_rows, fit_rows)
    fit = datasets.collect(ds.map_batches(_part, batch_format="pyarrow",
                                          fn_kwargs={"split": "valid", "fraction": fraction, "seed": seed}))
    scored = ds.map_batches(_part, batch_format="pyarrow",
                            fn_kwargs={"split": "valid", "fraction": fraction, "seed": seed, "fit": False})
    return fit, scored, valid_rows


class _Scorer:
    """One actor: this level's saved members and ensembles → per-row probabilities, narrow."""

    def __init__(self, models_dir: str, edges: list[float]):
        self.models = ImpressionModels(models_dir)
        self.edges = np.asarray(edges)

    def __call__(self, batch: pa.Table) -> pa.Table:
        preds = self.models.member_predictions(batch)
        specs = (self.models.ensemble or {}).get("engagements", {})
        if len(preds) >= 2 and specs:
            for method in ("loss_weighted", "stacked"):
                preds[f"ensemble_{method}"] = np.column_stack([
                    apply_ensemble({**specs[e], "method": method}, {k: v[:, i] for k, v in preds.items()
                                                                     if not k.startswith("ensemble_")})
                    for i, e in enumerate(ENGAGEMENTS)])
        follower = np.nan_to_num(batch.column("creator_follower_count").to_numpy(zero_copy_only=False))
        out = {c: batch.column(c) for c in KEYS}
        out["_group"] = pa.array(popularity_groups(follower, self.edges).astype(np.int8))
        y = label_matrix(batch, IMPRESSION.labels)
        for i, e in enumerate(ENGAGEMENTS):
            out[f"_y_{e}"] = pa.array(y[:, i])
            for name, p in preds.items():
                out[f"{name}/{e}"] = pa.array(np.asarray(p[:, i], np.float32))
        return pa.table(out)


def _partial(batch: pa.Table, models: list[str]) -> dict[str, np.ndarray]:
    """A block of narrow predictions → one row: every model's ``BinaryScores`` stacked."""
    y = np.column_stack([batch.column(f"_y_{e}").to_numpy(zero_copy_only=False) for e in ENGAGEMENTS])
    groups = batch.column("_group").to_numpy(zero_copy_only=False)
    hist, ce = [], []
    for name in models:
        p = np.column_stack([np.nan_to_num(batch.column(f"{name}/{e}").to_numpy(zero_copy_only=False), nan=0.5)
                             for e in ENGAGEMENTS])
        s = BinaryScores(len(ENGAGEMENTS), GROUPS).add(y, p, groups)
        hist.append(s.hist)
        ce.append(s.ce)
    return {"hist": np.stack(hist)[None], "ce": np.stack(ce)[None]}


def _metrics(s: BinaryScores) -> dict[str, Any]:
    return {e: {"ap": s.ap(k), "rce": s.rce(k), "rce_by_popularity": s.by_group("rce", k),
                "ap_by_popularity": s.by_group("ap", k)} for k, e in enumerate(ENGAGEMENTS)}


def stream_scores(cfg: AppConfig, scored, models_dir: str, members: list[str], edges: np.ndarray,
                  truth_uri: str | None, log: Callable[[str], None]) -> tuple[dict[str, dict], int]:
    """Metrics of every member, both ensembles and (with ``truth_uri``) the oracle over the scored rows;
    and how many rows were scored."""
    import ray

    names = list(members) + (["ensemble_loss_weighted", "ensemble_stacked"] if len(members) >= 2 else [])
    narrow = scored.map_batches(
        _Scorer, fn_constructor_kwargs={"models_dir": models_dir, "edges": edges.tolist()},
        # Half the CPUs at most: the oracle join's shuffle and the partial sums need the others.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(int(ray.cluster_resources().get("CPU", 2)) // 2, 1)),
        batch_size=SCORE_BATCH, batch_format="pyarrow", num_cpus=1)
    if truth_uri:
        truth = (datasets.read(truth_uri, cfg.storage).select_columns(KEYS + [f"p_{e}" for e in ENGAGEMENTS])
                 .rename_columns({f"p_{e}": f"{ORACLE}/{e}" for e in ENGAGEMENTS}))
        narrow = narrow.join(truth, "left_outer", num_partitions=max(cfg.features.blocks or 8, 1), on=tuple(KEYS))
        names.append(ORACLE)
    sums = [BinaryScores(len(ENGAGEMENTS), GROUPS) for _ in names]
    blocks = 0
    for part in narrow.map_batches(_partial, batch_format="pyarrow", batch_size=SCORE_BATCH,
                                   fn_kwargs={"models": names}).iter_batches(batch_size=1, batch_format="numpy"):
        for s, hist, ce in zip(sums, part["hist"][0], part["ce"][0]):
            s.hist += hist
            s.ce += ce
        blocks += 1
    rows = int(sums[0].hist[0, GROUPS].sum())
    log(f"impression validation: {rows} scored rows in {blocks} blocks")
    return {name: _metrics(s) for name, s in zip(names, sums)}, rows
