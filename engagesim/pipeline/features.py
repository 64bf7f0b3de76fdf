"""The feature stage: posts (+ users, impressions, media) → model-ready feature tables.

(config, input URIs) → ``<out>/posts`` (post level), ``<out>/impressions``
(impression level) and ``<out>/features.json`` (the feature manifest: name,
dtype, source method, leak class).

Row-local work streams through Ray Data (text statistics, embeddings and image
statistics in actor pools, the final impression joins). The engagement history —
the state that grows with the log's keys — is fit per block, combined by key
with a shuffle and joined partition against partition (``pipeline/partitioned.py``).
The graph is fit from the partitions' edge lists in a Ray task (not the driver)
while the partitioned joins run. Post features above ``features.post_stream_rows`` posts
are fit from partial sums and featurised on Ray Data (``pipeline/post_plane.py``); the
impressions meet them by a hash join on post_id above ``features.broadcast_max_rows``
posts. The graph and the smaller tables are broadcast to the final streaming join.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from engagesim import datasets, io
from engagesim.config import AppConfig
from engagesim.embed.actors import encoder_specs
from engagesim.features import history
from engagesim.features.impression import (
    impression_post_columns,
    join_impressions,
    post_side_columns,
    test_from,
    topics_of,
)
from engagesim.features.impression_ops import Graph, History, Joins, impression_ops
from engagesim.features.post import post_row_features
from engagesim.features.reach import impressions_per_post
from engagesim.features.state import ImpressionState, PostState, Provenance, user_attributes
from engagesim.pipeline import partitioned, post_plane
from engagesim.pipeline.post_plane import build_post_features  # noqa: F401 (the in-process executor)
from engagesim.runtime import ensure_ray


def _read_ds(uri: str, cfg: AppConfig):
    return datasets.read(uri, cfg.storage, cfg.features.blocks)


def _actor_args(cfg: AppConfig) -> dict[str, Any]:
    import ray

    return {
        "compute": ray.data.ActorPoolStrategy(size=cfg.embed.actors),
        "num_cpus": cfg.embed.cpus_per_actor,
        "num_gpus": cfg.embed.gpus_per_actor or None,
        "batch_size": cfg.embed.batch_size,
        "batch_format": "pyarrow",
    }


# --- post level -------------------------------------------------------------------------------

def _post_rows(cfg: AppConfig, posts_uri: str):
    """Text statistics, embeddings, sketches and image statistics: a Ray Dataset of post rows."""
    ds = _read_ds(posts_uri, cfg).map_batches(post_row_features, batch_format="pyarrow", batch_size=4096)
    for encoder, kwargs in encoder_specs(cfg.embed, cfg.storage):
        ds = ds.map_batches(encoder, fn_constructor_kwargs=kwargs, **_actor_args(cfg))
    return ds


# --- impression level --------------------------------------------------------------------------

def _join_impressions_ray(batch: pa.Table, ops: list, **kwargs) -> pa.Table:
    """The Ray Data side: the same pure join, the ops' broadcast tables fetched once per worker process."""
    return join_impressions(batch, datasets.resolved(ops), **kwargs)


class _Clock:
    """Wall seconds per phase, for the stage's summary."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 2)
        self._last = now


@dataclass
class _PostSide:
    """How impressions get their post's features: broadcast frames (refs), or datasets for a hash join."""

    posts: Any = None  # a frame, or the ref of one a task read (the driver never holds the written table)
    topics: Any = None
    posts_ds: Any = None
    topics_ds: Any = None
    names: list[str] = field(default_factory=list)  # the post columns an impression row gets (post_id included)
    joined: bool = False  # impressions meet their post's features by a hash join (else the table is broadcast)

    @classmethod
    def of(cls, cfg: AppConfig, posts: pl.DataFrame | str, parts: int) -> _PostSide:
        if isinstance(posts, pl.DataFrame):
            table = impression_post_columns(posts)
            return cls(posts=table, topics=topics_of(posts), names=table.columns)
        names = post_side_columns(io.dataset_schema(posts, cfg.storage).names)
        table = datasets.read(posts, cfg.storage, parts)
        side = cls(posts_ds=table.select_columns(list(names)).rename_columns(names), names=list(names.values()))
        if "text_cluster" in names:
            side.topics_ds = table.select_columns(["post_id", "text_cluster"]).rename_columns({"text_cluster": "topic"})
        if io.read_manifest(posts, cfg.storage).get("rows", 0) > cfg.features.broadcast_max_rows:
            side.joined = True
        else:  # broadcast: read in a task, so the table goes to the object store and the join workers only
            side.posts = datasets.in_task(_broadcast_posts, cfg, posts)
            if side.topics_ds is not None:
                side.topics = datasets.in_task(_broadcast_topics, cfg, posts)
        return side

    def frames(self) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
        """The (posts, topics) frames the caller passed, which the state saves (the datasets save themselves)."""
        return (self.posts, self.topics) if isinstance(self.posts, pl.DataFrame) else (None, None)

    def save(self, cfg: AppConfig, state_uri: str, state: ImpressionState) -> None:
        """The serving snapshot's post tables, written as parts by Ray Data (``ImpressionState.load`` reads them)."""
        datasets.write_streaming(self.posts_ds, io.join(state_uri, "posts"), "impression_posts", cfg.storage)
        state.saved_parts.append("posts")
        if self.topics_ds is not None:
            datasets.write_streaming(self.topics_ds, io.join(state_uri, "topics"), "topics", cfg.storage)
            state.saved_parts.append("topics")


