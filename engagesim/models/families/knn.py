"""The FAISS kNN regressor (Adobe team 83): neighbours in an embedding space vote on log1p(likes).
Post level only. Files: ``knn/`` (FAISS index + config) and ``knn/column.json`` (the embedding column)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from engagesim import io
from engagesim.config import KNNConfig
from engagesim.features.state import fixed_list_matrix
from engagesim.models import knn
from engagesim.models.family import Family, FitContext, Level, Member, register_family


def embedding_matrix(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-size-list column → (float32 matrix with zeros for nulls, mask of present rows)."""
    col = table.column(column).combine_chunks()
    return fixed_list_matrix(col), col.is_valid().to_numpy(zero_copy_only=False)


class KNNMember(Member):
    name = "knn"

    def __init__(self, model: knn.KNNRegressor, column: str):
        self.model, self.column = model, column

    def predict(self, table: pa.Table, upstream: dict[str, np.ndarray]) -> np.ndarray:
        """Neighbour vote for rows with a vector; the training mean for rows without one (or no column)."""
        out = np.full(table.num_rows, self.model.prior, dtype=np.float32)
        if self.column in table.column_names:
            vectors, ok = embedding_matrix(table, self.column)
            if ok.any():
                out[ok] = self.model.predict(vectors[ok])
        return out[:, None]

    def save(self, directory: str) -> None:
        self.model.save(io.join(directory, "knn"))
        io.write_json(io.join(directory, "knn", "column.json"), {"column": self.column})


@register_family
class KNNFamily(Family):
    name = "knn"
    config_class = KNNConfig
    levels = ("post",)

    def fit(self, level: Level, train: pa.Table, valid: pa.Table, features: list[str],
            ctx: FitContext) -> list[Member]:
        c = ctx.settings(self)
        if c.embedding not in train.column_names:
            return []
        vectors, ok = embedding_matrix(train, c.embedding)
        if ok.sum() < c.k:
            return []
        y = train.column(level.labels[0]).to_numpy(zero_copy_only=False)
        return [KNNMember(knn.KNNRegressor(c.k, c.ivf_threshold).fit(vectors[ok], y[ok]), c.embedding)]

    def load(self, directory: str, level: Level, member: str) -> Member | None:
        if not io.exists(io.join(directory, "knn", "config.json")):
            return None
        column = io.read_json(io.join(directory, "knn", "column.json"))["column"]
        return KNNMember(knn.KNNRegressor.load(io.join(directory, "knn")), column)
