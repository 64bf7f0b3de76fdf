"""Time features: when a post went out, how long since the account's previous post, account age."""

from __future__ import annotations

import polars as pl

TEMPORAL_COLUMNS = ["day_of_week", "hour", "month", "secs_since_prev_post", "account_age_days"]


def temporal_features(posts: pl.DataFrame, users: pl.DataFrame | None = None,
                      known: pl.DataFrame | None = None) -> pl.DataFrame:
    """Day of week (0 = Monday), hour and month (UTC), seconds since the same account's previous post
    (Adobe; null when no earlier post of the account is known) and the author's account age in days
    (null without a users table).

    ``known`` are the posts a "previous post" may be (post_id, author_id, created_at): the batch itself
    by default; at scoring time the snapshot of posts the run saw, so one post scored alone gets the
    same value as in the batch pipeline.
    """
    known = posts if known is None else known
    earlier = known.select("author_id", pl.col("created_at").alias("_prev")).sort("_prev")
    ordered = posts.select("post_id", "author_id", "created_at").with_row_index("_i").sort("created_at")
    ordered = ordered.join_asof(earlier, left_on="created_at", right_on="_prev", by="author_id",
                                strategy="backward", allow_exact_matches=False, check_sortedness=False)
    out = ordered.with_columns(
        (pl.col("created_at") - pl.col("_prev")).dt.total_seconds().cast(pl.Float32).alias("secs_since_prev_post"),
        (pl.col("created_at").dt.weekday() - 1).cast(pl.Int8).alias("day_of_week"),
        pl.col("created_at").dt.hour().cast(pl.Int8).alias("hour"),
        pl.col("created_at").dt.month().cast(pl.Int8).alias("month"),
    )
    if users is not None:
        accounts = users.select(pl.col("user_id").alias("author_id"), pl.col("created_at").alias("_account_created"))
        out = out.join(accounts, on="author_id", how="left").with_columns(
            ((pl.col("created_at") - pl.col("_account_created")).dt.total_seconds() / 86400.0)
            .cast(pl.Float32)
            .alias("account_age_days")
        )
    else:
        out = out.with_columns(pl.lit(None, dtype=pl.Float32).alias("account_age_days"))
    # Back to the caller's row order.
    return out.sort("_i").select("post_id", *TEMPORAL_COLUMNS)
