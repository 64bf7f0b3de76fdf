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

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import polars as pl
import scipy.sparse as sp
from safetensors.numpy import load as load_arrays

from engagesim import io
from engagesim.config import COMMUNITY_FOLDS, LEIDEN_MAX_EDGES
from engagesim.features.lookup import frame, lookup_columns
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
        lo, hi = co.indptr[rows].astype(np.int64), co.indptr[rows + 1].astype(np.int64)
        end = hi.copy()
        while True:
            open_ = lo < hi
            if not open_.any():
                break
            mid = (lo + hi) // 2
            below = open_ & (co.indices[np.minimum(mid, len(co.indices) - 1)] < cols)
            lo = np.where(below, mid + 1, lo)
            hi = np.where(open_ & ~below, mid, hi)
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
        u = self.users.lookup(user_ids)
        c = self.creators.lookup(creator_ids)
        known = (u >= 0) & (c >= 0)
        n = len(u)
        cf = np.zeros(n, dtype=np.float32)
        similar = np.zeros(n, dtype=np.float32)
        if known.any():
            # Each distinct (user, creator) pair once, in bounded chunks: a sparse row selection of
            # creator_co costs memory per selected row, and impressions repeat pairs a lot.
            pairs = np.unique(np.column_stack([u[known], c[known]]), axis=0, return_inverse=True)
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
        return frame(cols)


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


JACCARD_BLOCK = 2048  # creators per block of the follower-set intersections


def _top_k_jaccard(followers: sp.csr_matrix, k: int, block: int = JACCARD_BLOCK) -> sp.csr_matrix:
    """creators × creators: 1 for each creator's k most Jaccard-similar creators (follower sets; ties: the
    lower index), a block of creators at a time.

    Why blocks: the intersection counts of every pair of creators had 134M entries at 40M impressions (5.7 %
    dense); held whole, with a COO copy and a sorted table of them, they were the graph task's peak. A block
    holds block × (its creators' co-followed creators)."""
    n = followers.shape[0]
    sizes = np.asarray(followers.sum(axis=1)).ravel()
    by_user = followers.T.tocsr()
    rows_out, cols_out = [], []
    for start in range(0, n, block):
        inter = (followers[start:start + block] @ by_user).tocsr()
        rows = np.repeat(np.arange(start, start + inter.shape[0]), np.diff(inter.indptr))
        cols, data = inter.indices, inter.data
        off = (cols != rows) & (data != 0)
        rows, cols, data = rows[off], cols[off], data[off]
        jac = data / (sizes[rows] + sizes[cols] - data)
        order = np.lexsort((cols, -jac, rows))  # per row: most similar first, then the lower index
        ranked = rows[order]
        rank = np.arange(len(ranked)) - np.searchsorted(ranked, ranked, side="left")
        top = order[rank < k]
        rows_out.append(rows[top])
        cols_out.append(cols[top])
    r = np.concatenate(rows_out) if rows_out else np.zeros(0, np.int64)
    c = np.concatenate(cols_out) if cols_out else np.zeros(0, np.int64)
    return sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(n, n))


def _assign(labels: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    """``labels[r] = `` the most frequent label among ``labels[cols]`` of each unlabelled ``r`` of the edges
    (rows, cols) (ties: the smallest label); nodes whose neighbours are all unlabelled stay -1."""
    lab = labels[cols]
    ok = (labels[rows] < 0) & (lab >= 0)
    if not ok.any():
        return
    pairs, counts = np.unique(np.column_stack([rows[ok], lab[ok]]), axis=0, return_counts=True)
    order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))  # per node: most frequent, then smallest label
    first = order[np.r_[True, pairs[order[1:], 0] != pairs[order[:-1], 0]]]
    labels[pairs[first, 0]] = pairs[first, 1]


def _leiden(users: np.ndarray, creators: np.ndarray, n_users: int, n_creators: int, seed: int,
            max_edges: int | None = LEIDEN_MAX_EDGES) -> tuple[np.ndarray, np.ndarray]:
    """Communities of the bipartite engagement graph; nodes = users then creators. Isolated nodes → -1.

    Above ``max_edges`` (``features.leiden_max_edges``), Leiden sees every edge of a seeded share of the users
    (max_edges / edges of them), and the rest are assigned: each user left out to its creators' most frequent
    community, then each creator still without one to its users'. Same seed, same result on every executor."""
    edges = np.unique(np.column_stack([users, n_users + creators]), axis=0)
    labels = np.full(n_users + n_creators, -1, dtype=np.int64)
    if len(edges) == 0:
        return labels, np.ones(1)
    sampled = max_edges is not None and len(edges) > max_edges
    fit = edges
    if sampled:
        keep = np.random.default_rng(seed).random(n_users) < max_edges / len(edges)
        fit = edges[keep[edges[:, 0]]]
    # Imported here: igraph pulls in matplotlib (0.45 s of a 1.3 s import of this module), and only the fit needs
    # it — not the Ray workers, CLI commands and Serve replicas that import this module for the features.
    import igraph as ig
    import leidenalg

    graph = ig.Graph(n=n_users + n_creators, edges=fit.tolist())
    del fit
    part = leidenalg.find_partition(graph, leidenalg.ModularityVertexPartition, seed=seed)
    membership = np.asarray(part.membership)
    degree = np.asarray(graph.degree())
    del part, graph
    labels[degree > 0] = membership[degree > 0]
    if not sampled:
        return labels, np.bincount(membership).astype(np.float64)
    _assign(labels, edges[:, 0], edges[:, 1])  # users left out ← their creators' communities
    _assign(labels, edges[:, 1], edges[:, 0])  # creators no sampled user reached ← their users'
    sizes = np.bincount(labels[labels >= 0], minlength=int(membership.max()) + 1).astype(np.float64)
    return labels, np.maximum(sizes, 1.0)


