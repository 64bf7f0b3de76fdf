"""The post state as partial fits: per block ``*_partial`` → combined by key → finalized.

The post state's ops (``features/post_ops.py``, ``features/embedding_ops.py``) are built on these functions, and
both executors run those ops: the in-process one (``pipeline/post_plane.build_post_features``, tests, the
benchmark's baseline) on the whole frame as a single block; the Ray one (``pipeline/post_plane.fit_on_ray``)
over Ray Data blocks, combining the parts with a hash shuffle or folding them.
So the fitted state is the same whichever executor ran, up to float summation order (≤ 1e-9 here).

- **Split and time folds**: the latest ``valid_fraction`` of posts by (created_at, post_id) are held out —
  the earlier part validates (early stopping, stacking, tuning), the latest ``test_share`` of them is the
  untouched test split every command reports — and the training posts form ``te_folds`` contiguous time folds. Both are cut by the keys at a few global ranks
  (``PostSplit``), found exactly from a time histogram and the few rows of the buckets that hold them.
- **Target encodings**: per (column, key, fold) sums of y, y² and counts (``te_partial``). The apply
  version sums over folds, the out-of-fold one subtracts the row's own fold; the empirical-Bayes
  pseudo-count comes from the per-key sums (``encodings.empirical_bayes_from_sums``). A list element
  (hashtag, domain) takes its post's fold.
- **PCA** from the moments n, Σx, Σxxᵀ (``moments_partial``, ``Projection.from_moments``).
- **Text clusters**: k-means on a bounded sample of training posts, chosen by a hash of post_id.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from engagesim.features import encodings
from engagesim.features.text import FEW_ROWS  # one "few rows" bound for the served-request paths

TE_SCALAR = ["author_id", "company", "language"]
TE_LIST = ["hashtags", "domains"]

# Keys whose encoding also says how many labelled posts it stands on (``te_<key>_n``). Training rows see
# out-of-fold (or earlier) posts only, so a sparse account's training rows carry the prior where serving has
# its mean: with the count, trees learn how far to trust the mean instead of learning to ignore it.
TE_COUNTED = ["author_id", "company"]
LIST_SUMMARY = ["top1", "top2", "top3", "sum", "mean", "count"]
KMEANS_SAMPLE = 50_000  # posts k-means sees at most (24 clusters × 384 dims fit in seconds; quality flat above)
HIST_BINS = 1 << 16


def order_keys(df: pl.DataFrame) -> pl.DataFrame:
    """(t µs, post_id): the total order of posts the split and folds follow."""
    return df.select(pl.col("created_at").dt.epoch("us").alias("t"), pl.col("post_id").cast(pl.String))


def _at_or_after(keys: pl.DataFrame, key: tuple[int, str] | None) -> np.ndarray:
    if key is None:
        return np.zeros(keys.height, dtype=bool)
    t, pid = key
    return ((keys["t"] > t) | ((keys["t"] == t) & (keys["post_id"] >= pid))).to_numpy()


@dataclass
class PostSplit:
    """Where validation and test start and each training fold begins, as (t µs, post_id) keys (None: never)."""

    rows: int
    train_rows: int
    test_rows: int
    cut: tuple[int, str] | None
    test_cut: tuple[int, str] | None
    folds: list[tuple[int, str] | None]

    @staticmethod
    def ranks(rows: int, valid_fraction: float, test_share: float, folds: int) -> tuple[int, int, list[int]]:
        """(rank of the first held-out post, of the first test post, of the first post of folds 1..k-1)."""
        cut = int(np.floor(rows * (1 - valid_fraction)))
        test = cut + int(np.floor((rows - cut) * (1 - test_share)))
        return cut, test, [math.ceil(j * cut / folds) for j in range(1, folds)]

    @classmethod
    def from_keys(cls, rows: int, ranks: tuple[int, int, list[int]], keys: dict[int, tuple[int, str]]) -> PostSplit:
        cut, test, fold_ranks = ranks
        return cls(rows, cut, rows - test, keys.get(cut), keys.get(test), [keys.get(r) for r in fold_ranks])

    @classmethod
    def of_frame(cls, df: pl.DataFrame, valid_fraction: float, test_share: float, folds: int) -> PostSplit:
        """The in-process executor: one sort."""
        keys = order_keys(df).sort("t", "post_id")
        ranks = cls.ranks(keys.height, valid_fraction, test_share, folds)
        at = {r: (int(keys["t"][r]), keys["post_id"][r]) for r in {ranks[0], ranks[1], *ranks[2]} if r < keys.height}
        return cls.from_keys(keys.height, ranks, at)

    def is_train(self, df: pl.DataFrame) -> np.ndarray:
        return ~_at_or_after(order_keys(df), self.cut)

    def labels(self, df: pl.DataFrame) -> np.ndarray:
        """"train" / "valid" / "test" per row."""
        keys = order_keys(df)
        held, test = _at_or_after(keys, self.cut), _at_or_after(keys, self.test_cut)
        return np.where(test, "test", np.where(held, "valid", "train"))

    def fold(self, df: pl.DataFrame) -> np.ndarray:
        """Time fold 0..k-1 of training posts (a validation post gets the last)."""
        keys = order_keys(df)
        return sum((_at_or_after(keys, k).astype(np.int64) for k in self.folds), np.zeros(df.height, np.int64))


# --- exact rank keys from a histogram (the Ray executor; the in-process one sorts) -------------

def time_histogram(df: pl.DataFrame, lo: int, width: int, bins: int = HIST_BINS) -> np.ndarray:
    b = np.minimum((order_keys(df)["t"].to_numpy() - lo) // width, bins - 1)
    return np.bincount(b, minlength=bins)


def locate(hist: np.ndarray, ranks: list[int]) -> dict[int, tuple[int, int]]:
    """rank → (bucket, rank within the bucket), for ranks inside the table."""
    ends = np.cumsum(hist)
    out = {}
    for r in ranks:
        if r < ends[-1]:
            b = int(np.searchsorted(ends, r, side="right"))
            out[r] = (b, r - int(ends[b - 1] if b else 0))
    return out


def bucket_rows(df: pl.DataFrame, lo: int, width: int, buckets: list[int], bins: int = HIST_BINS) -> pl.DataFrame:
    keys = order_keys(df)
    b = np.minimum((keys["t"].to_numpy() - lo) // width, bins - 1)
    return keys.with_columns(pl.Series("bucket", b)).filter(pl.col("bucket").is_in(buckets))


def keys_in_buckets(rows: pl.DataFrame, where: dict[int, tuple[int, int]]) -> dict[int, tuple[int, str]]:
    out = {}
    for rank, (bucket, within) in where.items():
        ordered = rows.filter(pl.col("bucket") == bucket).sort("t", "post_id")
        out[rank] = (int(ordered["t"][within]), ordered["post_id"][within])
    return out


# --- target encodings --------------------------------------------------------------------------

def key_rows(df: pl.DataFrame, column: str, as_list: bool = False) -> tuple[np.ndarray, pl.Series | list[str]]:
    """(row of each key, the keys): one per row for scalar columns (null → "<none>"), one per list element.
    ``as_list``: a few rows' keys as a Python list (what ``TargetStats.apply_counted`` looks up by index)."""
    values = df.get_column(column)
    if column in TE_SCALAR:
        if df.height <= FEW_ROWS and values.dtype == pl.String:  # a served post: no expression (~0.2 ms each)
            keys = ["<none>" if v is None else v for v in values.to_list()]
            return np.arange(df.height), keys if as_list else pl.Series(column, keys, dtype=pl.String)
        return np.arange(df.height), values.fill_null("<none>").cast(pl.String)
    if df.height <= FEW_ROWS and values.dtype == pl.List(pl.String):  # a served post: no explode
        rows, keys = [], []
        for i, elements in enumerate(values.to_list()):
            for e in elements or ():
                if e is not None:
                    rows.append(i)
                    keys.append(e)
        return np.array(rows, dtype=np.int64), keys if as_list else pl.Series(column, keys, dtype=pl.String)
    exploded = df.select(pl.int_range(pl.len()).alias("row"), pl.col(column)).explode(column).drop_nulls(column)
    return exploded["row"].to_numpy(), exploded[column].cast(pl.String)


