"""Feature tables → model matrices: which columns are features, and how they become float32."""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from engagesim.schema import ENGAGEMENTS

NON_FEATURES = {"post_id", "author_id", "username", "created_at", "likes", "split", "label_log1p_likes", "user_id",
                "creator_id", "impression_at", "image_error", "photo_uri", "clean_text", "text",
                "post_text"}
LABELS = [f"y_{e}" for e in ENGAGEMENTS]


SPLITS = ("train", "valid", "test")  # valid: early stopping, stacking, tuning; test: untouched, what is reported


def rows_of_split(table: pa.Table, split: str) -> pa.Table:
    return table.filter(pc.equal(table.column("split"), split))


def feature_columns(schema: pa.Schema) -> list[str]:
    """Numeric and boolean columns that are not ids, labels or the split (lists and strings excluded)."""
    return list(_feature_columns(schema))


@functools.lru_cache(maxsize=64)  # a served request's schema is the same every time: 0.3 ms of type checks once
def _feature_columns(schema: pa.Schema) -> tuple[str, ...]:
    out = []
    for field in schema:
        if field.name in NON_FEATURES or field.name in LABELS or field.name.startswith("_"):
            continue
        t = field.type
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            out.append(field.name)
    return tuple(out)


# A request's feature columns as numpy (NaN: missing), name → (n,) array: what serving featurises rows into
# (``features.impression.impression_arrays``), read by members whose family ``takes_arrays``.
FeatureArrays = Mapping[str, np.ndarray]


def matrix(table: pa.Table | FeatureArrays, columns: list[str]) -> np.ndarray:
    """(n, len(columns)) float32; nulls become NaN (XGBoost's missing value; the NN imputes).

    One columnar conversion for the whole block (not one cast per column), which is what keeps
    single-row scoring cheap. From ``FeatureArrays``, one array of the columns (0.1 ms for 170 columns of one row,
    where an Arrow table of them cost 0.7 ms to build and 0.4 ms to convert).
    """
    if isinstance(table, Mapping):
        if not columns:
            return np.empty((num_rows(table), 0), dtype=np.float32)
        # (k, n) then transposed: ~5x cheaper than column_stack at one row (31 vs 151 µs for 142 columns).
        return np.ascontiguousarray(np.array([table[c] for c in columns], dtype=np.float32).T)
    if not columns:
        return np.empty((table.num_rows, 0), dtype=np.float32)
    if table.num_rows <= FEW_ROWS:
        last = getattr(_LAST, "table", None)
        if last is None or last[0] is not table:  # every numeric column once; the members take theirs from it
            numeric = feature_columns(table.schema)
            last = (table, {c: i for i, c in enumerate(numeric)}, _float32(table, numeric))
            _LAST.table = last
        if all(c in last[1] for c in columns):
            return np.ascontiguousarray(last[2][:, [last[1][c] for c in columns]])
    return _float32(table, columns)


# A served request's table is read by 3–5 members (post and impression levels), each converting its columns
# through polars: ~0.5 ms each on ~200 columns of one row. Up to this many rows, the last table a thread saw is
# converted once (every numeric column) and each member takes its columns from that matrix. Larger tables
# convert per member, as before (no second copy of a big block).
FEW_ROWS = 256
_LAST = threading.local()


def _float32(table: pa.Table, columns: list[str]) -> np.ndarray:
    if not columns:
        return np.empty((table.num_rows, 0), dtype=np.float32)
    if 0 < table.num_rows <= FEW_ROWS:
        picked = table.select(columns)
        if all(pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in picked.schema):
            # Arrow's own row-major conversion (nulls → NaN): 0.21 ms for a served row's 152 columns where
            # polars took 1.1 ms. Booleans it does not take; those tables go through polars.
            (batch,) = picked.combine_chunks().to_batches()
            return np.ascontiguousarray(batch.to_tensor(null_to_nan=True, row_major=True).to_numpy(),
                                        dtype=np.float32)
    frame = pl.from_arrow(table.select(columns))
    if isinstance(frame, pl.Series):
        frame = frame.to_frame()
    return np.ascontiguousarray(frame.select(pl.all().cast(pl.Float32)).to_numpy(), dtype=np.float32)


def label_matrix(table: pa.Table, columns: list[str] | tuple[str, ...] = tuple(LABELS)) -> np.ndarray:
    """(rows, len(columns)) float32 from label columns — the one place labels become a matrix."""
    return np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in columns]).astype(np.float32)


WEIGHT = "_weight"  # a row's training weight (negative downsampling); "_" keeps it out of the features


def sample_negatives(batch: pa.Table, rate: float, seed: int = 0) -> pa.Table:
    """Keep every engaged impression and a ``rate`` share of the others, the kept ones weighted 1/``rate``.

    Which rows survive is a hash of (user, post, impression time) — the same rows whatever the block
    boundaries, so the streamed and in-memory paths, and reruns, sample alike."""
    if rate >= 1:
        return batch
    frame = pl.from_arrow(batch.select(["user_id", "post_id", "impression_at", *LABELS]))
    engaged = pl.any_horizontal([pl.col(c) > 0 for c in LABELS])
    u = pl.struct("user_id", "post_id", "impression_at").hash(seed) / float(2 ** 64)
    marks = frame.select(engaged.alias("e"), (u < rate).alias("k"))
    keep = (marks["e"] | marks["k"]).to_arrow()
    weight = pl.when(marks["e"]).then(1.0).otherwise(1.0 / rate)
    weights = marks.select(weight.cast(pl.Float32).alias(WEIGHT))[WEIGHT].to_arrow()
    return batch.append_column(WEIGHT, weights).filter(keep)


def weights(table: pa.Table) -> np.ndarray | None:
    """The rows' training weights, or None where the table was not sampled."""
    return table.column(WEIGHT).to_numpy(zero_copy_only=False) if WEIGHT in table.column_names else None


def num_rows(table: pa.Table | FeatureArrays) -> int:
    if isinstance(table, Mapping):
        return len(next(iter(table.values()), ()))
    return table.num_rows


def column_of(table: pa.Table | FeatureArrays, name: str) -> np.ndarray | None:
    if isinstance(table, Mapping):
        return None if name not in table else np.asarray(table[name], dtype=np.float32)
    if name not in table.column_names:
        return None
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float32)


def account_prior(table: pa.Table | FeatureArrays) -> np.ndarray | None:
    """Each row's account → company → global mean log1p(likes): ``te_author_id_hier`` (the account's posts
    shrunk towards its company's encoding, ``post_fit.hierarchical``; a new account gets its company's).
    Runs saved before it have ``te_author_id`` only (shrunk towards the global mean), served as they were
    evaluated. Training rows carry out-of-fold versions, later rows the apply ones, as every target encoding.
    None when the table has no author encoding (a run without likes)."""
    hier = column_of(table, "te_author_id_hier")
    return hier if hier is not None else column_of(table, "te_author_id")
