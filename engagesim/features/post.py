"""Row-local post features: text statistics and lists, media counts, the photo to look at.

Row-local means a block can be processed without seeing any other block,
so this runs as a streaming Ray Data ``map_batches`` stage.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from engagesim.features.text import FEW_ROWS, TEXT_SCHEMA, agreed, text_features, text_rows

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
    cols = _media_lists(posts["media"].to_list())
    return pl.DataFrame(cols, schema={**{c: pl.Float32 for c in MEDIA_COLUMNS}, "photo_uri": pl.String})


def _media_lists(lists: list) -> dict[str, list]:
    cols: dict[str, list] = {c: [] for c in (*MEDIA_COLUMNS, "photo_uri")}
    for media in lists:
        items = [m for m in media if m is not None] if media is not None else []
        cols["n_media"].append(None if media is None else len(media))
        for k in MEDIA_KINDS:
            cols[f"n_{k}"].append(None if media is None else sum(m.get("kind") == k for m in items))
        cols["photo_uri"].append(next((m.get("uri") for m in items if m.get("kind") == "photo"), None))
    return cols


KEEP = ("post_id", "author_id", "username", "company", "created_at", "language", "likes", "text")


def post_row_features(posts: pa.Table) -> pa.Table:
    """Contract posts (a block) → ids, labels' raw inputs and the row-local features."""
    if posts.num_rows <= FEW_ROWS and (few := _few_rows(posts)) is not None:
        return few
    return _polars_rows(posts)


def _polars_rows(posts: pa.Table) -> pa.Table:
    df = pl.from_arrow(posts)
    keep = df.select(*KEEP)
    return pl.concat([keep, text_features(df).drop("post_id"), media_features(df)], how="horizontal").to_arrow()


_ARROW = {pl.Float32: pa.float32(), pl.String: pa.large_string(), pl.List(pl.String): pa.large_list(pa.large_string())}


def _few_rows(posts: pa.Table) -> pa.Table | None:
    """``post_row_features`` of a served request's few posts in Python and Arrow, without a polars frame and its
    two conversions (1.7 → ~0.3 ms a post); None where Python's and polars' text rules could differ (``agreed``).
    The column types are those the polars path gives; ``tests/test_features.py`` holds both paths equal."""
    texts = posts.column("text").to_pylist()
    companies = posts.column("company").to_pylist()
    if not agreed(texts, companies):
        return None
    text = text_rows(texts, companies)
    media = _media_lists(posts.column("media").to_pylist())
    columns = {c: posts.column(c) for c in KEEP}
    columns.update({c: columns[c].cast(pa.large_string()) for c in KEEP if columns[c].type == pa.string()})
    columns.update({c: pa.array(v, _ARROW[TEXT_SCHEMA[c]]) for c, v in text.items()})
    columns.update({c: pa.array(v, pa.float32()) for c, v in media.items() if c != "photo_uri"})
    columns["photo_uri"] = pa.array(media["photo_uri"], pa.large_string())
    return pa.table(columns)
