"""Row-local post features: text statistics and lists, media counts, the photo to look at.

Row-local means a block can be processed without seeing any other block,
so this runs as a streaming Ray Data ``map_batches`` stage.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from engagesim.features.text import FEW_ROWS, text_features

MEDIA_COLUMNS = ["n_media", "n_photo", "n_video", "n_gif"]


MEDIA_KINDS = ("photo", "video", "gif")
# Up to text.FEW_ROWS rows (a served request), media counts are taken in Python: no list.eval.


def media_features(posts: pl.DataFrame) -> pl.DataFrame:
    return _media_rows(posts) if posts.height <= FEW_ROWS else _media_polars(posts)


def _media_polars(posts: pl.DataFrame) -> pl.DataFrame:
    kinds = pl.col("media").list.eval(pl.element().struct.field("kind"))
    photos = pl.col("media").list.eval(
        pl.element().filter(pl.element().struct.field("kind") == "photo").struct.field("uri")
    )
    return posts.select(
        pl.col("media").list.len().cast(pl.Float32).alias("n_media"),
        *[kinds.list.eval((pl.element() == k).cast(pl.Int32)).list.sum().cast(pl.Float32).alias(f"n_{k}")
          for k in MEDIA_KINDS],
        photos.list.first().alias("photo_uri"),
    )


def _media_rows(posts: pl.DataFrame) -> pl.DataFrame:
    """``media_features`` row by row (a null media list gives nulls; a null item or kind counts for no kind)."""
    cols: dict[str, list] = {c: [] for c in (*MEDIA_COLUMNS, "photo_uri")}
    for media in posts["media"].to_list():
        items = [m for m in media if m is not None] if media is not None else []
        cols["n_media"].append(None if media is None else len(media))
        for k in MEDIA_KINDS:
            cols[f"n_{k}"].append(None if media is None else sum(m.get("kind") == k for m in items))
        cols["photo_uri"].append(next((m.get("uri") for m in items if m.get("kind") == "photo"), None))
    return pl.DataFrame(cols, schema={**{c: pl.Float32 for c in MEDIA_COLUMNS}, "photo_uri": pl.String})


def post_row_features(posts: pa.Table) -> pa.Table:
    """Contract posts (a block) → ids, labels' raw inputs and the row-local features."""
    df = pl.from_arrow(posts)
    keep = df.select("post_id", "author_id", "username", "company", "created_at", "language", "likes", "text")
    return pl.concat([keep, text_features(df).drop("post_id"), media_features(df)], how="horizontal").to_arrow()
