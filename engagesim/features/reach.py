"""Author reach: how many impressions the author's *other* posts drew in the training period.

A post's likes are mostly its account's effect, and the post table alone estimates that
effect from the author's past likes — noisy for an author with a handful of posts. The
interaction log sees every post many times: platforms show popular accounts' posts more,
so the mean log-impressions of an author's posts measures the same account effect with
far less noise. Measured on a 2M-impression world (50k posts): post-level XGBoost RMSE
0.805 → 0.785 with these two columns (oracle 0.687).

Leak-free by construction, for every row the same way: a post's own impressions never
count towards its feature (leave-own-post-out), only impressions before the training
cutoff count, and only posts that had ``exposure_hours`` to collect them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import polars as pl
import pyarrow as pa

from engagesim.features.lookup import float32_frame, indexed, lookup_columns

REACH_COLUMNS = ["author_reach_log_impressions", "author_reach_posts"]


def impressions_per_post(batch: pa.Table, cutoff_us: int) -> pa.Table:
    """Partial counts of one block (impressions before the cutoff); blocks combine by summing."""
    df = pl.from_arrow(batch).select("post_id", pl.col("impression_at").dt.epoch("us").alias("t"))
    return df.filter(pl.col("t") < cutoff_us).group_by("post_id").agg(pl.len().alias("impressions")).to_arrow()


@dataclass
class AuthorReach:
    """Exposed posts (post_id, author_id, log1p impressions) — enough to leave any one of them out."""

    exposed: pl.DataFrame

    @classmethod
    def fit(cls, posts: pl.DataFrame, counts: pl.DataFrame, cutoff_us: int, exposure_hours: float) -> AuthorReach:
        """``posts``: post_id, author_id, created_at; ``counts``: post_id, impressions (any number of parts)."""
        per_post = counts.group_by("post_id").agg(pl.col("impressions").sum())
        last_created = cutoff_us - int(exposure_hours * 3600 * 1e6)
        exposed = (posts.filter(pl.col("created_at").dt.epoch("us") < last_created)
                   .select("post_id", "author_id").unique("post_id", keep="last")
                   .join(per_post, on="post_id", how="left")
                   .select("post_id", "author_id",
                           pl.col("impressions").fill_null(0).log1p().cast(pl.Float64).alias("log_impressions")))
        return cls(exposed)

    @cached_property
    def _authors(self) -> pl.DataFrame:
        """Per author: sum and count over exposed posts — once, not per scored batch (Serve scores one row)."""
        return self.exposed.group_by("author_id").agg(pl.col("log_impressions").sum().alias("_sum"),
                                                      pl.len().cast(pl.Float64).alias("_n"))

    @cached_property
    def _own(self) -> pl.DataFrame:
        return self.exposed.select("post_id", pl.col("log_impressions").alias("_own"))

    def index_for_lookups(self) -> None:
        """Serving: look authors and posts up by index (features/lookup.py), not by a join per call."""
        indexed(self._authors, "author_id")
        indexed(self._own, "post_id")

    def features(self, posts: pl.DataFrame) -> pl.DataFrame:
        """Row-aligned with ``posts`` (post_id, author_id): mean log1p impressions of the author's other
        exposed posts (null when there are none) and how many there are."""
        return float32_frame(self.arrays(posts))

    def arrays(self, posts: pl.DataFrame) -> dict[str, np.ndarray]:
        """``features`` as float64 numpy (NaN: none)."""
        author = lookup_columns(self._authors, "author_id", posts, ["_sum", "_n"], {"_sum": 0.0, "_n": 0.0})
        own = lookup_columns(self._own, "post_id", posts, ["_own"], {"_own": np.nan})["_own"]
        known = ~np.isnan(own)
        others = author["_n"] - known
        total = author["_sum"] - np.where(known, own, 0.0)
        mean = np.full(len(others), np.nan)
        np.divide(total, others, out=mean, where=others > 0)
        return {REACH_COLUMNS[0]: mean, REACH_COLUMNS[1]: others}