HELD_OUT = -1  # the fold of a labelled validation / test row in ``te_partial``: it counts in the latest snapshot only


def te_partial(df: pl.DataFrame, y: np.ndarray, train: np.ndarray, fold: np.ndarray,
               labelled: np.ndarray | None = None) -> pl.DataFrame:
    """One block's training rows → (column, key, fold, s, ss, c); with ``labelled``, its labelled held-out
    rows too, under fold ``HELD_OUT`` (what ``latest_stats`` adds to the training sums)."""
    parts = []
    rows = train if labelled is None else train | labelled
    sub, y, fold = df.filter(pl.Series(rows)), y[rows], np.where(train, fold, HELD_OUT)[rows]
    for column in TE_SCALAR + TE_LIST:
        rows, keys = key_rows(sub, column)
        v = y[rows]
        parts.append(pl.DataFrame({"column": pl.Series([column] * len(rows), dtype=pl.String), "key": keys,
                                   "fold": fold[rows].astype(np.int32), "s": v, "ss": v * v,
                                   "c": np.ones(len(rows), np.float64)}))
    return combine_te(pl.concat(parts))


def combine_te(parts: pl.DataFrame) -> pl.DataFrame:
    return parts.group_by("column", "key", "fold").agg(pl.col("s", "ss", "c").sum())


