"""Embeddings cached by content hash, so re-runs (and duplicate texts/images) embed nothing twice.

The cache is a folder of Parquet parts of (hash, vector) per model under
``<cache_dir>/<model slug>``. Each writer (one per embedding actor) adds whole
parts with unique names, so concurrent actors never contend for one file and a
killed actor loses only the part it had not finished (written atomically).
"""

from __future__ import annotations

import hashlib
import re
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engagesim import io


def content_hash(model: str, content: str | bytes) -> str:
    data = content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content
    return hashlib.sha256(model.encode() + b"\0" + data).hexdigest()[:32]


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model)


class EmbeddingCache:
    def __init__(self, cache_dir: str, model: str, storage=None):
        self.uri = io.join(cache_dir, _slug(model))
        self.model = model
        self.storage = storage
        self.vectors: dict[str, np.ndarray] = {}
        self.writer_id = uuid.uuid4().hex[:12]
        self.parts_written = 0
        fs, _ = io.filesystem(self.uri, storage)
        for path in io.list_files(self.uri, storage):
            if path.endswith(".parquet"):
                table = pq.read_table(path, filesystem=fs)
                vectors = table.column("vector").to_numpy(zero_copy_only=False)
                self.vectors.update(zip(table.column("hash").to_pylist(), (np.asarray(v, np.float32) for v in vectors)))

    def missing(self, hashes: list[str]) -> list[str]:
        """Hashes not cached yet, each once (duplicates within the batch are embedded once)."""
        return [h for h in dict.fromkeys(hashes) if h not in self.vectors]

    def add(self, hashes: list[str], vectors: np.ndarray) -> None:
        if not hashes:
            return
        vectors = np.asarray(vectors, np.float32)
        self.vectors.update(zip(hashes, vectors))
        table = pa.table({"hash": hashes, "vector": pa.array(list(vectors), type=pa.list_(pa.float32()))})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        name = f"part-{self.writer_id}-{self.parts_written:05d}.parquet"
        io.write_bytes(io.join(self.uri, name), buf.getvalue().to_pybytes(), self.storage)
        self.parts_written += 1

    def lookup(self, hashes: list[str], dim: int) -> np.ndarray:
        out = np.zeros((len(hashes), dim), dtype=np.float32)
        for i, h in enumerate(hashes):
            v = self.vectors.get(h)
            if v is not None:
                out[i] = v
        return out
