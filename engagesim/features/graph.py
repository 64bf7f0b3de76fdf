"""Graph features: CF similarity (LAYER6), Jaccard-similar creators and Leiden communities (Synerise).

All are *fit* on training interactions and then *applied* to any (user, creator)
pairs, so validation/serving rows never see their own labels. Training rows are
the harder case: the graph is fit on them, so a feature of the pair (u, c) must
not read the (u, c) edge itself — the training row's own label. The CF score is
therefore computed *leaving that pair out* (``GraphModel.features``). Measured on
a 2M-impression world before this: with the edge left in, ``cf_similarity`` was the
model's second feature by gain, XGBoost early-stopped at round 11 and like RCE
was 24.4; without the feature it was 38.8. The direct (u, c) history lives in the
``pair_*`` history features, which follow the window scheme.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import polars as pl
import scipy.sparse as sp
from safetensors.numpy import load as load_arrays

from engagesim import io
from engagesim.features.lookup import frame, lookup_columns, segment_left
from engagesim.schema import ENGAGEMENTS


@dataclass
class Index:
    """Dense integer ids for string keys (unknown keys → -1)."""

    keys: pl.Series

    def __post_init__(self) -> None:
        self.table = pl.DataFrame({"key": self.keys, "idx": np.arange(len(self.keys), dtype=np.int64)})

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, values: pl.Series) -> np.ndarray:
        got = lookup_columns(self.table, "key", values.alias("key").to_frame(), ["idx"], {"idx": -1.0})["idx"]
        return got.astype(np.int64)


def _matrix(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    m = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=shape)
    m.data[:] = 1.0  # binary: repeated pairs count once
    return m


@dataclass
class GraphModel:
    users: Index
    creators: Index
    engaged: sp.csr_matrix  # users × creators, binary: any engagement
    creator_co: sp.csr_matrix  # creators × creators: users who engaged with both (diagonal: with each)
    jaccard_top: sp.csr_matrix  # creators × creators, top-k Jaccard of follower sets (binary)
    # Per engagement: users+creators → community; with community folds a (folds, nodes) array, one labelling per
    # fold of the (user, creator) pairs, each fit on the other folds' edges only (``pair_fold``).
    communities: dict[str, np.ndarray] = field(default_factory=dict)
    community_sizes: dict[str, np.ndarray] = field(default_factory=dict)  # per labelling (rows, as communities)
    chunk: int = 5_000  # pairs per sparse selection (bounds memory)

    def save(self, uri: str, storage=None) -> None:
        """Keys as Parquet, sparse matrices and community labels as safetensors arrays (no pickle)."""
        from engagesim.io import safe_bytes, write_parquet

        arrays: dict[str, np.ndarray] = {}
        for name in ("engaged", "creator_co", "jaccard_top"):
            m = getattr(self, name).tocsr()
            # No copies of the large arrays: creator_co had 134M entries at 40M impressions (int32 indices
            # while they fit, as scipy keeps them; ``load`` takes either).
            arrays.update({f"{name}.data": m.data.astype(np.float32, copy=False), f"{name}.indices": m.indices,
                           f"{name}.indptr": m.indptr.astype(np.int64), f"{name}.shape": np.asarray(m.shape, np.int64)})
        for e in self.communities:
            arrays[f"communities.{e}"] = np.asarray(self.communities[e], np.int64)
            arrays[f"community_sizes.{e}"] = np.asarray(self.community_sizes[e], np.float64)
        io.write_bytes(io.join(uri, "graph.safetensors"), safe_bytes(arrays), storage)
        write_parquet(io.join(uri, "users.parquet"), pl.DataFrame({"key": self.users.keys}), storage)
        write_parquet(io.join(uri, "creators.parquet"), pl.DataFrame({"key": self.creators.keys}), storage)

    @classmethod
    def load(cls, uri: str, storage=None) -> GraphModel:
        from engagesim.io import read_parquet

        arrays = load_arrays(io.read_bytes(io.join(uri, "graph.safetensors"), storage))

        def csr(name: str) -> sp.csr_matrix:
            return sp.csr_matrix((arrays[f"{name}.data"], arrays[f"{name}.indices"], arrays[f"{name}.indptr"]),
                                 shape=tuple(int(v) for v in arrays[f"{name}.shape"]))

        engagements = [k.split(".", 1)[1] for k in arrays if k.startswith("communities.")]
        return cls(Index(read_parquet(io.join(uri, "users.parquet"), storage)["key"]),
                   Index(read_parquet(io.join(uri, "creators.parquet"), storage)["key"]),
                   csr("engaged"), csr("creator_co"), csr("jaccard_top"),
                   {e: arrays[f"communities.{e}"] for e in engagements},
                   {e: arrays[f"community_sizes.{e}"] for e in engagements})

    def _folds(self, u: np.ndarray, c: np.ndarray, folds: int) -> np.ndarray:
        """``pair_fold`` of id pairs (unknown ids: fold 0, whose labels they never read)."""
        uh, ch = self._hashes
        return pair_fold(uh[np.maximum(u, 0)], ch[np.maximum(c, 0)], folds)

    @cached_property
    def _hashes(self) -> tuple[np.ndarray, np.ndarray]:
        return key_hashes(self.users.keys), key_hashes(self.creators.keys)

    @cached_property
    def _cf_terms(self) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
        """Engager counts n_c (creator_co's diagonal), column weights 1/sqrt(n_c'), and creator_co with its
        column indices sorted within each row (what ``_co_at``'s bisection needs; a copy only if they are not)."""
        n = self.creator_co.diagonal().astype(np.float64)
        co = self.creator_co if self.creator_co.has_sorted_indices else self.creator_co.sorted_indices()
        return n, np.where(n > 0, 1.0 / np.sqrt(np.maximum(n, 1)), 0.0), co

    @staticmethod
    def _co_at(co: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """co[rows[i], cols[i]] for every i (0 where absent): a bisection of each row's sorted indices, all
        queries at once — log2(row length) numpy passes, no row copied."""
        if not co.nnz:
            return np.zeros(len(rows))
        if len(rows) <= FEW_QUERIES:
            return _co_few(co, rows, cols)
        end = co.indptr[rows + 1].astype(np.int64)
        lo = segment_left(co.indices, co.indptr[rows].astype(np.int64), end, cols)
        found = lo < end
        found[found] = co.indices[lo[found]] == cols[found]
        return np.where(found, co.data[np.where(found, lo, 0)], 0).astype(np.float64)

    def _engaged_rows(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The entries of ``engaged``'s rows ``u``, flat: (pair, creator c', value, row lengths) — one entry per
        (query, creator the user engaged with), in each row's order, as ``engaged[u]`` holds them.

        Why not ``engaged[u]``: scipy's row selection costs ~0.1 ms whatever the size, twice per call, and a
        served request has one pair; this gather is a few numpy passes, the same entries in the same order."""
        m = self.engaged
        starts = m.indptr[u].astype(np.int64)
        lengths = m.indptr[u + 1].astype(np.int64) - starts
        pair = np.repeat(np.arange(len(u)), lengths)
        flat = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(len(pair))
        return pair, m.indices[flat].astype(np.int64), m.data[flat], lengths

    def cf_similarity(self, u: np.ndarray, c: np.ndarray, rows: tuple | None = None) -> np.ndarray:
        """Item-based CF score of creator c for user u, computed as if the (u, c) edge did not exist.

        Mean over the *other* creators c' that u engaged with of the cosine (over engaging users)
        between c and c' on the graph without the (u, c) edge e_uc:
        (co(c,c') − e_uc) / sqrt((n_c − e_uc) n_c'). So a training row's own engagement never
        raises its own feature, and a validation row is scored by the same definition.

        co(c, c') is looked up for each creator c' the user engaged with (tens), never by copying c's row of
        creator_co or a derived creators × creators matrix. At 40M impressions creator_co held 134M entries
        (48,674 creators, 5.7 % dense): the weighted off-diagonal copy this once built took each join worker to
        10–11 GB, and copying rows then cost 0.35 ms a pair (1.75 s for 5,000), the join's bottleneck.
        """
        n, w, co = self._cf_terms
        pair, others_c, value, lengths = self._engaged_rows(u) if rows is None else rows
        # e_uc = engaged[u, c] (0 where absent); every sum below runs in row order, as scipy's would.
        e_uc = np.bincount(pair, weights=np.where(others_c == c[pair], value, 0), minlength=len(u))
        terms = self._co_at(co, c[pair], others_c) * w[others_c]
        # Σ_{c' ≠ c} [u engaged c'] co(c, c') w(c'): every engaged c', less the c' = c term (co(c, c) = n_c).
        weighted = np.bincount(pair, weights=terms, minlength=len(u)) - e_uc * n[c] * w[c]
        other_weights = np.bincount(pair, weights=value * w[others_c], minlength=len(u)) - e_uc * w[c]
        numerator = weighted - e_uc * other_weights
        others = lengths - e_uc
        engagers = n[c] - e_uc
        with np.errstate(divide="ignore", invalid="ignore"):
            score = numerator / np.sqrt(engagers) / np.maximum(others, 1)
        return np.where(engagers > 0, score, 0.0).astype(np.float32)

    def similar_engaged(self, u: np.ndarray, c: np.ndarray, rows: tuple | None = None) -> np.ndarray:
        """Engagements of u with creators among c's top-k Jaccard neighbours (``jaccard_top`` has an empty
        diagonal, so the (u, c) edge itself never counts): Σ_c' engaged[u, c'] · jaccard_top[c, c']."""
        pair, others_c, value, _ = self._engaged_rows(u) if rows is None else rows
        top = self._co_at(self._jaccard_sorted, c[pair], others_c)
        return np.bincount(pair, weights=value * top, minlength=len(u)).astype(np.float32)

    @cached_property
    def _jaccard_sorted(self) -> sp.csr_matrix:
        return self.jaccard_top if self.jaccard_top.has_sorted_indices else self.jaccard_top.sorted_indices()

    def features(self, user_ids: pl.Series, creator_ids: pl.Series) -> pl.DataFrame:
        return frame(self.feature_arrays(user_ids, creator_ids))

    def feature_arrays(self, user_ids: pl.Series, creator_ids: pl.Series) -> dict[str, np.ndarray]:
        """``GRAPH_COLUMNS`` of each (user, creator) as float32 numpy."""
        u = self.users.lookup(user_ids)
        c = self.creators.lookup(creator_ids)
        known = (u >= 0) & (c >= 0)
        n = len(u)
        cf = np.zeros(n, dtype=np.float32)
        similar = np.zeros(n, dtype=np.float32)
        if known.any():
            # Each distinct (user, creator) pair once, in bounded chunks: a sparse row selection of
            # creator_co costs memory per selected row, and impressions repeat pairs a lot.
            known_pairs = np.column_stack([u[known], c[known]])
            if len(known_pairs) == 1:  # a served request's one pair (np.unique along an axis: ~50 µs)
                unique, inverse = known_pairs, np.zeros(1, dtype=np.int64)
            else:
                pairs = np.unique(known_pairs, axis=0, return_inverse=True)
                unique, inverse = pairs[0], pairs[1].ravel()
            cf_u = np.zeros(len(unique), dtype=np.float32)
            sim_u = np.zeros(len(unique), dtype=np.float32)
            for lo in range(0, len(unique), self.chunk):
                uk, ck = unique[lo:lo + self.chunk, 0], unique[lo:lo + self.chunk, 1]
                rows = self._engaged_rows(uk)
                cf_u[lo:lo + len(uk)] = self.cf_similarity(uk, ck, rows)
                sim_u[lo:lo + len(uk)] = self.similar_engaged(uk, ck, rows)
            cf[known] = cf_u[inverse]
            similar[known] = sim_u[inverse]
        cols = {"cf_similarity": cf, "similar_creators_engaged": similar}
        n_users = len(self.users)
        for e in ENGAGEMENTS:
            labels = self.communities.get(e)
            same = np.zeros(n, dtype=np.float32)
            inv_size = np.zeros(n, dtype=np.float32)
            if labels is not None and labels.size:  # an empty graph (no training edges) knows no one
                sizes = self.community_sizes[e]
                # With folds, a pair reads the labelling its own edge was left out of (rows: the fold's).
                row = self._folds(u, c, len(labels)) if labels.ndim == 2 else None
                cu = np.where(u >= 0, _at(labels, np.maximum(u, 0), row), -1)
                cc = np.where(c >= 0, _at(labels, n_users + np.maximum(c, 0), row), -1)
                same = ((cu >= 0) & (cu == cc)).astype(np.float32)
                inv_size = np.where(cu >= 0, 1.0 / _at(sizes, np.maximum(cu, 0), row), 0.0).astype(np.float32)
            cols[f"same_community_{e}"] = same
            cols[f"inv_community_size_{e}"] = inv_size
        return cols


# Up to this many (row, column) queries ``_co_at`` bisects each row's indices with ``np.searchsorted``, one query
# at a time: a served pair's few dozen queries in ~0.05 ms, where the vectorised bisection's ~12 passes of six
# array operations each cost ~0.15 ms twice a request (its cost is per pass, not per query).
FEW_QUERIES = 64


def _co_few(co: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``GraphModel._co_at`` for a few queries (the same values: an exact lookup either way)."""
    out = np.zeros(len(rows))
    indptr, indices, data = co.indptr, co.indices, co.data
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        a, b = int(indptr[r]), int(indptr[r + 1])
        j = a + int(np.searchsorted(indices[a:b], c))
        if j < b and indices[j] == c:
            out[i] = data[j]
    return out


def _at(table: np.ndarray, i: np.ndarray, row: np.ndarray | None) -> np.ndarray:
    """``table[i]`` of a single labelling, or ``table[row, i]`` with one labelling per fold (rows)."""
    return table[i] if row is None else table[row, i]


def key_hashes(keys: pl.Series) -> np.ndarray:
    """A fixed hash per key (polars' seeded hash, as the history partitions use): a pair's fold depends on its
    two keys only, never on which other keys the graph has (ids do)."""
    return keys.hash(seed=0).to_numpy()


def pair_fold(user_hash: np.ndarray, creator_hash: np.ndarray, folds: int) -> np.ndarray:
    """The community fold of each (user, creator) pair, from the two keys' hashes."""
    mixed = user_hash.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + creator_hash.astype(np.uint64)
    return ((mixed >> np.uint64(33)) % np.uint64(folds)).astype(np.int64)


GRAPH_COLUMNS = ["cf_similarity", "similar_creators_engaged"] + [
    f"{p}_{e}" for e in ENGAGEMENTS for p in ("same_community", "inv_community_size")
]
