"""Time features: when a post went out, how long since the account's previous post, account age."""

from __future__ import annotations

import polars as pl

from engagesim.features.lookup import left_lookup

TEMPORAL_COLUMNS = ["day_of_week", "hour", "month", "secs_since_prev_post", "account_age_days"]


def earlier_posts(known: pl.DataFrame) -> pl.DataFrame:
    """The posts a "previous post" may be, as the as-of join reads them: author_id, _prev (sorted)."""
    return known.select("author_id", pl.col("created_at").alias("_prev")).sort("_prev")


def account_created(users: pl.DataFrame) -> pl.DataFrame:
    """author_id, _account_created: when each account was made, as the account-age lookup reads it."""
    return users.select(pl.col("user_id").alias("author_id"), pl.col("created_at").alias("_account_created"))


def temporal_features(posts: pl.DataFrame, users: pl.DataFrame | None = None,
                      known: pl.DataFrame | None = None, *, accounts: pl.DataFrame | None = None,
                      earlier: pl.DataFrame | None = None) -> pl.DataFrame:
    """Day of week (0 = Monday), hour and month (UTC), seconds since the same account's previous post
    (Adobe; null when no earlier post of the account is known) and the author's account age in days
    (null without a users table).

    ``known`` are the posts a "previous post" may be (post_id, author_id, created_at): the batch itself
    by default; at scoring time the snapshot of posts the run saw, so one post scored alone gets the
    same value as in the batch pipeline.

    ``accounts`` / ``earlier``: ``account_created(users)`` / ``earlier_posts(known)`` made once by the caller
    (a loaded run keeps them, the first indexed): one request then neither renames nor sorts the snapshot.
    """
    if earlier is None:
        earlier = earlier_posts(posts if known is None else known)
    ordered = posts.select("post_id", "author_id", "created_at").with_row_index("_i").sort("created_at")
    ordered = ordered.join_asof(earlier, left_on="created_at", right_on="_prev", by="author_id",
                                strategy="backward", allow_exact_matches=False, check_sortedness=False)
    out = ordered.with_columns(
        (pl.col("created_at") - pl.col("_prev")).dt.total_seconds().cast(pl.Float32).alias("secs_since_prev_post"),
        (pl.col("created_at").dt.weekday() - 1).cast(pl.Int8).alias("day_of_week"),
        pl.col("created_at").dt.hour().cast(pl.Int8).alias("hour"),
        pl.col("created_at").dt.month().cast(pl.Int8).alias("month"),
    )
    if accounts is None and users is not None:
        accounts = account_created(users)
    if accounts is not None:
        out = left_lookup(out, accounts, "author_id").with_columns(
            ((pl.col("created_at") - pl.col("_account_created")).dt.total_seconds() / 86400.0)
            .cast(pl.Float32)
            .alias("account_age_days")
        )
    else:
        out = out.with_columns(pl.lit(None, dtype=pl.Float32).alias("account_age_days"))
    # Back to the caller's row order.
    return out.sort("_i").select("post_id", *TEMPORAL_COLUMNS)
