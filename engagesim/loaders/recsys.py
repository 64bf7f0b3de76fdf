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

Pure parsing lives here; ``loaders/recsys_ingest.py`` runs it per file on Ray.
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

# The rules a line must pass, read by both the exact per-line parser and the vectorised mask.
MAX_SECONDS = 4_102_444_800  # 2100-01-01 UTC: a later timestamp is a unit mistake, not a date
ID_FIELDS = ("tweet_id", "engaged_with_user_id", "engaging_user_id")
COUNT_FIELDS = ("engaged_with_user_follower_count", "engaged_with_user_following_count",
                "engaging_user_follower_count", "engaging_user_following_count")
OPTIONAL_TIME_FIELDS = ("engaged_with_user_account_creation", "engaging_user_account_creation",
                        *ENGAGEMENT_COLUMNS.values())
BOOL_FIELDS = ("engaged_with_user_is_verified", "engaging_user_is_verified", "engagee_follows_engager")
TRUE, FALSE = ("true", "1"), ("false", "0")
MEDIA_URI_PREFIX = "https://media.engagesim.invalid/recsys/"  # + <tweet_id>/<index>: RecSys logs carry no media

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


INT64_MAX = 2**63 - 1


def _count(value: str, name: str) -> int:
    """A follower / following count: a whole number in [0, 2^63)."""
    number = _int(value, name)
    if number < 0:
        raise LineError(f"negative {name}: {value[:30]}")
    if number > INT64_MAX:
        raise LineError(f"{name} out of range: {value[:30]}")
    return number


def _token(value: str, vocab_size: int | None) -> int:
    """A wordpiece id the tokenizer knows (an unknown one would decode to nothing: a silently emptied text)."""
    token = _int(value, "text_tokens")
    if token < 0 or token >= (vocab_size or 2**31):
        raise LineError(f"unknown token id {value[:30]} (the tokenizer has {vocab_size} ids)")
    return token


