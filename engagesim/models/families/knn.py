"""The FAISS kNN regressor (Adobe team 83): neighbours in an embedding space vote on log1p(likes).
Post level only. Files: ``knn/`` (FAISS index + config) and ``knn/column.json`` (the embedding column).

Streamed (a Ray Dataset of training posts, above ``train.stream_rows``): the index is trained on a uniform
sample of ``train.knn.sample_rows`` vectors and the vectors are added batch by batch, so the driver holds one
batch and the index — product-quantised from ``train.knn.pq_threshold`` rows — never the split."""

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
    streams = True

    def fit(self, level: Level, train, valid: pa.Table, features: list[str], ctx: FitContext) -> list[Member]:
        c = ctx.settings(self)
        if c.embedding not in valid.column_names:
            return []
        model = knn.KNNRegressor(c.k, c.ivf_threshold, pq_threshold=c.pq_threshold, pq_bytes=c.pq_bytes)
        label = level.labels[0]
        if not isinstance(train, pa.Table):
            return _fit_stream(model, train, c, label, ctx)
        vectors, ok = embedding_matrix(train, c.embedding)
        if ok.sum() < c.k:
            return []
        y = train.column(label).to_numpy(zero_copy_only=False)
        return [KNNMember(model.fit(vectors[ok], y[ok]), c.embedding)]

    def load(self, directory: str, level: Level, member: str) -> Member | None:
        if not io.exists(io.join(directory, "knn", "config.json")):
            return None
        column = io.read_json(io.join(directory, "knn", "column.json"))["column"]
        return KNNMember(knn.KNNRegressor.load(io.join(directory, "knn")), column)


def _present(batch: pa.Table, column: str) -> pa.Table:
    return batch.filter(batch.column(column).is_valid())


def _fit_stream(model: knn.KNNRegressor, train, c: KNNConfig, label: str, ctx: FitContext) -> list[Member]:
    """The index from a Ray Dataset of training posts: trained on a sample, filled batch by batch."""
    from engagesim.pipeline.validation import sample_rows

    rows = train.select_columns([c.embedding, label]).map_batches(_present, fn_kwargs={"column": c.embedding},
                                                                  batch_format="pyarrow")
    total = ctx.train_rows or rows.count()
    sample, _ = embedding_matrix(sample_rows(rows, [c.embedding], total, c.sample_rows), c.embedding)
    if len(sample) < c.k:
        return []
    batches = ((embedding_matrix(b, c.embedding)[0], b.column(label).to_numpy(zero_copy_only=False))
               for b in rows.iter_batches(batch_size=65_536, batch_format="pyarrow"))
    model.fit_stream(sample, batches, total)
    ctx.log(f"knn: {model.kind} index over {len(model.targets)} posts, trained on {len(sample)}")
    return [KNNMember(model, c.embedding)] if len(model.targets) >= c.k else []