def fit_graph(train: pl.DataFrame, jaccard_k: int = 20, seed: int = 0,
              max_edges: int | None = LEIDEN_MAX_EDGES, community_folds: int = COMMUNITY_FOLDS) -> GraphModel:
    """Fit on training impressions (with y_<engagement> columns and follows_creator)."""
    from engagesim.features.history import window_aggregates

    return fit_graph_from_pairs(window_aggregates(train.select(
        "user_id", "creator_id", "window", "t_us", "follows_creator", *[f"y_{e}" for e in ENGAGEMENTS]))["pair"],
        jaccard_k, seed, max_edges, community_folds=community_folds)


def graph_edges(pairs: pl.DataFrame) -> pl.DataFrame:
    """Per (user, creator): engagement counts and the follow flag, only pairs with an engagement or a follow.

    The graph reads nothing else, so each partition of the history shuffle sends the driver only these
    edges (idempotent: edges of edges are the same edges); a pair seen but never engaged or followed
    would only add an isolated node.
    """
    if "follows" not in pairs.columns:  # a log without the follow flag
        pairs = pairs.with_columns(pl.lit(0, pl.Int8).alias("follows"))
    per_pair = pairs.group_by("user_id", "creator_id").agg(*[pl.col(f"c_{e}").sum() for e in ENGAGEMENTS],
                                                           pl.col("follows").max().fill_null(0))
    return per_pair.filter(pl.any_horizontal(*[pl.col(f"c_{e}") > 0 for e in ENGAGEMENTS], pl.col("follows") > 0))


def _sum_pairs(table: pl.DataFrame) -> pl.DataFrame:
    return table.group_by("u", "c").agg(*[pl.col(f"c_{e}").sum() for e in ENGAGEMENTS], pl.col("follows").max())


def coded_edges(parts: Iterable[pl.DataFrame]) -> tuple[pl.Series, pl.Series, pl.DataFrame]:
    """Edge parts → (user keys, creator keys, per-pair table on integer codes ``u``, ``c`` into them).

    The same table as ``graph_edges`` of all parts concatenated, sorted by (user_id, creator_id), with users in
    sorted order and creators in order of first appearance — what the fit assigns ids by — but no string
    column of the whole edge list ever exists: each part is coded against its own sorted keys as it arrives
    (an Enum cast), and the codes are mapped to the global sorted keys after. Why: at 40M impressions the
    17.9M-edge table, summed and sorted on its string keys, was the graph task's peak (5.4 GB).
    """
    coded, user_keys, creator_keys = [], [], []
    for part in parts:
        if "follows" not in part.columns:
            part = part.with_columns(pl.lit(0, pl.Int8).alias("follows"))
        users, creators = part["user_id"].unique().sort(), part["creator_id"].unique().sort()
        # Int32 codes and Float32 counts (the fit only asks whether a count is > 0; integer sums are exact in
        # Float32 below 2^24): 25 bytes an edge where Int64/Float64 took 49. Summed per part first, so a pair
        # repeated over windows is one row before any concatenation.
        coded.append(part.select(pl.col("user_id").cast(pl.Enum(users)).to_physical().cast(pl.Int32).alias("u"),
                                 pl.col("creator_id").cast(pl.Enum(creators)).to_physical().cast(pl.Int32).alias("c"),
                                 *[pl.col(f"c_{e}").cast(pl.Float32) for e in ENGAGEMENTS],
                                 pl.col("follows").fill_null(0).cast(pl.Int8)).pipe(_sum_pairs))
        user_keys.append(users)
        creator_keys.append(creators)
    all_users = pl.concat(user_keys).unique().sort() if user_keys else pl.Series("user_id", [], pl.String)
    all_creators = pl.concat(creator_keys).unique().sort() if creator_keys else pl.Series("creator_id", [], pl.String)
    for i, (users, creators) in enumerate(zip(user_keys, creator_keys)):  # local code → global sorted rank
        u_map = all_users.search_sorted(users).to_numpy().astype(np.int32)
        c_map = all_creators.search_sorted(creators).to_numpy().astype(np.int32)
        coded[i] = coded[i].with_columns(u=u_map[coded[i]["u"].to_numpy()], c=c_map[coded[i]["c"].to_numpy()])
    empty = {"u": pl.Int32, "c": pl.Int32, **{f"c_{e}": pl.Float32 for e in ENGAGEMENTS}, "follows": pl.Int8}
    table = pl.concat(coded, rechunk=False) if coded else pl.DataFrame(schema=empty)
    del coded
    # Parts that share no user (the Ray path: each user's pairs in one history partition) share no pair either:
    # their per-part sums are final, and the whole table is only sorted — no second group-by copy of it.
    if sum(len(users) for users in user_keys) != len(all_users):
        table = _sum_pairs(table)
    table = (table.filter(pl.any_horizontal(*[pl.col(f"c_{e}") > 0 for e in ENGAGEMENTS], pl.col("follows") > 0))
             .sort("u", "c"))
    u, c = table["u"].to_numpy(), table["c"].to_numpy()
    kept_users = np.unique(u)  # sorted: the users' sorted order
    seen, first = np.unique(c, return_index=True)
    creator_order = seen[np.argsort(first, kind="stable")]  # creators by first appearance
    position = np.full(len(all_creators), -1, dtype=np.int32)
    position[creator_order] = np.arange(len(creator_order), dtype=np.int32)
    table = table.with_columns(u=np.searchsorted(kept_users, u).astype(np.int32), c=position[c])
    return (all_users.gather(kept_users).alias("user_id"), all_creators.gather(creator_order).alias("creator_id"),
            table)