def _as_ref(value: Any) -> Any:
    """An object ref as it is; anything else (a frame the caller passed, None) put into the object store."""
    import ray

    return value if isinstance(value, ray.ObjectRef) else ray.put(value)


def _broadcast_posts(cfg: AppConfig, uri: str) -> pl.DataFrame:
    return impression_post_columns(post_plane.impression_side(cfg, uri))


def _broadcast_topics(cfg: AppConfig, uri: str) -> pl.DataFrame:
    return topics_of(pl.from_arrow(io.read_table(uri, cfg.storage, columns=["post_id", "text_cluster"])))


def _users_table(uri: str | None, storage, save_uri: str) -> pl.DataFrame:
    """The account attributes the impression join looks users and creators up in, saved into the state (in a
    task: the driver never holds the users table)."""
    users = user_attributes(pl.from_arrow(io.read_table(uri, storage))) if uri else pl.DataFrame(
        schema={"user_id": pl.String, "follower_count": pl.Float32, "following_count": pl.Float32,
                "follower_ratio": pl.Float32, "verified": pl.Float32, "_user_created": pl.Datetime("us", "UTC")})
    io.write_parquet(save_uri, users, storage)
    return users


def impression_span(cfg: AppConfig, uri: str) -> tuple[int, int, int]:
    """(rows, first impression, training cutoff), times in µs: impressions in the last ``features.valid_hours``
    validate. From the Parquet footers when they carry statistics (free), else two Ray Data aggregations."""
    stats = io.column_range(uri, "impression_at", cfg.storage)
    if stats is None:
        ds = _read_ds(uri, cfg)
        stats = ds.count(), ds.min("impression_at"), ds.max("impression_at")
    rows, first, last = stats
    return rows, datasets.epoch_us(first), datasets.epoch_us(last) - int(cfg.features.valid_hours * 3600 * 1e6)


def impression_counts(cfg: AppConfig, interactions_uri: str, cutoff_us: int) -> pl.DataFrame:
    """Partial per-post impression counts before the training cutoff (one streaming pass; parts are
    summed by ``AuthorReach.fit``)."""
    ds = _read_ds(interactions_uri, cfg)
    return pl.from_arrow(datasets.collect(ds.map_batches(impressions_per_post, batch_format="pyarrow", batch_size=None,
                                                 fn_kwargs={"cutoff_us": cutoff_us})))


