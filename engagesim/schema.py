"""Arrow data contracts for posts, users and interactions, and their validator.

Every stage reads and writes Parquet that conforms to these schemas, so this
module is the single place where "what a post is" is decided. The schema
version travels in each file's metadata so a reader can refuse data written
under a contract it does not understand.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = "1"
METADATA_VERSION_KEY = b"engagesim.schema_version"
METADATA_KIND_KEY = b"engagesim.kind"

MEDIA_KINDS = ("photo", "video", "gif")
ENGAGEMENTS = ("like", "reply", "retweet", "quote")

TIMESTAMP = pa.timestamp("us", tz="UTC")
MEDIA_ITEM = pa.struct([pa.field("kind", pa.string(), nullable=False), pa.field("uri", pa.string(), nullable=False)])

def request_post_id(account: str, created_at: dt.datetime, text: str) -> str:
    """The id of a post given without one (an HTTP request, or ``predict`` rows with ``account``): a digest of
    who, when and what, so the same post gets the same id from Python and over HTTP."""
    import hashlib

    digest = hashlib.sha1(f"{account}\x00{created_at.isoformat()}\x00{text}".encode()).hexdigest()
    return f"req-{digest[:16]}"


POSTS = pa.schema(
    [
        pa.field("post_id", pa.string(), nullable=False),
        pa.field("author_id", pa.string(), nullable=False),
        pa.field("username", pa.string(), nullable=False),
        pa.field("company", pa.string()),
        pa.field("text", pa.string(), nullable=False),
        pa.field("media", pa.list_(MEDIA_ITEM), nullable=False),
        pa.field("created_at", TIMESTAMP, nullable=False),
        pa.field("language", pa.string()),
        pa.field("likes", pa.int64()),
        pa.field("retweets", pa.int64()),
        pa.field("replies", pa.int64()),
        pa.field("quotes", pa.int64()),
    ]
)

USERS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("follower_count", pa.int64(), nullable=False),
        pa.field("following_count", pa.int64(), nullable=False),
        pa.field("verified", pa.bool_(), nullable=False),
        pa.field("created_at", TIMESTAMP),  # unknown for some accounts (RecSys logs leave it empty)
        pa.field("language", pa.string()),
    ]
)

INTERACTIONS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("post_id", pa.string(), nullable=False),
        pa.field("creator_id", pa.string(), nullable=False),
        pa.field("impression_at", TIMESTAMP, nullable=False),
        pa.field("like_at", TIMESTAMP),
        pa.field("reply_at", TIMESTAMP),
        pa.field("retweet_at", TIMESTAMP),
        pa.field("quote_at", TIMESTAMP),
        pa.field("follows_creator", pa.bool_(), nullable=False),
    ]
)

REJECTS = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("raw", pa.string(), nullable=False),
    ]
)

# Ground truth of a synthetic world: what generated the data. Evaluation only, never a model input.
IMAGE_PROPERTIES = ("brightness", "contrast", "hue_count", "colour_entropy", "off_centre")
TRUTH_POSTS = pa.schema(
    [
        pa.field("post_id", pa.string(), nullable=False),
        pa.field("expected_log1p_likes", pa.float64(), nullable=False),
        pa.field("topic", pa.string(), nullable=False),
        pa.field("account_effect", pa.float64(), nullable=False),
        pa.field("quality", pa.float64(), nullable=False),
        pa.field("image_effect", pa.float64(), nullable=False),
        *[pa.field(f"image_{p}", pa.float64(), nullable=False) for p in IMAGE_PROPERTIES],
    ]
)
TRUTH_INTERACTIONS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("post_id", pa.string(), nullable=False),
        pa.field("impression_at", TIMESTAMP, nullable=False),
        *[pa.field(f"p_{e}", pa.float64(), nullable=False) for e in ENGAGEMENTS],
        pa.field("popularity_group", pa.int8(), nullable=False),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "posts": POSTS,
    "users": USERS,
    "interactions": INTERACTIONS,
    "rejects": REJECTS,
    "truth_posts": TRUTH_POSTS,
    "truth_interactions": TRUTH_INTERACTIONS,
}
ID_COLUMNS = {"posts": "post_id", "users": "user_id"}
COUNT_COLUMNS = {
    "posts": ("likes", "retweets", "replies", "quotes"),
    "users": ("follower_count", "following_count"),
    "interactions": (),
    "rejects": (),
    "truth_posts": (),
    "truth_interactions": (),
}


class SchemaError(ValueError):
    """A table cannot be brought to a contract at all (wrong kind, missing column)."""


def with_metadata(schema: pa.Schema, kind: str) -> pa.Schema:
    """The schema as written to Parquet: tagged with its kind and contract version."""
    return schema.with_metadata({METADATA_VERSION_KEY: SCHEMA_VERSION.encode(), METADATA_KIND_KEY: kind.encode()})


def schema_for(kind: str) -> pa.Schema:
    try:
        return SCHEMAS[kind]
    except KeyError:
        raise SchemaError(f"unknown dataset kind {kind!r}; expected one of {sorted(SCHEMAS)}") from None


def make_rejects(source: str, rows: list[int], reasons: list[str], raws: list[str]) -> pa.Table:
    return pa.table(
        {"source": [source] * len(rows), "row": rows, "reason": reasons, "raw": raws}, schema=REJECTS
    )


def conform(table: pa.Table, kind: str) -> pa.Table:
    """Select and cast the contract's columns in contract order.

    Columns the contract marks optional may be absent (they become nulls);
    a missing required column is a SchemaError naming it.
    """
    schema = schema_for(kind)
    n = table.num_rows
    missing = [f.name for f in schema if not f.nullable and f.name not in table.column_names]
    if missing:
        raise SchemaError(f"{kind}: required column(s) {', '.join(repr(m) for m in missing)} missing")
    columns = []
    for field in schema:
        if field.name in table.column_names:
            column = table.column(field.name)
            if column.type != field.type:
                column = column.cast(field.type)
        elif field.nullable:
            column = pa.nulls(n, field.type)
        else:
            raise SchemaError(f"{kind}: required column {field.name!r} is missing")
        columns.append(column)
    # Nullability is checked by `validate`; build with a relaxed schema first.
    relaxed = pa.schema([f.with_nullable(True) for f in schema])
    return pa.Table.from_arrays(columns, schema=relaxed)


@dataclass(frozen=True)
class Check:
    reason: str
    failing: Callable[[pa.Table], np.ndarray]


def _null_check(column: str) -> Check:
    return Check(f"missing {column}", lambda t: t.column(column).is_null().to_numpy(zero_copy_only=False))


def _empty_string_check(column: str) -> Check:
    def failing(t: pa.Table) -> np.ndarray:
        col = t.column(column)
        return pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0), False).to_numpy(
            zero_copy_only=False
        )

    return Check(f"empty {column}", failing)


def _negative_check(column: str) -> Check:
    return Check(
        f"negative {column}",
        lambda t: pc.fill_null(pc.less(t.column(column), 0), False).to_numpy(zero_copy_only=False),
    )


def _text_length_check(max_chars: int) -> Check:
    return Check(
        f"text longer than {max_chars} characters",
        lambda t: pc.fill_null(pc.greater(pc.utf8_length(t.column("text")), max_chars), False).to_numpy(
            zero_copy_only=False
        ),
    )


def _media_kind_check() -> Check:
    def failing(t: pa.Table) -> np.ndarray:
        media = t.column("media").combine_chunks()
        flat = pc.list_flatten(media)
        if len(flat) == 0:
            return np.zeros(t.num_rows, dtype=bool)
        bad_item = ~pc.is_in(flat.field("kind"), pa.array(MEDIA_KINDS)).to_numpy(zero_copy_only=False)
        bad_item |= pc.fill_null(pc.equal(pc.utf8_length(flat.field("uri")), 0), True).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(media).to_numpy()
        out = np.zeros(t.num_rows, dtype=bool)
        out[parents[bad_item]] = True
        return out

    return Check(f"media kind not in {MEDIA_KINDS} or empty uri", failing)


def _checks(kind: str, max_text_chars: int | None) -> list[Check]:
    schema = schema_for(kind)
    # Source-facing columns first, so a row missing its username reads "missing username",
    # not "missing author_id" (which some loaders derive from it).
    first = ("post_id", "user_id", "username")
    required = sorted((f.name for f in schema if not f.nullable), key=lambda c: (c not in first, first.index(c) if c in first else 0))
    checks = [_null_check(c) for c in required]
    if kind in ID_COLUMNS:
        checks.append(_empty_string_check(ID_COLUMNS[kind]))
    if kind == "posts":
        checks.append(_empty_string_check("username"))
        checks.append(_media_kind_check())
        if max_text_chars is not None:
            checks.append(_text_length_check(max_text_chars))
    checks.extend(_negative_check(c) for c in COUNT_COLUMNS[kind])
    return checks


def _raw_json(table: pa.Table, indices: np.ndarray) -> list[str]:
    rows = table.take(pa.array(indices, type=pa.int64())).to_pylist()
    return [json.dumps(r, default=str, ensure_ascii=False) for r in rows]


def validate(
    table: pa.Table,
    kind: str,
    source: str,
    row_numbers: np.ndarray | None = None,
    max_text_chars: int | None = None,
    raw: list[str] | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Split a table into rows that satisfy the contract and rejects with a reason.

    Every input row ends in exactly one of the two outputs, so callers can
    check ``read == written + rejected``. Each rejected row carries the first
    failing check as its reason, its source row number and the row as JSON.
    Later duplicates of an id are rejected; the first occurrence is kept.
    ``raw`` gives each row's source text for the rejects (default: the row as JSON).
    """
    conformed = conform(table, kind)
    n = conformed.num_rows
    rows = np.arange(n, dtype=np.int64) if row_numbers is None else np.asarray(row_numbers, dtype=np.int64)
    if len(rows) != n:
        raise SchemaError(f"row_numbers has {len(rows)} entries for {n} rows")

    reason = np.full(n, None, dtype=object)
    for check in _checks(kind, max_text_chars):
        failing = check.failing(conformed) & (reason == None)  # noqa: E711 - elementwise on object array
        reason[failing] = check.reason
    if kind in ID_COLUMNS and n:
        id_col = ID_COLUMNS[kind]
        frame = pl.DataFrame({"id": pl.from_arrow(conformed.column(id_col).combine_chunks()), "ok": reason == None})  # noqa: E711
        # Only rows that passed every other check compete for the id; the first one wins.
        candidate = pl.when(pl.col("ok")).then(pl.col("id"))
        duplicate = frame.select(~candidate.is_first_distinct() & candidate.is_not_null()).to_series().to_numpy()
        reason[duplicate] = f"duplicate {id_col}"

    bad = reason != None  # noqa: E711
    good_idx = np.flatnonzero(~bad)
    bad_idx = np.flatnonzero(bad)
    valid = conformed.take(pa.array(good_idx, type=pa.int64())).cast(schema_for(kind))
    raws = [raw[i] for i in bad_idx] if raw is not None else _raw_json(conformed, bad_idx)
    rejects = make_rejects(source, rows[bad_idx].tolist(), reason[bad_idx].tolist(), raws)
    return valid, rejects
