"""Impression history, hash-partitioned by key: no process holds every key's history.

The distributed executor of the ``History`` and ``Graph`` ops (``features/impression_ops.py``; the in-process
one is ``features.impression.features_in_process``; both run the same pure functions, and a test holds their
tables equal):

1. **Partial fits per block.** Each block of the log gives sums / maxima per key × window
   (``history.window_aggregates``), cut by ``hash(partition key) % parts`` (``history.PARTITION_KEY``: the
   user-keyed groups — user, pair, topic — share ``user_id``).
2. **Combine by key with a shuffle.** ``groupby("_part").map_groups``: one task per partition combines
   that partition's pieces, derives its training (window / past) and apply tables and writes them as
   Parquet parts — the only copy — and its (user, creator) edges (``graph_fit.graph_edges``: engaged or followed
   pairs only) as a part of the edge list the graph is fit from. The driver gets row counts only.
3. **Join partition against partition.** A group whose training table has more than
   ``features.broadcast_max_rows`` rows is joined by shuffling the impressions on the same partition id
   (one shuffle per partition key) so that each task reads only its partition's tables; smaller tables,
   the graph, account attributes and post features are broadcast to the final map (``join_impressions``).
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from engagesim import datasets, io
from engagesim.config import COMMUNITY_FOLDS, LEIDEN_MAX_EDGES, StorageConfig
from engagesim.features import history
from engagesim.features.graph_fit import graph_edges
from engagesim.features.impression import prepare, with_topic
from engagesim.features.impression_ops import History, Joins
from engagesim.features.ops import sum_by_keys
from engagesim.features.state import read_parts

PART = "_part"
MODES = ("train", "apply", "recent", "latest")  # recent, latest: History.extend's held-out snapshots
PERIODS = ("train", "validation", "test")  # which events a partial fit was made from


def partition_id(key: str, parts: int) -> pl.Expr:
    """The partition of a key (polars' seeded hash: stable across processes of one polars version)."""
    return (pl.col(key).hash(seed=0) % parts).cast(pl.Int32).alias(PART)


def auto_parts(rows: int, blocks: int, rows_per_part: int) -> int:
    """At least one partition per block, and about ``rows_per_part`` impressions per join task."""
    return max(blocks, math.ceil(rows / rows_per_part))


@dataclass(frozen=True)
class Layout:
    """Where the partitioned tables go: apply tables into the saved state, training tables to scratch."""

    apply_uri: str
    train_uri: str
    parts: int
    storage: StorageConfig | None = None

    def path(self, prefix: str, mode: str, part: int) -> str:
        root = self.train_uri if mode == "train" else self.apply_uri
        return io.join(root, prefix, mode, f"part-{part:05d}.parquet")

    def edges_uri(self) -> str:
        return io.join(self.train_uri, "_edges")

    def read(self, prefix: str, mode: str, part: int | None = None) -> pl.DataFrame:
        """One partition of a table, or (``part=None``, for broadcasting) all of them."""
        if part is None:
            return read_parts(io.join(self.train_uri if mode == "train" else self.apply_uri, prefix, mode),
                              self.storage)
        return io.read_parquet(self.path(prefix, mode, part), self.storage)


def partial_aggregates(batch: pa.Table, origin_us: int, cutoff_us: int, window_hours: int, parts: int,
                       ops: list[History], topics=None, test_from_us: int | None = None) -> pa.Table:
    """One block → each ``History`` op's partial fit of each period's events (training; validation and test,
    for the held-out snapshots), cut by key-hash partition, as Arrow IPC payloads."""
    topics = datasets.fetched({"topics": topics})["topics"] if topics is not None else None
    df = with_topic(history.with_labels_and_windows(pl.from_arrow(batch), origin_us, window_hours), topics)
    test_from_us = 2**62 if test_from_us is None else test_from_us
    periods = (df.filter(pl.col("t_us") < cutoff_us),
               df.filter((pl.col("t_us") >= cutoff_us) & (pl.col("t_us") < test_from_us)),
               df.filter(pl.col("t_us") >= test_from_us))
    prefixes, kinds, ids, payloads = [], [], [], []
    for period, events in zip(PERIODS, periods, strict=True):
        if not events.height:
            continue
        for op in ops:
            cut = op.fit_partial(events).with_columns(partition_id(history.PARTITION_KEY[op.prefix], parts))
            for (part,), piece in cut.partition_by(PART, as_dict=True).items():
                prefixes.append(op.prefix)
                kinds.append(period)
                ids.append(part)
                payloads.append(io.frame_bytes(piece.drop(PART)))
    return pa.table({"prefix": pa.array(prefixes, pa.string()), "period": pa.array(kinds, pa.string()),
                     PART: pa.array(ids, pa.int32()), "ipc": pa.array(payloads, pa.binary())})


def combine_partition(group: pa.Table, layout: Layout, ops: list[History]) -> pa.Table:
    """All pieces of one partition → each op combined on them, its tables written (training, apply and the
    held-out snapshots, ``History.extend``); row counts.

    The pair op's combined part also gives this partition's graph edges (``Graph``'s keyed part: every
    (user, creator) of a user is in that user's partition, so the edges are final here)."""
    part = group.column(PART)[0].as_py()
    pieces: dict[tuple[str, str], list[pl.DataFrame]] = {}
    for prefix, period, payload in zip(group.column("prefix").to_pylist(), group.column("period").to_pylist(),
                                       group.column("ipc").to_pylist()):
        pieces.setdefault((prefix, period), []).append(io.frame_of_bytes(payload))
    rows, edges = {}, 0
    for op in ops:
        have = [period for period in PERIODS if (op.prefix, period) in pieces]
        if not have:
            continue
        fitted = copy.copy(op)
        # A partition whose keys all arrived after the cutoff (cold users only) has no training piece: empty
        # training tables, and its held-out snapshots still hold those users' later events.
        train = pl.concat(pieces[op.prefix, "train"]) if "train" in have else pieces[op.prefix, have[0]][0].clear()
        summed = sum_by_keys(fitted, train)
        fitted.combine([summed])
        fitted.extend(*(sum_by_keys(fitted, pl.concat(pieces[op.prefix, period]))
                        if (op.prefix, period) in pieces else None for period in PERIODS[1:]))
        for mode in MODES:
            table = getattr(fitted, mode)
            io.write_parquet(layout.path(op.prefix, mode, part), table, layout.storage)
            rows[op.prefix, mode] = table.height
        if op.prefix == "pair":
            table = graph_edges(summed)
            io.write_parquet(io.join(layout.edges_uri(), f"part-{part:05d}.parquet"), table, layout.storage)
            edges = table.height
    prefixes = sorted(p for p, mode in rows if mode == "apply")
    return pa.table({"prefix": prefixes, PART: pa.array([part] * len(prefixes), pa.int32()),
                     "train_rows": [rows[p, "train"] for p in prefixes],
                     "apply_rows": [rows[p, "apply"] for p in prefixes],
                     "edges": [edges if p == "pair" else 0 for p in prefixes]})


def fit_history(ds, layout: Layout, origin_us: int, cutoff_us: int, window_hours: int, ops: list[History],
                topics_ref=None, test_from_us: int | None = None) -> tuple[dict[str, int], int]:
    """Passes 1 and 2: every ``History`` op fit per block, combined per key-hash partition, its tables written
    partition by partition, and the graph's edge list with them.

    Returns the training-table rows per group and the number of edges (``Layout.edges_uri`` holds them).
    """
    pieces = ds.map_batches(partial_aggregates, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"origin_us": origin_us, "cutoff_us": cutoff_us, "window_hours": window_hours,
                                       "parts": layout.parts, "ops": ops, "topics": topics_ref,
                                       "test_from_us": test_from_us})
    combined = pieces.groupby(PART, num_partitions=layout.parts).map_groups(
        combine_partition, batch_format="pyarrow", fn_kwargs={"layout": layout, "ops": ops})
    summary = pl.from_arrow(datasets.collect(combined))
    _fill_missing(layout, summary)
    train_rows = {p: int(n) for p, n in summary.group_by("prefix").agg(pl.col("train_rows").sum()).iter_rows()}
    return train_rows, int(summary["edges"].sum())


