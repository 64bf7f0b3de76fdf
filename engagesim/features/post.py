"""Row-local post features: text statistics and lists, media counts, the photo to look at.

Row-local means a block can be processed without seeing any other block,
so this runs as a streaming Ray Data ``map_batches`` stage.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from engagesim.features.text import text_features

MEDIA_COLUMNS = ["n_media", "n_photo", "n_video", "n_gif"]


def media_features(posts: pl.DataFrame) -> pl.DataFrame:
    kinds = pl.col("media").list.eval(pl.element().struct.field("kind"))
    photos = pl.col("media").list.eval(
        pl.element().filter(pl.element().struct.field("kind") == "photo").struct.field("uri")
    )
    return posts.select(
        pl.col("media").list.len().cast(pl.Float32).alias("n_media"),
        *[kinds.list.eval((pl.element() == k).cast(pl.Int32)).list.sum().cast(pl.Float32).alias(f"n_{k}")
          for k in ("photo", "video", "gif")],
        photos.list.first().alias("photo_uri"),
    )


def post_row_features(posts: pa.Table) -> pa.Table:
    """Contract posts (a block) → ids, labels' raw inputs and the row-local features."""
    df = pl.from_arrow(posts)
    keep = df.select("post_id", "author_id", "username", "company", "created_at", "language", "likes", "text")
    return pl.concat([keep, text_features(df).drop("post_id"), media_features(df)], how="horizontal").to_arrow()
