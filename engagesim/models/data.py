"""Feature tables → model matrices: which columns are features, and how they become float32."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from engagesim.schema import ENGAGEMENTS

NON_FEATURES = {"post_id", "author_id", "username", "created_at", "likes", "split", "label_log1p_likes", "user_id",
                "creator_id", "impression_at", "image_error", "photo_uri", "clean_text", "text",
                "post_text"}
LABELS = [f"y_{e}" for e in ENGAGEMENTS]


def feature_columns(schema: pa.Schema) -> list[str]:
    """Numeric and boolean columns that are not ids, labels or the split (lists and strings excluded)."""
    out = []
    for field in schema:
        if field.name in NON_FEATURES or field.name in LABELS or field.name.startswith("_"):
            continue
        t = field.type
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            out.append(field.name)
    return out


def matrix(table: pa.Table, columns: list[str]) -> np.ndarray:
    """(n, len(columns)) float32; nulls become NaN (XGBoost's missing value; the NN imputes).

    One columnar conversion for the whole block (not one cast per column), which is what keeps
    single-row scoring cheap.
    """
    if not columns:
        return np.empty((table.num_rows, 0), dtype=np.float32)
    frame = pl.from_arrow(table.select(columns))
    if isinstance(frame, pl.Series):
        frame = frame.to_frame()
    return np.ascontiguousarray(frame.select(pl.all().cast(pl.Float32)).to_numpy(), dtype=np.float32)


def label_matrix(table: pa.Table, columns: list[str] | tuple[str, ...] = tuple(LABELS)) -> np.ndarray:
    """(rows, len(columns)) float32 from label columns — the one place labels become a matrix."""
    return np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in columns]).astype(np.float32)
