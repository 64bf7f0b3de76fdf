"""FAISS nearest-neighbour regressor (Adobe team 83): neighbours in embedding space vote their log1p(likes).

Exact inner-product search (``IndexFlatIP`` on L2-normalised vectors = cosine) for
small corpora; an IVF index with ``nlist`` cells above ``ivf_threshold`` rows;
moved to GPU when faiss was built with it and a GPU is present.
"""

from __future__ import annotations

from io import BytesIO

import faiss
import numpy as np


class KNNRegressor:
    def __init__(self, k: int = 20, ivf_threshold: int = 200_000, nlist: int | None = None, nprobe: int = 16):
        self.k, self.ivf_threshold, self.nlist, self.nprobe = k, ivf_threshold, nlist, nprobe

    @staticmethod
    def _normalise(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32).copy()
        faiss.normalize_L2(x)
        return x

    def fit(self, vectors: np.ndarray, targets: np.ndarray) -> KNNRegressor:
        x = self._normalise(vectors)
        d = x.shape[1]
        if len(x) >= self.ivf_threshold:
            nlist = self.nlist or int(4 * np.sqrt(len(x)))
            quantiser = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantiser, d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(x)
            index.nprobe = self.nprobe
            self.kind = "ivf"
        else:
            index = faiss.IndexFlatIP(d)
            self.kind = "flat"
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(x)
        self.index, self.targets = index, np.asarray(targets, dtype=np.float32)
        self.prior = float(self.targets.mean())
        return self

    def predict(self, vectors: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        """Similarity-weighted mean of the neighbours' targets (``exclude_self`` for in-sample rows)."""
        k = self.k + (1 if exclude_self else 0)
        sims, idx = self.index.search(self._normalise(vectors), k)
        if exclude_self:
            sims, idx = sims[:, 1:], idx[:, 1:]
        valid = idx >= 0
        weights = np.where(valid, np.maximum(sims, 0) + 1e-6, 0.0)
        values = np.where(valid, self.targets[np.maximum(idx, 0)], 0.0)
        total = weights.sum(axis=1)
        return np.where(total > 0, (weights * values).sum(axis=1) / np.maximum(total, 1e-12), self.prior)

    def save(self, directory: str) -> None:
        """FAISS's own index serialisation + targets as .npy (no pickle); local or s3://."""
        from engagesim import io

        index = faiss.index_gpu_to_cpu(self.index) if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(self.index).__name__ else self.index
        io.write_bytes(io.join(directory, "index.faiss"), faiss.serialize_index(index).tobytes())
        buf = BytesIO()
        np.save(buf, self.targets, allow_pickle=False)
        io.write_bytes(io.join(directory, "targets.npy"), buf.getvalue())
        io.write_json(io.join(directory, "config.json"), {"k": self.k, "kind": self.kind, "prior": self.prior})

    @classmethod
    def load(cls, directory: str) -> KNNRegressor:
        from engagesim import io

        meta = io.read_json(io.join(directory, "config.json"))
        model = cls(k=meta["k"])
        model.index = faiss.deserialize_index(np.frombuffer(io.read_bytes(io.join(directory, "index.faiss")), np.uint8))
        model.targets = np.load(BytesIO(io.read_bytes(io.join(directory, "targets.npy"))), allow_pickle=False)
        model.kind, model.prior = meta["kind"], meta["prior"]
        return model
