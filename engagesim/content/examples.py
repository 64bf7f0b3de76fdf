"""Training examples for content simulation: posts + captions → (prompt, post text), split forward in time.

Captions come from two places: a caption column already in the source file
(the Adobe sample's ``media_blip_caption``, another team's BLIP output) and
our captioner run over the post's own photo. The split is chronological: the
latest ``valid_fraction`` of posts is held out, as a brand would use the model
on posts it has not written yet.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from engagesim.content.hashtags import extract_hashtags
from engagesim.content.prompts import PostContext, build_prompt

SOURCE_CAPTION_COLUMNS = ("media_blip_caption", "captions", "caption")


def source_captions(paths: list[str], storage=None) -> pl.DataFrame:
    """(post_id, caption) from Adobe files that carry a caption column (read as they are)."""
    from engagesim.loaders.readers import adobe_records

    rows: list[dict[str, Any]] = []
    for path in paths:
        for record in adobe_records(path, storage):
            record = {str(k).lower(): v for k, v in record.items()}
            column = next((c for c in SOURCE_CAPTION_COLUMNS if record.get(c)), None)
            if column and record.get("id") is not None:
                rows.append({"post_id": str(record["id"]).strip(), "caption": " ".join(str(record[column]).split())})
    return pl.DataFrame(rows, schema={"post_id": pl.String, "caption": pl.String}).unique("post_id", keep="first")


def build_examples(posts: pa.Table, captions: pl.DataFrame, source: str) -> pl.DataFrame:
    """One row per post with text: its prompt (no target likes when likes are unknown) and the text to learn."""
    frame = pl.from_arrow(posts.select(["post_id", "author_id", "username", "company", "text", "media",
                                        "created_at", "likes"]))
    frame = frame.filter(pl.col("text").str.strip_chars().str.len_chars() > 0)
    frame = frame.join(captions.select("post_id", "caption"), on="post_id", how="left")
    kinds = frame["media"].to_list()
    prompts, media_kinds = [], []
    for row, media in zip(frame.iter_rows(named=True), kinds):
        kinds_of_post = tuple(dict.fromkeys(m["kind"] for m in (media or [])))
        if not kinds_of_post and row["caption"]:  # the source had an image (its caption proves it), not its URL
            kinds_of_post = ("photo",)
        media_kinds.append(list(kinds_of_post))
        prompts.append(build_prompt(PostContext(
            account=row["username"] or row["author_id"], created_at=row["created_at"], company=row["company"],
            caption=row["caption"], media_kinds=kinds_of_post, target_likes=row["likes"])))
    return frame.drop("media").with_columns(
        pl.Series("media_kinds", media_kinds, dtype=pl.List(pl.String)),
        pl.Series("prompt", prompts, dtype=pl.String),
        pl.Series("hashtags", [extract_hashtags(t) for t in frame["text"].to_list()], dtype=pl.List(pl.String)),
        pl.lit(source).alias("source"),
    )


def split_forward(examples: pl.DataFrame, valid_fraction: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Earliest posts train, the latest ``valid_fraction`` are held out."""
    ordered = examples.sort("created_at", "post_id")
    cut = int(round(len(ordered) * (1 - valid_fraction)))
    return ordered.head(cut), ordered.slice(cut)


def account_profiles(examples: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """What generation needs to know per account: company, a typical high like count, media habit."""
    if examples.is_empty():
        return {}
    stats = examples.group_by("username").agg(
        pl.col("author_id").first(),
        pl.col("company").drop_nulls().first(),
        pl.col("likes").drop_nulls().quantile(0.9).alias("likes_p90"),
        pl.len().alias("posts"),
    )
    return {r["username"]: {"author_id": r["author_id"], "company": r["company"], "posts": int(r["posts"]),
                            "likes_p90": None if r["likes_p90"] is None else int(np.round(r["likes_p90"]))}
            for r in stats.iter_rows(named=True)}