def training_sums(te: pl.DataFrame) -> pl.DataFrame:
    """The training rows' (column, key, fold) sums of a ``te_partial`` that may hold held-out rows."""
    return te.filter(pl.col("fold") != HELD_OUT)


def latest_stats(te: pl.DataFrame, cutoff: dict[str, encodings.TargetStats]) -> dict[str, encodings.TargetStats]:
    """The served snapshot's target encodings: every labelled row's sums (training, validation and test), with
    the pseudo-count the training rows estimated (the models learnt the encodings' scale under it).

    Why: the cutoff stats end where training ends, so an account whose few posts all fall in the held-out
    latest 20 % is served the global prior. On the Adobe later-period split thinned to 1–3 posts an account,
    that made the account-mean member 2.06 RMSE where the raw account mean was 1.14 (docs/evaluation.md)."""
    out = {}
    for column, stats in cutoff.items():
        per_key = te.filter(pl.col("column") == column).group_by("key").agg(pl.col("s", "c").sum())
        n = float(per_key["c"].sum() or 0)
        table = per_key.select(pl.col("key").alias(column), pl.col("s").alias("te_sum"), pl.col("c").alias("te_count"))
        out[column] = encodings.TargetStats(column, table, float(per_key["s"].sum() or 0) / n if n else stats.prior,
                                            stats.smoothing)
    return out