def fit_graph_task(layout: Layout, save_uri: str, jaccard_k: int, seed: int, max_edges: int | None = LEIDEN_MAX_EDGES,
                   community_folds: int = COMMUNITY_FOLDS):
    """Fit the graph from the edge parts in a Ray task and save it there: (graph ref, seconds ref).

    Leiden is a global algorithm, so one process holds the whole edge list (engaged or followed pairs, far
    fewer than impressions: 637,794 at 2M); that process is a worker, not the driver, and it runs while the
    partitioned joins do. The join tasks fetch the graph from the object store; the driver never does.
    """
    return _graph_remote().remote(layout.edges_uri(), save_uri, layout.storage, jaccard_k, seed, max_edges,
                                  community_folds)


def _graph_task(edges_uri: str, save_uri: str, storage, jaccard_k: int, seed: int,
                max_edges: int | None = LEIDEN_MAX_EDGES, community_folds: int = COMMUNITY_FOLDS) -> tuple:
    """The task's body: (graph, seconds). No edge parts (no training engagements) fit an empty graph."""
    from engagesim.features.graph_fit import fit_graph_from_pairs

    start = time.perf_counter()
    fs, _ = io.filesystem(edges_uri, storage)
    files = sorted(f for f in io.list_files(edges_uri, storage) if f.endswith(".parquet"))
    # One part at a time: the fit codes each part's keys as it reads it (graph_fit.coded_edges), so no frame of
    # every edge's string keys exists in this process.
    parts = (pl.from_arrow(pq.read_table(f, filesystem=fs)) for f in files)
    graph = fit_graph_from_pairs(parts, jaccard_k, seed=seed, max_edges=max_edges, community_folds=community_folds)
    graph.save(save_uri, storage)
    return graph, round(time.perf_counter() - start, 2)


