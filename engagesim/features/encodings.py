"""Encodings: one-hot, target encoding (LAYER6), Fourier features (Synerise), signed log.

Target encoding is where leakage hides. Two leak-free modes:

- ``oof``: rows are split into K contiguous *time* folds; a row's value comes
  only from the other folds' labels (out-of-fold), never its own.
- ``past``: a row's value comes only from rows strictly earlier in time
  (forward-in-time validation; the mode to use for serving-like evaluation).

Rows scored later (validation, test, serving) use ``fit`` statistics from all
training rows. Smoothing pulls rare keys to the global prior:
TE = (sum + prior·m) / (count + m). With ``m = "auto"`` the pseudo-count is the
empirical-Bayes one, estimated per key column from the training rows
(``empirical_bayes_smoothing``): a fixed m = 5 shrank authors with 27 posts 16 %
towards the global mean, although author means differ far more than single
posts scatter; on a 50k-post world post-level RMSE went from 0.847 to 0.809.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

Mode = Literal["oof", "past"]


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """sign(x)·log1p(|x|): tames heavy-tailed counts but keeps sign and zero."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.log1p(np.abs(x))


def fourier_features(x: np.ndarray, scales: int = 8) -> np.ndarray:
    """Synerise's Fourier feature encoding: [sin(x / 2^s), cos(x / 2^s)] for s = 0..scales-1.

    Returns shape (n, 2·scales). Large scales vary slowly (coarse magnitude),
    small ones fast (fine detail), so an MLP can read both.
    """
    x = np.asarray(x, dtype=np.float64)[:, None] / (2.0 ** np.arange(scales))[None, :]
    return np.concatenate([np.sin(x), np.cos(x)], axis=1).astype(np.float32)


def one_hot(values: pl.Series, categories: list[str], prefix: str) -> pl.DataFrame:
    """One column per known category (``prefix=value``); unknown values are all zeros."""
    from engagesim.features.text import FEW_ROWS  # the served-request paths' one bound

    if len(values) <= FEW_ROWS and values.dtype == pl.String and categories:
        given = values.to_list()  # a served post: 0.05 ms where the select of 20 expressions cost ~0.3
        return pl.DataFrame([pl.Series(f"{prefix}={c}", [int(v == c) for v in given], dtype=pl.Int8)
                             for c in categories])
    return values.to_frame("_v").select(  # one pass (a served row: ~0.1 ms, where a Series op per category cost 1.3)
        (pl.col("_v") == c).fill_null(False).cast(pl.Int8).alias(f"{prefix}={c}") for c in categories)