@dataclass
class TargetTables:
    """The combined (column, key, fold) sums, finalized: per column the apply stats and the fold totals."""

    folds: pl.DataFrame  # column, key, fold, s, c (training rows only)
    stats: dict[str, encodings.TargetStats]
    hier_smoothing: float = 1000.0  # pseudo-count of an account's mean towards its company's (te_author_id_hier)

    @classmethod
    def fit(cls, combined: pl.DataFrame, smoothing: encodings.Smoothing) -> TargetTables:
        stats = {}
        for column in TE_SCALAR + TE_LIST:
            rows = combined.filter(pl.col("column") == column)
            per_key = rows.group_by("key").agg(pl.col("s", "ss", "c").sum())
            m = (encodings.empirical_bayes_from_sums(per_key["c"].to_numpy(), per_key["s"].to_numpy(),
                                                     per_key["ss"].to_numpy())
                 if smoothing == "auto" else float(smoothing))
            n = float(per_key["c"].sum() or 0)
            table = per_key.select(pl.col("key").alias(column), pl.col("s").alias("te_sum"),
                                   pl.col("c").alias("te_count"))
            stats[column] = encodings.TargetStats(column, table, float(per_key["s"].sum() or 0) / n if n else 0.0, m)
        # Accounts towards their company with the accounts' own pseudo-count. Accounts vary less around their
        # company than around the global mean, so the optimal one is larger; estimating it needs the
        # account → company pairs, which the (column, key) sums do not keep. Subtracting the companies'
        # between-variance (total variance) overshot: m hit its cap and served the company mean alone (1.23 RMSE
        # on the thinned split against 1.10 with the accounts' m; 1.01–1.05 at m = 1–2 there, but 1.05 vs 0.96
        # on the 2,355-post sample: the accounts' m is the safe side).
        return cls(combined.select("column", "key", "fold", "s", "c"), stats, stats["author_id"].smoothing)

    def out_of_fold(self, column: str, keys: pl.Series, fold: np.ndarray, folds: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Training rows' values — the key's sums and the prior from the other folds only — their counts and sums."""
        own = self.folds.filter(pl.col("column") == column)
        by_fold = own.group_by("fold").agg(pl.col("s", "c").sum())
        fs, fc = np.zeros(folds), np.zeros(folds)
        fs[by_fold["fold"].to_numpy()] = by_fold["s"].to_numpy()
        fc[by_fold["fold"].to_numpy()] = by_fold["c"].to_numpy()
        prior = ((fs.sum() - fs) / np.maximum(fc.sum() - fc, 1))[fold]
        stats = self.stats[column]
        rows = pl.DataFrame({"key": keys, "fold": fold.astype(np.int32)}).with_row_index("_i")
        totals = stats.table.rename({column: "key"})
        joined = (rows.join(totals, on="key", how="left")
                  .join(own.select("key", "fold", pl.col("s").alias("fs"), pl.col("c").alias("fc")),
                        on=["key", "fold"], how="left").sort("_i"))
        s = (joined["te_sum"].fill_null(0) - joined["fs"].fill_null(0)).to_numpy()
        c = (joined["te_count"].fill_null(0) - joined["fc"].fill_null(0)).to_numpy()
        m = stats.smoothing
        return (s + prior * m) / (c + m), c, s


def oof_encodings(df: pl.DataFrame, train: np.ndarray, fold: np.ndarray, tables: TargetTables, folds: int,
                  prior: float) -> pl.DataFrame:
    """Out-of-fold target-encoding columns of a block's training rows (row-aligned with those rows)."""
    fold = fold[train]
    return te_columns(df.filter(pl.Series(train)), prior,
                      lambda column, rows, keys: tables.out_of_fold(column, keys, fold[rows], folds),
                      tables.hier_smoothing)


Encode = Callable[[str, np.ndarray, pl.Series], tuple[np.ndarray, np.ndarray]]


def te_columns(sub: pl.DataFrame, prior: float, encode: Encode, hier_smoothing: float | None) -> pl.DataFrame:
    """The target-encoding columns of ``sub``'s rows: ``encode(column, rows, keys)`` gives one (value, count,
    sum) per key (``key_rows``); scalar columns take the value as is (and ``TE_COUNTED`` ones the count, as
    ``te_<column>_n``), list columns are summarised per row (``LIST_SUMMARY``); then ``te_author_id_hier``
    (``hierarchical``). The apply-time twin is ``PostState._target_encodings``: both make the same columns."""
    cols: dict[str, np.ndarray] = {}
    author = None
    for column in TE_SCALAR + TE_LIST:
        rows, keys = key_rows(sub, column)
        values, counts, sums = encode(column, rows, keys) if len(rows) else (np.zeros(0),) * 3
        values = np.asarray(values, dtype=np.float64)
        if column in TE_SCALAR:
            cols[f"te_{column}"] = values.astype(np.float32)
            if column in TE_COUNTED:
                cols[f"te_{column}_n"] = np.asarray(counts, dtype=np.float32)
            if column == "author_id":
                author = (np.asarray(sums, np.float64), np.asarray(counts, np.float64))
            continue
        summary = encodings.list_te_summary(rows, values, sub.height, prior)
        for k, name in enumerate(LIST_SUMMARY):
            cols[f"te_{column}_{name}"] = summary[:, k]
    if hier_smoothing is not None:
        cols["te_author_id_hier"] = hierarchical(*author, cols["te_company"], hier_smoothing)
    return pl.DataFrame(cols)


def hierarchical(sums: np.ndarray, counts: np.ndarray, company: np.ndarray, smoothing: float) -> np.ndarray:
    """An account's mean shrunk towards its company's encoding (itself shrunk towards the global mean), not
    towards the global mean: account → company → global. A new account gets its company's value.

    Why: on the Adobe splits an account's few posts pulled towards its brand's mean predict its later posts
    better than its raw mean or the mean pulled to the global one — RMSE of the raw account mean → this, with
    the accounts' own pseudo-count: company file later period 1.11 → 1.03, its accounts thinned to 1–3 posts
    1.14 → 1.12, the 2,355-post sample's later period 1.52 → 1.13 (jobs/evaluation.py's splits)."""
    return ((sums + smoothing * company.astype(np.float64)) / (counts + smoothing)).astype(np.float32)


# --- the ops' settings, PCA moments, the k-means sample ------------------------------------------

@dataclass(frozen=True)
class PostOptions:
    """The settings a post state is fit with (``features.te_smoothing``, ``embed.pca_components``,
    ``features.text_clusters``, ``features.te_mode`` / ``te_folds``, ``features.reach_exposure_hours``)."""

    smoothing: encodings.Smoothing
    pca_components: int
    text_clusters: int
    te_mode: str = "oof"
    te_folds: int = 5
    reach_exposure_hours: float = 0.0

    @classmethod
    def of(cls, cfg) -> PostOptions:
        f = cfg.features
        return cls(f.te_smoothing, cfg.embed.pca_components, f.text_clusters, f.te_mode, f.te_folds,
                   f.reach_exposure_hours)


def moments_partial(x: np.ndarray) -> dict[str, np.ndarray]:
    x = x.astype(np.float64)
    return {"n": np.array([len(x)], np.float64), "sum": x.sum(0), "outer": x.T @ x}


def in_kmeans_sample(df: pl.DataFrame, fraction: float, seed: int = 0) -> np.ndarray:
    """Whether each post is in the k-means sample: a hash of its id, so any block split picks the same posts."""
    u = df.select(pl.col("post_id").cast(pl.String).hash(seed + 17) / float(2 ** 64)).to_series().to_numpy()
    return u < fraction
