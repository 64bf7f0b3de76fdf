"""RecSys Challenge 2020/2021 (Twitter) impression logs → users, posts, interactions (+ post_meta).

One impression per line, fields separated by ``\\x01``, list fields by ``\\t``, no
header; 24 columns (test files: the first 20). Mapping onto the contracts:

- interactions: user = engaging user, creator = engaged-with user, post = tweet id,
  ``impression_at`` = tweet_timestamp (the logs carry no separate impression time),
  engagement timestamps as given (empty = no engagement), ``follows_creator`` =
  ``engagee_follows_engager`` (the only follow signal the logs have; note it is
  the author following the viewer);
- posts: one row per tweet id; ``text`` decoded from the BERT wordpiece ids
  with the configured tokenizer; media kinds from ``present_media`` (media
  content is not in the logs: URIs are unreachable ``.invalid`` placeholders);
  author/username = the engaged-with user id; language = the (hashed) language id;
- post_meta (a side dataset): tweet id, token ids, hashtags, links, domains, tweet type;
- users: the latest snapshot per user id, from both roles.

Pure parsing lives here; ``pipeline/recsys_ingest.py`` runs it per file on Ray.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from engagesim.schema import INTERACTIONS, MEDIA_ITEM, POSTS, TIMESTAMP, USERS

COLUMNS = [
    "text_tokens", "hashtags", "tweet_id", "present_media", "present_links", "present_domains", "tweet_type",
    "language", "tweet_timestamp", "engaged_with_user_id", "engaged_with_user_follower_count",
    "engaged_with_user_following_count", "engaged_with_user_is_verified", "engaged_with_user_account_creation",
    "engaging_user_id", "engaging_user_follower_count", "engaging_user_following_count",
    "engaging_user_is_verified", "engaging_user_account_creation", "engagee_follows_engager",
    "reply_timestamp", "retweet_timestamp", "retweet_with_comment_timestamp", "like_timestamp",
]
ENGAGEMENT_COLUMNS = {"reply": "reply_timestamp", "retweet": "retweet_timestamp",
                      "quote": "retweet_with_comment_timestamp", "like": "like_timestamp"}
MEDIA = {"Photo": "photo", "Video": "video", "GIF": "gif"}
TWEET_TYPES = {"TopLevel", "Retweet", "Quote", "Reply"}

POST_META = pa.schema([
    pa.field("post_id", pa.string(), nullable=False),
    pa.field("token_ids", pa.list_(pa.int32())),
    pa.field("hashtags", pa.list_(pa.string())),
    pa.field("links", pa.list_(pa.string())),
    pa.field("domains", pa.list_(pa.string())),
    pa.field("tweet_type", pa.string()),
])


class LineError(ValueError):
    pass


def _list(value: str) -> list[str]:
    return [v for v in value.split("\t") if v] if value else []


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise LineError(f"non-numeric {name}: {value[:30]!r}") from None


def _bool(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1"):
        return True
    if v in ("false", "0"):
        return False
    raise LineError(f"not a boolean {name}: {value[:30]!r}")


def _ts(value: str, name: str) -> int | None:
    """Unix seconds → µs; empty → None."""
    if value == "":
        return None
    seconds = _int(value, name)
    if seconds < 0 or seconds > 4_102_444_800:  # before 1970 or after 2100
        raise LineError(f"bad timestamp {name}: {value}")
    return seconds * 1_000_000


def parse_line(line: str) -> dict[str, Any]:
    """One log line → a dict of typed values; LineError with the reason if malformed."""
    fields = line.rstrip("\r\n").split("\x01")
    if len(fields) not in (20, 24):
        raise LineError(f"expected 20 or 24 fields, got {len(fields)}")
    f = dict(zip(COLUMNS, fields))
    tweet_type = f["tweet_type"]
    if tweet_type not in TWEET_TYPES:
        raise LineError(f"unknown tweet_type {tweet_type[:20]!r}")
    media = _list(f["present_media"])
    unknown = [m for m in media if m not in MEDIA]
    if unknown:
        raise LineError(f"unknown media kind {unknown[0][:20]!r}")
    if not f["tweet_id"] or not f["engaged_with_user_id"] or not f["engaging_user_id"]:
        raise LineError("missing tweet or user id")
    tweet_at = _ts(f["tweet_timestamp"], "tweet_timestamp")
    if tweet_at is None:
        raise LineError("missing tweet_timestamp")
    engagements = {}
    for name, column in ENGAGEMENT_COLUMNS.items():
        at = _ts(f.get(column, ""), column)
        if at is not None and at < tweet_at:
            raise LineError(f"{name} engagement before the tweet")
        engagements[name] = at
    return {
        "token_ids": [_int(t, "text_tokens") for t in _list(f["text_tokens"])],
        "hashtags": _list(f["hashtags"]), "tweet_id": f["tweet_id"], "media": [MEDIA[m] for m in media],
        "links": _list(f["present_links"]), "domains": _list(f["present_domains"]), "tweet_type": tweet_type,
        "language": f["language"] or None, "tweet_at": tweet_at,
        "creator": (f["engaged_with_user_id"], _int(f["engaged_with_user_follower_count"], "follower_count"),
                    _int(f["engaged_with_user_following_count"], "following_count"),
                    _bool(f["engaged_with_user_is_verified"], "is_verified"),
                    _ts(f["engaged_with_user_account_creation"], "account_creation")),
        "user": (f["engaging_user_id"], _int(f["engaging_user_follower_count"], "follower_count"),
                 _int(f["engaging_user_following_count"], "following_count"),
                 _bool(f["engaging_user_is_verified"], "is_verified"),
                 _ts(f["engaging_user_account_creation"], "account_creation")),
        "follows": _bool(f["engagee_follows_engager"], "engagee_follows_engager"),
        **{f"{k}_at": v for k, v in engagements.items()},
    }


def _ts_array(values: list[int | None]) -> pa.Array:
    return pa.array(values, type=pa.int64()).cast(TIMESTAMP)


def tables(parsed: list[dict[str, Any]], decode) -> dict[str, pa.Table]:
    """Parsed lines → interactions, posts, post_meta and users tables (posts/users not yet deduplicated)."""
    texts = decode([p["token_ids"] for p in parsed]) if parsed else []
    interactions = pa.table({
        "user_id": [p["user"][0] for p in parsed],
        "post_id": [p["tweet_id"] for p in parsed],
        "creator_id": [p["creator"][0] for p in parsed],
        "impression_at": _ts_array([p["tweet_at"] for p in parsed]),
        **{f"{e}_at": _ts_array([p[f"{e}_at"] for p in parsed]) for e in ("like", "reply", "retweet", "quote")},
        "follows_creator": [p["follows"] for p in parsed],
    }, schema=INTERACTIONS)
    posts = pa.table({
        "post_id": [p["tweet_id"] for p in parsed],
        "author_id": [p["creator"][0] for p in parsed],
        "username": [p["creator"][0] for p in parsed],
        "company": pa.nulls(len(parsed), pa.string()),
        "text": texts,
        "media": pa.array([[{"kind": k, "uri": f"https://media.engagesim.invalid/recsys/{p['tweet_id']}/{i}"}
                            for i, k in enumerate(p["media"])] for p in parsed], type=pa.list_(MEDIA_ITEM)),
        "created_at": _ts_array([p["tweet_at"] for p in parsed]),
        "language": [p["language"] for p in parsed],
        **{c: pa.nulls(len(parsed), pa.int64()) for c in ("likes", "retweets", "replies", "quotes")},
    }, schema=POSTS)
    meta = pa.table({
        "post_id": [p["tweet_id"] for p in parsed],
        "token_ids": [p["token_ids"] for p in parsed],
        "hashtags": [p["hashtags"] for p in parsed],
        "links": [p["links"] for p in parsed],
        "domains": [p["domains"] for p in parsed],
        "tweet_type": [p["tweet_type"] for p in parsed],
    }, schema=POST_META)
    snapshots = [(p[role], p["tweet_at"]) for p in parsed for role in ("creator", "user")]
    users = pa.table({
        "user_id": [s[0][0] for s in snapshots],
        "follower_count": [s[0][1] for s in snapshots],
        "following_count": [s[0][2] for s in snapshots],
        "verified": [s[0][3] for s in snapshots],
        "created_at": _ts_array([s[0][4] if s[0][4] is not None else 0 for s in snapshots]),
        "language": pa.nulls(len(snapshots), pa.string()),
    }, schema=USERS).append_column("_seen_at", _ts_array([s[1] for s in snapshots]))
    return {"interactions": interactions, "posts": posts, "post_meta": meta, "users": users}


def make_decoder(tokenizer_name: str):
    """BERT wordpiece ids → text with a HF tokenizer (default: the vocabulary shipped with MiniLM)."""
    from transformers import AutoTokenizer

    from engagesim.embed.registry import resolve

    ref = resolve(tokenizer_name, "ingest.tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(ref.location)

    def decode(batch: list[list[int]]) -> list[str]:
        return tokenizer.batch_decode(batch, skip_special_tokens=True, clean_up_tokenization_spaces=True)

    return decode


def latest_per_key(table: pa.Table, key: str, order: str) -> pa.Table:
    """Keep one row per key: the one with the greatest ``order`` value (the latest snapshot)."""
    import polars as pl

    df = pl.from_arrow(table).sort(order, descending=True, maintain_order=True).unique(
        subset=[key], keep="first", maintain_order=True)
    return df.sort(key).to_arrow()


def row_numbers(n: int, start: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int64)