@functools.cache
def _graph_remote():
    """The task, registered once per driver (Ray imported only when a stage runs it)."""
    import ray

    return ray.remote(num_returns=2)(_graph_task)


def _fill_missing(layout: Layout, summary: pl.DataFrame) -> None:
    """A partition no key hashed to still gets an (empty) part, so a join task can always read its own."""
    for prefix in summary["prefix"].unique().to_list():
        have = set(summary.filter(pl.col("prefix") == prefix)[PART].to_list())
        for mode in MODES:
            schema = None
            for part in sorted(set(range(layout.parts)) - have):
                if schema is None:
                    fs, path = io.filesystem(layout.path(prefix, mode, next(iter(have))), layout.storage)
                    schema = pq.read_schema(path, filesystem=fs)
                io.write_parquet(layout.path(prefix, mode, part), pl.from_arrow(schema.empty_table()), layout.storage)


def split_by_size(train_rows: dict[str, int], broadcast_max_rows: int) -> tuple[dict[str, list[str]], list[str]]:
    """(partition key → groups joined partition against partition, groups broadcast).

    The rounds come in the order they should run: fewest groups first. Each round's shuffle carries the columns
    the rounds before it added (13 per group), so the post_id round (one group) goes before the user_id round
    (user, pair and topic): at 10M impressions that shuffle moves 10M × 13 floats instead of 10M × 39."""
    rounds: dict[str, list[str]] = {}
    broadcast = []
    for prefix in history.GROUPS:
        if prefix not in train_rows:
            continue
        if train_rows[prefix] > broadcast_max_rows:
            rounds.setdefault(history.PARTITION_KEY[prefix], []).append(prefix)
        else:
            broadcast.append(prefix)
    return dict(sorted(rounds.items(), key=lambda item: len(item[1]))), broadcast


def join_partition(group: pa.Table, layout: Layout, prefixes: list[str], refs: dict, origin_us: int,
                   cutoff_us: int, window_hours: int, history_mode: str, test_from_us: int | None = None) -> pa.Table:
    """One partition of impressions + that partition's tables of ``prefixes`` → the rows with those columns
    (each group's ``History`` op, holding only this partition's tables)."""
    part = group.column(PART)[0].as_py()
    batch = group.drop_columns([PART])
    df = prepare(batch, origin_us, window_hours, datasets.fetched(refs).get("topics") if refs else None)
    ops = [History(p, history_mode, *(layout.read(p, mode, part) for mode in ("train", "apply", "recent")))
           for p in prefixes]
    at = Joins(cutoff_us, history_mode, test_from_us=test_from_us)
    return pl.concat([pl.from_arrow(batch), *[op.transform(df, at) for op in ops]], how="horizontal").to_arrow()


def join_rounds(ds, rounds: dict[str, list[str]], layout: Layout, topics_refs: dict, **kwargs):
    """One shuffle per partition key: the impressions meet their partition's tables (pass 3, before the
    broadcast join)."""
    for key, prefixes in rounds.items():
        keyed = ds.map_batches(_with_part, batch_format="pyarrow", fn_kwargs={"key": key, "parts": layout.parts})
        ds = keyed.groupby(PART, num_partitions=layout.parts).map_groups(
            join_partition, batch_format="pyarrow",
            fn_kwargs={"layout": layout, "prefixes": prefixes, "refs": topics_refs, **kwargs})
    return ds


def _with_part(batch: pa.Table, key: str, parts: int) -> pa.Table:
    return pl.from_arrow(batch).with_columns(partition_id(key, parts)).to_arrow()
