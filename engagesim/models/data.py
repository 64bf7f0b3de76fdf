"""Feature tables → model matrices: which columns are features, and how they become float32."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engagesim.schema import ENGAGEMENTS

NON_FEATURES = {"post_id", "author_id", "username", "created_at", "likes", "split", "label_log1p_likes", "user_id",
                "creator_id", "impression_at", "image_error", "photo_uri", "clean_text"}
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
    """(n, len(columns)) float32; nulls become NaN (XGBoost's missing value; the NN imputes)."""
    out = np.empty((table.num_rows, len(columns)), dtype=np.float32)
    for j, name in enumerate(columns):
        col = table.column(name)
        if pa.types.is_boolean(col.type):
            col = pc.cast(col, pa.float32())
        out[:, j] = pc.cast(col, pa.float32()).to_numpy(zero_copy_only=False)
    return out


def labels(table: pa.Table) -> np.ndarray:
    return np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in LABELS]).astype(np.float32)