def build_impression_features(cfg: AppConfig, interactions_uri: str, users_uri: str | None,
                              posts: pl.DataFrame | str, out_uri: str, state_uri: str,
                              span: tuple[int, int, int] | None = None) -> tuple[dict, ImpressionState]:
    """Impression features for every row, and the snapshot (``ImpressionState``) new rows are joined to.

    ``posts``: the post feature table, or the URI of the written one. Over ``features.broadcast_max_rows``
    posts the impressions meet their post's features (and topic) by a hash join on post_id; below it the
    narrow post table is broadcast.

    The history is fit and joined hash-partitioned by key (``pipeline/partitioned.py``); its apply tables
    are written as parts straight into ``state_uri``. ``span`` is ``impression_span``'s (rows, origin,
    cutoff) when the caller already has it.
    """
    import ray

    f = cfg.features
    clock = _Clock()
    ds = _read_ds(interactions_uri, cfg)
    n_rows, origin_us, cutoff_us = span or impression_span(cfg, interactions_uri)
    parts = f.partitions or partitioned.auto_parts(n_rows, f.blocks, f.partition_rows)
    scratch = out_uri.rstrip("/") + "_history_train"
    layout = partitioned.Layout(io.join(state_uri, "history"), scratch, parts, cfg.storage)

    side = _PostSide.of(cfg, posts, parts)
    if side.topics_ds is not None and side.joined:  # each impression's topic by a hash join, before the history
        ds = ds.join(side.topics_ds, "left_outer", num_partitions=parts, on=("post_id",))
    topics_refs = {"topics": _as_ref(side.topics)} if side.topics is not None else {}
    has_topics = side.topics is not None or side.topics_ds is not None
    # The state's ops hold no tables: the history parts, the graph and the users are saved by the tasks that
    # made them, the posts' datasets by ``side.save``; only frames the caller passed are saved with the state.
    state = ImpressionState(origin_us, cutoff_us, f.window_hours,
                            impression_ops([p for p in history.GROUPS if p != "topic" or has_topics], f.history_mode,
                                           f.jaccard_k, f.seed, None, *side.frames(), side.names,
                                           f.leiden_max_edges, f.community_folds),
                            saved_parts=["history", "graph", "users"])
    test_from_us = test_from(cutoff_us, f.valid_hours, f.test_share)
    train_rows, n_edges = partitioned.fit_history(ds, layout, origin_us, cutoff_us, f.window_hours,
                                                  [op for op in state.ops if isinstance(op, History)],
                                                  topics_refs.get("topics"), test_from_us)
    clock.lap("history_fit")
    # A group no training row reached (an empty log) has no tables to join.
    state.ops = [op for op in state.ops if not isinstance(op, History) or op.prefix in train_rows]
    groups = [op.prefix for op in state.ops if isinstance(op, History)]
    rounds, broadcast = partitioned.split_by_size(train_rows, f.broadcast_max_rows)
    # The graph is fit from the pair aggregates' edges (training rows only), in a task, while the joins run.
    graph_ref, graph_seconds = partitioned.fit_graph_task(layout, io.join(state_uri, "graph"), f.jaccard_k, f.seed,
                                                          f.leiden_max_edges, f.community_folds)
    # Broadcast tables are read by tasks: the driver hands refs on and holds none of them.
    users_ref = datasets.in_task(_users_table, users_uri, cfg.storage, io.join(state_uri, "users.parquet"))
    # The ops as the join tasks hold them: broadcast tables by ref (fetched once per worker); a group joined
    # partition against partition, and posts met by a hash join, arrive as columns of the rows.
    task_ops = impression_ops(groups, f.history_mode, f.jaccard_k, f.seed, users_ref,
                              None if side.joined else _as_ref(side.posts),
                              topics_refs.get("topics"), side.names)
    for op in task_ops:
        if isinstance(op, History) and op.prefix in broadcast:
            op.train, op.apply, op.recent = (datasets.in_task(layout.read, op.prefix, mode)
                                             for mode in ("train", "apply", "recent"))
        elif isinstance(op, Graph):
            op.model = graph_ref
    join_kwargs = {"origin_us": origin_us, "cutoff_us": cutoff_us, "window_hours": f.window_hours,
                   "history_mode": f.history_mode, "test_from_us": test_from_us}
    keyed = partitioned.join_rounds(ds, rounds, layout, topics_refs, **join_kwargs)
    if side.joined:
        keyed = keyed.join(side.posts_ds, "left_outer", num_partitions=parts, on=("post_id",))
    if side.posts_ds is not None:
        side.save(cfg, state_uri, state)
    joined = keyed.map_batches(_join_impressions_ray, batch_format="pyarrow", batch_size=100_000,
                               fn_kwargs={"ops": task_ops, "origin_us": origin_us, "window_hours": f.window_hours,
                                          "at": Joins(cutoff_us, f.history_mode, test_from_us=test_from_us)})
    rows = datasets.write_streaming(joined, out_uri, "impression_features", cfg.storage,
                                    {"cutoff": cutoff_us, "origin": origin_us})
    clock.lap("join_and_write")
    io.remove_tree(scratch, cfg.storage)
    # Counted on Ray Data from the written parts (the driver gets a row of counts per block, not the column).
    from engagesim.pipeline.validation import count_splits

    split_rows = {split: n for split, n in count_splits(datasets.read(out_uri, cfg.storage)).items() if n}
    return ({"rows": split_rows, "total_rows": rows, "cutoff_us": cutoff_us,
             "test_from_us": test_from_us, "origin_us": origin_us,
             "posts": "hash join on post_id" if side.joined else "broadcast",
             "history": {"partitions": parts, "partitioned": {k: v for k, v in rounds.items()},
                         "broadcast": broadcast, "train_rows": train_rows, "graph_edges": n_edges},
             "seconds": {**clock.laps, "graph_fit_task": ray.get(graph_seconds)}},
            state)