@dataclass
class TargetStats:
    """Per-key label sums and counts from training rows, plus the prior."""

    key: str
    table: pl.DataFrame  # key, te_sum, te_count
    prior: float
    smoothing: float

    def apply(self, keys: pl.Series) -> np.ndarray:
        return self.apply_counted(keys)[0]

    def apply_counted(self, keys: pl.Series | list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each key's smoothed mean, how many labelled rows it stands on (0: the prior alone) and their sum.
        ``keys`` as a list: a served post's few keys (``post_fit.key_rows(..., as_list=True)``)."""
        from engagesim.features.lookup import lookup_columns, lookup_values

        fill = {"te_sum": 0.0, "te_count": 0.0}
        got = (lookup_values(self.table, self.key, keys, ["te_sum", "te_count"], fill) if isinstance(keys, list)
               else lookup_columns(self.table, self.key, keys.alias(self.key).to_frame(), ["te_sum", "te_count"], fill))
        s, c = got["te_sum"], got["te_count"]
        return (s + self.prior * self.smoothing) / (c + self.smoothing), c, s


Smoothing = float | Literal["auto"]


def empirical_bayes_smoothing(keys: pl.Series, target: np.ndarray, max_smoothing: float = 1000.0) -> float:
    """The pseudo-count m = σ²_within / σ²_between of a normal–normal model, by the method of moments.

    σ²_within is the pooled variance of rows around their key's mean; σ²_between the variance of
    key means less the part their sampling noise explains. The posterior mean of a key with n rows
    is then exactly (sum + prior·m) / (n + m). Keys seen once carry no within-key information.
    """
    y = np.asarray(target, dtype=np.float64)
    per = pl.DataFrame({"k": keys, "y": y, "yy": y * y}).group_by("k").agg(
        pl.len().cast(pl.Float64).alias("n"), pl.col("y").sum().alias("s"), pl.col("yy").sum().alias("ss"))
    return empirical_bayes_from_sums(per["n"].to_numpy(), per["s"].to_numpy(), per["ss"].to_numpy(), max_smoothing)


def empirical_bayes_from_sums(n: np.ndarray, s: np.ndarray, ss: np.ndarray, max_smoothing: float = 1000.0) -> float:
    """``empirical_bayes_smoothing`` from per-key count, Σy and Σy² — what partial fits combine to."""
    multi = n >= 2
    if multi.sum() < 2:
        return max_smoothing
    n, s, ss = n[multi], s[multi], ss[multi]
    within = float(np.sum(np.maximum(ss - s * s / n, 0.0)) / np.sum(n - 1))
    between = float(np.var(s / n, ddof=1) - np.mean(within / n))
    if between <= 0:
        return max_smoothing
    return float(min(within / between, max_smoothing))


def resolve_smoothing(smoothing: Smoothing, keys: pl.Series, target: np.ndarray) -> float:
    return empirical_bayes_smoothing(keys, target) if smoothing == "auto" else float(smoothing)


def fit_target_stats(keys: pl.Series, target: np.ndarray, smoothing: Smoothing = 20.0) -> TargetStats:
    """Per-key sums and counts; ``smoothing="auto"`` resolves to the empirical-Bayes pseudo-count."""
    name = keys.name or "key"
    smoothing = resolve_smoothing(smoothing, keys, target)
    df = pl.DataFrame({name: keys, "y": np.asarray(target, dtype=np.float64)})
    table = df.group_by(name).agg(pl.col("y").sum().alias("te_sum"), pl.len().cast(pl.Float64).alias("te_count"))
    return TargetStats(name, table, float(np.mean(target)) if len(target) else 0.0, smoothing)


def time_folds(times: np.ndarray, k: int) -> np.ndarray:
    """Fold id 0..k-1 by time rank: contiguous periods, so a fold is a slice of time."""
    order = np.argsort(np.asarray(times), kind="stable")
    folds = np.empty(len(order), dtype=np.int64)
    folds[order] = np.arange(len(order)) * k // max(len(order), 1)
    return folds


def target_encode_train(
    keys: pl.Series,
    target: np.ndarray,
    times: np.ndarray,
    mode: Mode = "oof",
    folds: int = 5,
    smoothing: float = 20.0,
    with_counts: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Target encoding of training rows in which no row ever sees its own label (``with_counts``: and the
    number of labelled rows each value stands on, and their sum)."""
    target = np.asarray(target, dtype=np.float64)
    name = keys.name or "key"
    if mode == "oof":
        fold = time_folds(times, folds)
        df = pl.DataFrame({name: keys, "y": target, "fold": fold})
        per = df.group_by(name, "fold").agg(pl.col("y").sum().alias("s"), pl.len().alias("c"))
        tot = per.group_by(name).agg(pl.col("s").sum().alias("S"), pl.col("c").sum().alias("C"))
        joined = (
            df.with_row_index("_i")
            .join(per, on=[name, "fold"], how="left")
            .join(tot, on=name, how="left")
            .sort("_i")
        )
        s = (joined["S"] - joined["s"]).to_numpy().astype(float)
        c = (joined["C"] - joined["c"]).to_numpy().astype(float)
        # The prior, too, comes from the other folds only: a global mean would carry the row's own label.
        fold_sum = np.bincount(fold, weights=target, minlength=folds)
        fold_n = np.bincount(fold, minlength=folds).astype(float)
        prior = ((target.sum() - fold_sum) / np.maximum(len(target) - fold_n, 1))[fold]
        values = (s + prior * smoothing) / (c + smoothing)
        return (values, c, s) if with_counts else values
    if mode == "past":
        df = pl.DataFrame({name: keys, "y": target, "t": np.asarray(times)}).with_row_index("_i")
        # Rows at the same instant must not see each other: aggregate per (key, t) first.
        per_t = df.group_by(name, "t").agg(pl.col("y").sum().alias("s"), pl.len().alias("c")).sort(name, "t")
        per_t = per_t.with_columns(
            (pl.col("s").cum_sum().over(name) - pl.col("s")).alias("S"),
            (pl.col("c").cum_sum().over(name) - pl.col("c")).alias("C"),
        )
        joined = df.join(per_t.select(name, "t", "S", "C"), on=[name, "t"], how="left").sort("_i")
        s, c = joined["S"].to_numpy().astype(float), joined["C"].to_numpy().astype(float)
        # Prior: the mean of every strictly earlier row (0 before the first).
        by_t = pl.DataFrame({"t": np.asarray(times), "y": target}).group_by("t").agg(
            pl.col("y").sum().alias("s"), pl.len().alias("c")).sort("t").with_columns(
            (pl.col("s").cum_sum() - pl.col("s")).alias("S"), (pl.col("c").cum_sum() - pl.col("c")).alias("C"))
        prior_t = pl.DataFrame({"t": np.asarray(times)}).join(by_t, on="t", how="left", maintain_order="left")
        prior = (prior_t["S"] / prior_t["C"].clip(lower_bound=1)).to_numpy().astype(float)
        values = (s + prior * smoothing) / (c + smoothing)
        return (values, c, s) if with_counts else values
    raise ValueError(f"target encoding mode must be 'oof' or 'past', not {mode!r}")


def list_te_summary(row_ids: np.ndarray, values: np.ndarray, n_rows: int, prior: float, top: int = 3) -> np.ndarray:
    """Per row from the TE values of its list elements: top-3 values (padded with the prior), sum, mean, count.

    ``row_ids`` says which row each element belongs to (the exploded list). Shape (n_rows, top + 3).
    numpy (a sort by row then value, and bincounts): a served post's few hashtags cost µs where a polars
    group-by cost ~0.5 ms, and a block's millions of elements sort in well under a second.
    """
    out = np.zeros((n_rows, top + 3), dtype=np.float32)
    out[:, :top] = prior
    if len(values):
        r, v = np.asarray(row_ids, dtype=np.int64), np.asarray(values, dtype=np.float64)
        by_value = np.argsort(-v, kind="stable")  # by row, then the largest value first: two stable sorts
        order = by_value[np.argsort(r[by_value], kind="stable")]  # (the integer one is a radix sort)
        rs, vs = r[order], v[order]
        rank = np.arange(len(rs)) - np.searchsorted(rs, rs, side="left")
        first = rank < top
        out[rs[first], rank[first]] = vs[first]
        n = np.bincount(r, minlength=n_rows)
        s = np.bincount(r, weights=v, minlength=n_rows)
        has = n > 0
        out[has, top] = s[has]
        out[has, top + 1] = s[has] / n[has]
        out[has, top + 2] = n[has]
    return out
