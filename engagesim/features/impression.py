"""Impression rows + the fitted snapshot → the impression feature table.

Pure (polars/numpy): the Ray pipeline maps it over blocks, the benchmark's
single-process baseline calls it on the whole table, and scoring/serving call
it on new rows with an ``ImpressionState.context()``.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from engagesim.features import history
from engagesim.schema import ENGAGEMENTS

POST_ONLY = ("author_id", "username", "created_at", "likes", "split", "label_log1p_likes", "text_emb", "text_sketch",
             "image_emb")


def impression_post_columns(post_table: pl.DataFrame) -> pl.DataFrame:
    """The post features an impression row carries: everything but ids, labels and raw vectors, as post_*."""
    cols = [c for c in post_table.columns if c not in POST_ONLY]
    return post_table.select(cols).rename({c: f"post_{c}" for c in cols if c != "post_id"})


def with_topic(df: pl.DataFrame, topics: pl.DataFrame | None) -> pl.DataFrame:
    """Attach each impression's post topic (text cluster) so the user × topic history can be built."""
    if topics is None:
        return df
    return df.join(topics, on="post_id", how="left", maintain_order="left")


def join_impressions(batch: pa.Table, ctx: dict, origin_us: int, cutoff_us: int, window_hours: int,
                     history_mode: str) -> pa.Table:
    """Impression rows + everything fit on the training data (``ctx``) → the impression feature table.

    Pure: ``ctx`` holds plain objects (history lookup tables, the graph model, user attributes, post
    features), so the benchmark's single-process baseline calls exactly this on the whole table.
    """
    df = with_topic(history.with_labels_and_windows(pl.from_arrow(batch), origin_us, window_hours),
                     ctx.get("topics")).with_row_index("_i")
    is_valid = df["t_us"] >= cutoff_us
    parts = []
    for mask, mode, tables in ((~is_valid, history_mode, ctx["train_tables"]), (is_valid, "apply", ctx["apply_tables"])):
        rows = df.filter(mask)
        if rows.height:
            parts.append(pl.concat([rows.select("_i"), history.join_history(rows, tables, mode)], how="horizontal"))
    hist = pl.concat(parts).sort("_i").drop("_i")
    graph = ctx["graph"].features(df["user_id"], df["creator_id"])
    users = ctx["users"]
    impression_t = df.select("_i", "impression_at", "user_id", "creator_id")
    engaging = impression_t.join(users.rename({c: f"user_{c}" for c in users.columns if c != "user_id"}),
                                 on="user_id", how="left").sort("_i")
    creator = impression_t.join(users.rename({"user_id": "creator_id", **{c: f"creator_{c}" for c in users.columns
                                                                           if c != "user_id"}}),
                                on="creator_id", how="left").sort("_i")
    attrs = []
    for prefix, frame in (("user", engaging), ("creator", creator)):
        attrs.append(frame.select(
            *[pl.col(f"{prefix}_{c}") for c in ("follower_count", "following_count", "follower_ratio", "verified")],
            ((pl.col("impression_at") - pl.col(f"{prefix}__user_created")).dt.total_seconds() / 86400.0)
            .cast(pl.Float32).alias(f"{prefix}_account_age_days"),
        ))
    posts = df.select("_i", "post_id").join(ctx["posts"], on="post_id", how="left").sort("_i").drop("_i", "post_id")
    out = pl.concat(
        [
            df.select("user_id", "post_id", "creator_id", "impression_at",
                      pl.when(is_valid).then(pl.lit("valid")).otherwise(pl.lit("train")).alias("split"),
                      *[pl.col(f"y_{e}") for e in ENGAGEMENTS],
                      pl.col("follows_creator").cast(pl.Float32)),
            hist, graph, *attrs, posts,
        ],
        how="horizontal",
    )
    return out.to_arrow()