# --- manifest and entry point ------------------------------------------------------------------

def manifest(tables: dict[str, pa.Schema], made_by: dict[str, dict[str, Provenance]]) -> list[dict]:
    """One entry per column of each table: the method and leak class of the op that made it (``made_by``: per
    table, column → provenance); a column no op made is the row's own (ids, labels, the follow flag)."""
    own = Provenance("row-local statistics / attributes", "no labels")
    return [{"table": table, "name": f.name, "dtype": str(f.type), "source": made_by.get(table, {}).get(f.name, own).source,
             "leak": made_by.get(table, {}).get(f.name, own).leak} for table, schema in tables.items() for f in schema]


def _posts_in_process(cfg: AppConfig, posts_uri: str, out_uri: str, users: pl.DataFrame | None,
                      counts: tuple[pl.DataFrame, int] | None) -> tuple[dict, PostState]:
    """``features.te_mode=past``: the in-process executor (every earlier post of a key, in time order)."""
    table, info, state = build_post_features(cfg, datasets.collect(_post_rows(cfg, posts_uri)), users, counts)
    state.save(io.join(out_uri, "state", "posts"), cfg.storage)
    writer = io.DatasetWriter(io.join(out_uri, "posts"), "post_features", cfg.storage)
    for lo in range(0, table.height, 200_000):
        writer.write(table.slice(lo, 200_000).to_arrow())
    writer.commit(info)
    return info, state


def run_features(cfg: AppConfig, posts_uri: str, out_uri: str, users_uri: str | None = None,
                 interactions_uri: str | None = None, log: Callable[[str], None] = lambda _: None) -> dict:
    ensure_ray(cfg.ray)
    started = time.perf_counter()
    users = pl.from_arrow(io.read_table(users_uri, cfg.storage)) if users_uri else None
    span = None
    if interactions_uri:  # the log's span once: it sets the cutoff for author reach and for the history
        span = impression_span(cfg, interactions_uri)
    posts_out = io.join(out_uri, "posts")
    n_posts = io.read_manifest(posts_uri, cfg.storage).get("rows", 0)
    if cfg.features.te_mode == "past" or n_posts <= cfg.features.post_stream_rows:
        log("post features in process: " + ("features.te_mode=past needs each key's earlier posts in time order"
                                            if cfg.features.te_mode == "past" else
                                            f"{n_posts:,} posts <= features.post_stream_rows"))
        counts = (impression_counts(cfg, interactions_uri, span[2]), span[2]) if span else None
        post_info, post_state = _posts_in_process(cfg, posts_uri, out_uri, users, counts)
    else:
        post_info, post_state = post_plane.run_post_plane(
            cfg, _post_rows(cfg, posts_uri), out_uri.rstrip("/") + "_post_rows", posts_out,
            io.join(out_uri, "state", "posts"), users, _read_ds(interactions_uri, cfg) if interactions_uri else None,
            span[2] if span else None, log)
    made_by = {"posts": post_state.provenance()}
    del post_state, users  # the post stage's tables: the impression stage's workers read their own
    schemas = {"posts": io.dataset_schema(posts_out, cfg.storage)}
    summary: dict[str, Any] = {"posts": post_info, "out": out_uri}
    log(f"post features: {post_info['rows']:,} rows × {len(schemas['posts'].names)} columns")
    if interactions_uri:
        imp, imp_state = build_impression_features(cfg, interactions_uri, users_uri, posts_out,
                                                   io.join(out_uri, "impressions"),
                                                   io.join(out_uri, "state", "impressions"), span)
        imp_state.save(io.join(out_uri, "state", "impressions"), cfg.storage)
        # An impression row's post_<name> columns are the post op's that made <name>.
        made_by["impressions"] = {**{f"post_{k}": v for k, v in made_by["posts"].items()}, **imp_state.provenance()}
        summary["impressions"] = imp
        schemas["impressions"] = pq.read_schema(
            io.dataset_files(io.join(out_uri, "impressions"), cfg.storage)[0],
            filesystem=io.filesystem(out_uri, cfg.storage)[0])
        log(f"impression features: {imp['rows']}")
    summary["seconds"] = round(time.perf_counter() - started, 2)
    io.write_json(io.join(out_uri, "features.json"), {"summary": summary, "features": manifest(schemas, made_by)},
                  cfg.storage)
    return summary