def fit_graph_from_pairs(pairs: pl.DataFrame | Iterable[pl.DataFrame], jaccard_k: int = 20, seed: int = 0,
                         max_edges: int | None = LEIDEN_MAX_EDGES,
                         mark: Callable[[str], None] = lambda _: None, community_folds: int = COMMUNITY_FOLDS) -> GraphModel:
    """Fit from the (user, creator[, window]) aggregates of the history stage: no pass over raw rows.

    ``pairs`` (one frame, or parts of it read one at a time) has user_id, creator_id, c_<engagement> counts and
    ``follows`` (0/1). ``mark(phase)`` is called as each phase ends (``bench/graph.py`` measures memory by phase
    with it).

    ``community_folds`` (``features.community_folds``): 1 labels communities on every training edge, so a
    training row's own engagement helps put its user in its creator's community — a leak where users have few
    edges (a foreign RecSys world: the XGBoost test like RCE 3.9 with the community columns, 12.6 without). With
    k ≥ 2 the pairs are split into k folds (``pair_fold``) and each fold's pairs read a labelling fit without
    their edges (k Leiden fits on (k-1)/k of the edges each: at k = 2 two fits on half, about one fit's time).
    """
    user_keys, creator_keys, per_pair = coded_edges([pairs] if isinstance(pairs, pl.DataFrame) else pairs)
    mark("per-pair table")
    users, creators = Index(user_keys), Index(creator_keys)
    u, c = per_pair["u"].to_numpy(), per_pair["c"].to_numpy()
    counts = {e: per_pair[f"c_{e}"].to_numpy() for e in ENGAGEMENTS}
    any_engagement = np.zeros(per_pair.height, dtype=bool)
    for e in ENGAGEMENTS:
        any_engagement |= counts[e] > 0
    shape = (len(users), len(creators))
    engaged = _matrix(u[any_engagement], c[any_engagement], shape)
    creator_co = (engaged.T @ engaged).tocsr()
    mark("engaged and creator_co")
    follows = per_pair["follows"].to_numpy().astype(bool)
    del per_pair
    followers = _matrix(c[follows], u[follows], (len(creators), len(users)))
    model = GraphModel(users, creators, engaged, creator_co, _top_k_jaccard(followers, jaccard_k))
    mark("jaccard_top")
    fold = model._folds(u, c, community_folds) if community_folds > 1 else None
    for e in ENGAGEMENTS:
        mask = counts[e] > 0
        if fold is None:
            labels, sizes = _leiden(u[mask], c[mask], len(users), len(creators), seed, max_edges)
        else:  # labelling k leaves fold k's pairs out
            fits = [_leiden(u[mask & (fold != k)], c[mask & (fold != k)], len(users), len(creators), seed, max_edges)
                    for k in range(community_folds)]
            labels = np.stack([f[0] for f in fits])
            sizes = np.ones((community_folds, max(len(f[1]) for f in fits)))
            for k, f in enumerate(fits):
                sizes[k, :len(f[1])] = f[1]
        mark(f"leiden {e}")
        model.communities[e] = labels
        model.community_sizes[e] = sizes
    return model


GRAPH_COLUMNS = ["cf_similarity", "similar_creators_engaged"] + [
    f"{p}_{e}" for e in ENGAGEMENTS for p in ("same_community", "inv_community_size")
]
