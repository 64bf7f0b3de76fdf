"""Fitting the graph (``GraphModel``) from the history stage's (user, creator) aggregates: the engaged and
co-engaged matrices, the top-k Jaccard creators of each creator's followers and the Leiden communities — with
why each step is shaped as it is (the memory figures at 40M impressions). ``graph.py`` applies the fit."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import polars as pl
import scipy.sparse as sp

from engagesim.config import COMMUNITY_FOLDS, LEIDEN_MAX_EDGES
from engagesim.features.graph import GraphModel, Index, _matrix
from engagesim.schema import ENGAGEMENTS

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