def _bool(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise LineError(f"not a boolean {name}: {value[:30]!r}")


def _ts(value: str, name: str) -> int | None:
    """Unix seconds → µs; empty → None."""
    if value == "":
        return None
    seconds = _int(value, name)
    if seconds < 0 or seconds > MAX_SECONDS:  # before 1970 or after 2100
        raise LineError(f"bad timestamp {name}: {value}")
    return seconds * 1_000_000


def parse_line(line: str, vocab_size: int | None = None) -> dict[str, Any]:
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
    if not all(f[name] for name in ID_FIELDS):
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
        "token_ids": [_token(t, vocab_size) for t in _list(f["text_tokens"])],
        "hashtags": _list(f["hashtags"]), "tweet_id": f["tweet_id"], "media": [MEDIA[m] for m in media],
        "links": _list(f["present_links"]), "domains": _list(f["present_domains"]), "tweet_type": tweet_type,
        "language": f["language"] or None, "tweet_at": tweet_at,
        "creator": (f["engaged_with_user_id"], _count(f["engaged_with_user_follower_count"], "follower_count"),
                    _count(f["engaged_with_user_following_count"], "following_count"),
                    _bool(f["engaged_with_user_is_verified"], "is_verified"),
                    _ts(f["engaged_with_user_account_creation"], "account_creation")),
        "user": (f["engaging_user_id"], _count(f["engaging_user_follower_count"], "follower_count"),
                 _count(f["engaging_user_following_count"], "following_count"),
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
        "media": pa.array([[{"kind": k, "uri": f"{MEDIA_URI_PREFIX}{p['tweet_id']}/{i}"}
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
        "created_at": _ts_array([s[0][4] for s in snapshots]),  # missing stays missing, never 1970
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

    decode.vocab_size = len(tokenizer)  # ids at or above it are rejected, not decoded to nothing
    return decode


def latest_per_key(table: pa.Table, key: str, order: str) -> pa.Table:
    """Keep one row per key: the one with the greatest ``order`` value (the latest snapshot)."""
    import polars as pl

    df = pl.from_arrow(table).sort(order, descending=True, maintain_order=True).unique(
        subset=[key], keep="first", maintain_order=True)
    return df.sort(key).to_arrow()


# --- vectorised fast path ------------------------------------------------------------------------

_DIGITS = r"^[0-9]+$"
_COUNT_DIGITS = r"^[0-9]{1,18}$"  # below 2^63 for sure; a longer count takes the exact path
_TOKEN_DIGITS = r"^[0-9]{1,9}$"


def _split_list(col: pa.ChunkedArray | pa.Array) -> pa.ListArray:
    """Tab-separated list field → list<string> (empty string → empty list)."""
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    lists = pc.split_pattern(pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col), "\t")
    return pc.if_else(pc.is_null(lists), pa.scalar([], pa.list_(pa.string())), lists)


def _bad_elements(lists: pa.ListArray, ok_element) -> np.ndarray:
    """Rows with at least one list element failing ``ok_element`` (a pyarrow boolean kernel)."""
    import pyarrow.compute as pc

    n = len(lists)
    flat = pc.list_flatten(lists)
    bad = np.zeros(n, dtype=bool)
    if len(flat):
        failing = ~ok_element(flat).to_numpy(zero_copy_only=False)
        bad[pc.list_parent_indices(lists).to_numpy()[failing]] = True
    return bad


def _valid_mask(t: pa.Table, vocab_size: int | None = None) -> np.ndarray:
    """True where a row passes every rule ``parse_line`` enforces (used to route rows: fast or exact path)."""
    import pyarrow.compute as pc

    def digits(name: str, allow_empty: bool = False, pattern: str = _DIGITS) -> np.ndarray:
        col = t.column(name)
        ok = pc.match_substring_regex(col, pattern)
        if allow_empty:
            ok = pc.or_(ok, pc.equal(col, ""))
        return ok.to_numpy(zero_copy_only=False)

    def boolean(name: str) -> np.ndarray:
        return pc.is_in(pc.utf8_lower(pc.utf8_trim_whitespace(t.column(name))),
                        pa.array([*TRUE, *FALSE])).to_numpy(zero_copy_only=False)

    ok = np.ones(t.num_rows, dtype=bool)
    for name in ID_FIELDS:
        ok &= pc.not_equal(t.column(name), "").to_numpy(zero_copy_only=False)
    ok &= pc.is_in(t.column("tweet_type"), pa.array(sorted(TWEET_TYPES))).to_numpy(zero_copy_only=False)
    ok &= ~_bad_elements(_split_list(t.column("present_media")), lambda f: pc.is_in(f, pa.array(sorted(MEDIA))))
    ok &= ~_bad_elements(_split_list(t.column("text_tokens")), lambda f: _known_token(f, vocab_size))
    for name in COUNT_FIELDS:
        ok &= digits(name, pattern=_COUNT_DIGITS)
    ok &= digits("tweet_timestamp")
    for name in OPTIONAL_TIME_FIELDS:
        ok &= digits(name, allow_empty=True)
    for name in BOOL_FIELDS:
        ok &= boolean(name)
    limit = MAX_SECONDS
    tweet = _seconds(t.column("tweet_timestamp"), ok)
    ok &= tweet <= limit
    for name in ("engaged_with_user_account_creation", "engaging_user_account_creation"):
        ok &= np.nan_to_num(_seconds(t.column(name), ok), nan=0) <= limit
    for name in ENGAGEMENT_COLUMNS.values():
        at = _seconds(t.column(name), ok)
        ok &= np.isnan(at) | ((at >= tweet) & (at <= limit))
    return ok


def _known_token(flat, vocab_size: int | None):
    import pyarrow.compute as pc

    digits = pc.match_substring_regex(flat, _TOKEN_DIGITS)
    ids = pc.cast(pc.if_else(digits, flat, "0"), pa.int64())
    return pc.and_(digits, pc.less(ids, vocab_size or 2**31))


def _seconds(col, ok: np.ndarray) -> np.ndarray:
    """Digit strings → float seconds (NaN where empty or not a number); only rows in ``ok`` are read."""
    import pyarrow.compute as pc

    valid = pc.and_(pa.array(ok), pc.match_substring_regex(col, _DIGITS))
    cleaned = pc.if_else(valid, col, pa.scalar(None, pa.string()))
    return pc.cast(cleaned, pa.float64()).to_numpy(zero_copy_only=False)


def _us(col, mask_empty: bool = True) -> pa.Array:
    import pyarrow.compute as pc

    col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col) if mask_empty else col
    return pc.multiply(pc.cast(col, pa.int64()), 1_000_000).cast(TIMESTAMP)


def _bool_array(col) -> pa.Array:
    import pyarrow.compute as pc

    return pc.is_in(pc.utf8_lower(pc.utf8_trim_whitespace(col)), pa.array(list(TRUE)))


def fast_tables(t: pa.Table, decode) -> dict[str, pa.Table]:
    """Valid rows (all string columns, as read by pyarrow CSV) → the same tables as ``tables``."""
    import pyarrow.compute as pc

    arrays = {name: t.column(name).combine_chunks() for name in t.column_names}
    n = t.num_rows
    tokens = pc.cast(_split_list(arrays["text_tokens"]), pa.list_(pa.int32()))
    texts = decode(tokens.to_pylist()) if n else []
    media = _split_list(arrays["present_media"])
    tweet = arrays["tweet_id"]
    tweet_at = _us(arrays["tweet_timestamp"])
    kinds = pc.list_flatten(media)
    parents = pc.list_parent_indices(media).to_numpy()
    position = np.arange(len(parents)) - np.searchsorted(parents, parents)  # index within each list
    uris = pc.binary_join_element_wise(
        MEDIA_URI_PREFIX, pc.take(tweet, pa.array(parents, type=pa.int64())), "/",
        pa.array(position.astype(str)), "")
    kind_names = pc.replace_substring_regex(pc.utf8_lower(kinds), "^gif$", "gif")
    items = pa.StructArray.from_arrays([kind_names, uris], fields=list(MEDIA_ITEM))
    media_items = pa.ListArray.from_arrays(media.offsets, items)
    interactions = pa.table({
        "user_id": arrays["engaging_user_id"], "post_id": tweet, "creator_id": arrays["engaged_with_user_id"],
        "impression_at": tweet_at,
        **{f"{e}_at": _us(arrays[c]) for e, c in (("like", "like_timestamp"), ("reply", "reply_timestamp"),
                                                    ("retweet", "retweet_timestamp"),
                                                    ("quote", "retweet_with_comment_timestamp"))},
        "follows_creator": _bool_array(arrays["engagee_follows_engager"]),
    }, schema=INTERACTIONS)
    language = pc.if_else(pc.equal(arrays["language"], ""), pa.scalar(None, pa.string()), arrays["language"])
    posts = pa.table({
        "post_id": tweet, "author_id": arrays["engaged_with_user_id"], "username": arrays["engaged_with_user_id"],
        "company": pa.nulls(n, pa.string()), "text": pa.array(texts, type=pa.string()), "media": media_items,
        "created_at": tweet_at, "language": language,
        **{c: pa.nulls(n, pa.int64()) for c in ("likes", "retweets", "replies", "quotes")},
    }, schema=POSTS)
    meta = pa.table({
        "post_id": tweet, "token_ids": tokens, "hashtags": _split_list(arrays["hashtags"]),
        "links": _split_list(arrays["present_links"]), "domains": _split_list(arrays["present_domains"]),
        "tweet_type": arrays["tweet_type"],
    }, schema=POST_META)

    def role(prefix: str) -> pa.Table:
        created = arrays[f"{prefix}_account_creation"]  # empty → null: an unknown creation date, never 1970
        return pa.table({
            "user_id": arrays[f"{prefix}_id"],
            "follower_count": pc.cast(arrays[f"{prefix}_follower_count"], pa.int64()),
            "following_count": pc.cast(arrays[f"{prefix}_following_count"], pa.int64()),
            "verified": _bool_array(arrays[f"{prefix}_is_verified"]),
            "created_at": _us(created),
            "language": pa.nulls(n, pa.string()),
        }, schema=USERS).append_column("_seen_at", tweet_at)

    users = pa.concat_tables([role("engaged_with_user"), role("engaging_user")])
    return {"interactions": interactions, "posts": posts, "post_meta": meta, "users": users}


def parse_chunk(lines: list[str], decode) -> tuple[dict[str, pa.Table] | None, list[tuple[int, str]]]:
    """Many lines at once: vectorised checks and conversion; exact per-line reasons for the rejects.

    Returns the tables of the valid lines and ``(index, reason)`` for each rejected line.
    """
    import io as pyio

    import pyarrow.csv as pcsv

    rejects: list[tuple[int, str]] = []
    shaped, shaped_idx = [], []
    for i, line in enumerate(lines):
        line = line.rstrip("\r\n")
        fields = line.count("\x01") + 1
        if fields not in (20, 24):
            rejects.append((i, f"expected 20 or 24 fields, got {fields}"))
            continue
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            rejects.append((i, "invalid UTF-8"))
            continue
        shaped.append(line if fields == 24 else line + "\x01" * 4)
        shaped_idx.append(i)
    if not shaped:
        return None, rejects
    table = pcsv.read_csv(
        pyio.BytesIO(("\n".join(shaped) + "\n").encode("utf-8")),
        read_options=pcsv.ReadOptions(column_names=COLUMNS, block_size=1 << 26),
        parse_options=pcsv.ParseOptions(delimiter="\x01", quote_char=False, newlines_in_values=False),
        convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in COLUMNS},
                                            strings_can_be_null=False, quoted_strings_can_be_null=False),
    )
    vocab_size = getattr(decode, "vocab_size", None)
    ok = _valid_mask(table, vocab_size)
    slow = []
    for j in np.flatnonzero(~ok):
        try:
            slow.append(parse_line(shaped[j], vocab_size))  # stricter vectorised rule than needed: exact path decides
        except LineError as exc:
            rejects.append((shaped_idx[j], str(exc)))
    good = fast_tables(table.filter(pa.array(ok)), decode)
    if slow:
        exact = tables(slow, decode)
        good = {k: pa.concat_tables([good[k], exact[k]]) for k in good}
    return good, sorted(rejects)
