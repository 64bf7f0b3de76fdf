"""Impression rows + the fitted snapshot → the impression feature table.

Pure (polars/numpy): the Ray pipeline maps it over blocks, the benchmark's
single-process baseline calls it on the whole table, and scoring/serving call
it on new rows with an ``ImpressionState.context()``.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from engagesim.features import history
from engagesim.features.lookup import left_lookup
from engagesim.schema import ENGAGEMENTS

POST_ONLY = ("author_id", "username", "created_at", "likes", "split", "label_log1p_likes", "text_emb", "text_sketch",
             "image_emb")


def post_side_columns(columns: list[str]) -> dict[str, str]:
    """Post table column → its name on an impression row: everything but ids, labels and raw vectors, as post_*."""
    return {c: c if c == "post_id" else f"post_{c}" for c in columns if c not in POST_ONLY}


def impression_post_columns(post_table: pl.DataFrame) -> pl.DataFrame:
    """The post features an impression row carries (``post_side_columns``)."""
    names = post_side_columns(post_table.columns)
    return post_table.select(list(names)).rename(names)


def topics_of(post_table: pl.DataFrame) -> pl.DataFrame | None:
    """post_id → topic (the text cluster), or None when posts carry no text embedding."""
    if "text_cluster" not in post_table.columns:
        return None
    return post_table.select("post_id", pl.col("text_cluster").alias("topic"))


def with_topic(df: pl.DataFrame, topics: pl.DataFrame | None, extra: pl.DataFrame | None = None) -> pl.DataFrame:
    """Attach each impression's post topic (text cluster) so the user × topic history can be built
    (``extra``: topics of posts the snapshot lacks, e.g. a request's new post)."""
    if topics is None:
        return df
    if "topic" in df.columns:  # the join would keep both
        return df.join(topics if extra is None else pl.concat([topics, extra], how="vertical_relaxed"),
                       on="post_id", how="left", maintain_order="left")
    return left_lookup(df, topics, "post_id", extra)


def prepare(batch: pa.Table, ctx: dict, origin_us: int, window_hours: int) -> pl.DataFrame:
    """Labels, µs time, window index and topic of each impression row (the history join's inputs)."""
    return with_topic(history.with_labels_and_windows(pl.from_arrow(batch), origin_us, window_hours),
                      ctx.get("topics"), ctx.get("topics_extra"))


def history_columns(df: pl.DataFrame, train_tables: dict, apply_tables: dict, cutoff_us: int,
                    history_mode: str) -> pl.DataFrame:
    """History features of ``df`` (from ``prepare``) for the groups in the tables; row-aligned.

    Training rows read the ``history_mode`` tables (key × window), rows past the cutoff the apply totals.
    """
    if not train_tables and not apply_tables:
        return pl.DataFrame()
    df = df.with_row_index("_i")
    is_valid = df["t_us"] >= cutoff_us
    parts = []
    for mask, mode, tables in ((~is_valid, history_mode, train_tables), (is_valid, "apply", apply_tables)):
        rows = df.filter(mask)
        if rows.height:
            parts.append(pl.concat([rows.select("_i"), history.join_history(rows, tables, mode)], how="horizontal"))
    return pl.concat(parts).sort("_i").drop("_i")


def test_from(cutoff_us: int, valid_hours: float, test_share: float) -> int:
    """Where the test split starts (µs): the latest ``test_share`` of the held-out hours after the cutoff."""
    return cutoff_us + int((1 - test_share) * valid_hours * 3600 * 1e6)


def join_impressions(batch: pa.Table, ctx: dict, origin_us: int, cutoff_us: int, window_hours: int,
                     history_mode: str, done: tuple[str, ...] = (), post_columns: tuple[str, ...] = (),
                     test_from_us: int | None = None) -> pa.Table:
    """Impression rows + everything fit on the training data (``ctx``) → the impression feature table.

    Pure: ``ctx`` holds plain objects (history lookup tables, the graph model, user attributes, post
    features), so the benchmark's single-process baseline calls exactly this on the whole table.
    ``done`` names history groups whose columns the batch already carries (joined partition by partition
    earlier, ``features/partitioned.py``); their columns are kept in the place the in-process join puts them.
    Likewise ``ctx["posts"] = None``: the batch already carries ``post_columns`` (a hash join on post_id).
    Rows from ``cutoff_us`` are "valid", from ``test_from_us`` (None: never) "test"; both are apply-mode.
    """
    df = prepare(batch, ctx, origin_us, window_hours)
    is_valid = df["t_us"] >= cutoff_us
    fresh = history_columns(df, ctx["train_tables"], ctx["apply_tables"], cutoff_us, history_mode)
    present = [p for p in history.GROUPS if p in ctx["apply_tables"] or p in done]
    carried = df.select([c for p in done for c in history.column_names(p)])
    hist = pl.concat([f for f in (fresh, carried) if f.width], how="horizontal") if fresh.width or carried.width \
        else pl.DataFrame()
    hist = hist.select([c for p in present for c in history.column_names(p)])
    df = df.with_row_index("_i")
    graph = ctx["graph"].features(df["user_id"], df["creator_id"])
    users = ctx["users"]
    attrs = []
    for prefix, key in (("user", "user_id"), ("creator", "creator_id")):
        found = left_lookup(df.select(pl.col(key).alias("user_id")), users, "user_id").drop("user_id")
        frame = pl.concat([df.select("impression_at"), found.rename({c: f"{prefix}_{c}" for c in found.columns})], how="horizontal")
        attrs.append(frame.select(
            *[pl.col(f"{prefix}_{c}") for c in ("follower_count", "following_count", "follower_ratio", "verified")],
            ((pl.col("impression_at") - pl.col(f"{prefix}__user_created")).dt.total_seconds() / 86400.0)
            .cast(pl.Float32).alias(f"{prefix}_account_age_days"),
        ))
    if ctx["posts"] is None:
        posts = df.select(list(post_columns))
    else:
        posts = left_lookup(df.select("post_id"), ctx["posts"], "post_id", ctx.get("posts_extra")).drop("post_id")
    split = pl.when(is_valid).then(pl.lit("valid")).otherwise(pl.lit("train"))
    if test_from_us is not None:
        split = pl.when(pl.col("t_us") >= test_from_us).then(pl.lit("test")).otherwise(split)
    out = pl.concat(
        [
            df.select("user_id", "post_id", "creator_id", "impression_at",
                      split.alias("split"),
                      *[pl.col(f"y_{e}") for e in ENGAGEMENTS],
                      pl.col("follows_creator").cast(pl.Float32)),
            hist, graph, *attrs, posts,
        ],
        how="horizontal",
    )
    return out.to_arrow()


def features_in_process(interactions: pa.Table, post_table: pl.DataFrame, users: pl.DataFrame,
                        valid_hours: float, window_hours: int, history_mode: str, jaccard_k: int = 20,
                        seed: int = 0, *, test_share: float) -> pa.Table:
    """The in-process executor: the whole impression feature table from one polars frame.

    The same functions the Ray pipeline maps over blocks and partitions (``pipeline/partitioned.py``), with
    every table fit in this process. What the benchmark's single-process baseline runs, and the reference
    the Ray executor's tables are tested against.
    """
    from engagesim.features.graph import fit_graph
    from engagesim.features.state import user_attributes

    topics = topics_of(post_table)
    t = pl.from_arrow(interactions.select(["impression_at"]))["impression_at"].dt.epoch("us")
    origin_us, cutoff_us = int(t.min()), int(t.max()) - int(valid_hours * 3600 * 1e6)
    df = with_topic(history.with_labels_and_windows(pl.from_arrow(interactions), origin_us, window_hours), topics)
    train = df.filter(pl.col("t_us") < cutoff_us)
    aggregates = history.window_aggregates(train)
    ctx = {"train_tables": history.feature_tables(aggregates, history_mode),
           "apply_tables": history.feature_tables(aggregates, "apply"),
           "graph": fit_graph(train, jaccard_k, seed),
           "users": user_attributes(users),
           "posts": impression_post_columns(post_table), **({"topics": topics} if topics is not None else {})}
    return join_impressions(interactions, ctx, origin_us, cutoff_us, window_hours, history_mode,
                            test_from_us=test_from(cutoff_us, valid_hours, test_share))
