"""EMDE sketches (Synerise, RecSys 2021): a fixed-size, additive summary of a set of token embeddings.

Each of N partitions is a density-aware LSH: K random hyperplanes whose
offsets are quantiles of the data's own projections (so buckets split where
the data is dense); a vector falls into one of 2^K buckets per partition.
A text's sketch is the count of its tokens per bucket, all partitions
concatenated (N·2^K), L2-normalised. Sketches of unions are sums, which is
what makes them cheap to aggregate per user or per creator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class EMDESketcher:
    n_partitions: int = 16
    bits: int = 5
    seed: int = 0

    def fit(self, vectors: np.ndarray) -> EMDESketcher:
        rng = np.random.default_rng(self.seed)
        d = vectors.shape[1]
        self.planes = rng.normal(size=(self.n_partitions, self.bits, d)).astype(np.float32)
        proj = np.einsum("nd,pkd->npk", vectors.astype(np.float32), self.planes)
        levels = rng.uniform(0.25, 0.75, size=(self.n_partitions, self.bits))
        self.offsets = np.stack(
            [[np.quantile(proj[:, p, k], levels[p, k]) for k in range(self.bits)] for p in range(self.n_partitions)]
        ).astype(np.float32)
        return self

    @property
    def dim(self) -> int:
        return self.n_partitions * (1 << self.bits)

    def codes(self, vectors: np.ndarray) -> np.ndarray:
        """(n, partitions) bucket index of each vector."""
        proj = np.einsum("nd,pkd->npk", vectors.astype(np.float32), self.planes) > self.offsets[None]
        return (proj * (1 << np.arange(self.bits))[None, None, :]).sum(axis=2)

    def sketch(self, token_vectors: list[np.ndarray]) -> np.ndarray:
        """One L2-normalised sketch per set of token vectors (empty set → zeros)."""
        out = np.zeros((len(token_vectors), self.dim), dtype=np.float32)
        width = 1 << self.bits
        offsets = np.arange(self.n_partitions) * width
        for i, vecs in enumerate(token_vectors):
            if len(vecs) == 0:
                continue
            flat = (self.codes(vecs) + offsets[None, :]).ravel()
            out[i] = np.bincount(flat, minlength=self.dim)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1.0, norms)
