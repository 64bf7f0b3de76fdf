"""Time features: when a post went out, how long since the account's previous post, account age."""

from __future__ import annotations

import numpy as np
import polars as pl

from engagesim.features.lookup import INDEX_MAX_KEYS, KeyIndex, left_lookup, segment_left
from engagesim.features.text import FEW_ROWS  # the served-request paths' one bound

TEMPORAL_COLUMNS = ["day_of_week", "hour", "month", "secs_since_prev_post", "account_age_days"]
_LOOP_ROWS = 16  # above this many rows ``PreviousPosts.before`` bisects all rows at once instead of row by row


def earlier_posts(known: pl.DataFrame) -> pl.DataFrame:
    """The posts a "previous post" may be, as the as-of join reads them: author_id, _prev (sorted)."""
    return known.select("author_id", pl.col("created_at").alias("_prev")).sort("_prev")


class PreviousPosts:
    """Each account's known post times, sorted, for the as-of join's answer to a few rows by binary search
    (a served post: µs, where the sort, as-of join and sort back of ``temporal_features`` cost ~1 ms)."""

    def __init__(self, earlier: pl.DataFrame):
        self.dtype = earlier.schema["_prev"]
        by = earlier.select("author_id", pl.col("_prev").dt.epoch(self.dtype.time_unit).alias("t")).drop_nulls()
        by = by.sort("author_id", "t").with_row_index("i")
        self.t = by["t"].to_numpy()
        spans = by.group_by("author_id").agg(pl.col("i").min().alias("s"), pl.len().alias("n"))
        self.span = dict(zip(spans["author_id"].to_list(), zip(spans["s"].to_list(), spans["n"].to_list())))

    def before(self, authors: list, times: list) -> list[int | None]:
        """Each (author, time)'s latest known post time strictly before it, in the snapshot's unit (None: none)."""
        if len(authors) > _LOOP_ROWS:
            return self._before_vectorised(authors, times)
        return self._before_loop(authors, times)

    def _before_loop(self, authors: list, times: list) -> list[int | None]:
        out = []
        for author, t in zip(authors, times):
            s, n = self.span.get(author, (0, 0))
            i = int(np.searchsorted(self.t[s:s + n], t, side="left")) - 1 if n and t is not None else -1
            out.append(int(self.t[s + i]) if i >= 0 else None)
        return out

    def _before_vectorised(self, authors: list, times: list) -> list[int | None]:
        """``before`` as one bisection over every row's own account span at once (1,000 served posts: 1.2 ms
        where one ``searchsorted`` per row cost 4.6 ms): the first index of the span whose time is ≥ the row's."""
        if not len(self.t):
            return [None] * len(authors)
        get = self.span.get
        spans = np.array([get(a, (0, 0)) for a in authors], dtype=np.int64).reshape(-1, 2)
        known = np.array([t is not None for t in times])
        t = np.array([0 if v is None else v for v in times], dtype=np.int64)
        start = spans[:, 0]
        lo = segment_left(self.t, start, np.where(known, start + spans[:, 1], start), t)
        found = lo > start  # lo is the span's first time ≥ t: the one before it, if inside the span, is the answer
        prev = self.t[np.maximum(lo - 1, 0)]
        return [int(p) if f else None for p, f in zip(prev.tolist(), found.tolist())]

    def previous(self, posts: pl.DataFrame) -> pl.Series:
        """``_prev`` of each post: the account's latest known post strictly before it (null: none)."""
        times = posts["created_at"].dt.epoch(self.dtype.time_unit).to_list()
        return pl.Series("_prev", self.before(posts["author_id"].to_list(), times), dtype=pl.Int64).cast(self.dtype)


class AccountsCreated:
    """Each account's creation time (µs), found by key: a few posts' account ages without a join."""

    def __init__(self, accounts: pl.DataFrame, index: KeyIndex):
        self.row = index.row  # the accounts table's lookup index (features/lookup.py): unique accounts
        self.us = accounts["_account_created"].dt.epoch("us").to_list()

    def created(self, authors: list) -> list[int | None]:
        get = self.row.get
        return [None if (i := get(a)) is None else self.us[i] for a in authors]


_DAY_US, _HOUR_US = 86_400_000_000, 3_600_000_000


def _seconds(delta_us: int) -> int:
    """A duration's whole seconds, truncated toward zero (``dt.total_seconds()``)."""
    return delta_us // 1_000_000 if delta_us >= 0 else -((-delta_us) // 1_000_000)




def few_rows(posts: pl.DataFrame, previous: PreviousPosts, accounts: AccountsCreated | None) -> pl.DataFrame | None:
    """``temporal_features`` of a few posts in plain Python (a served post: ~0.1 ms where the frame operations
    cost ~1 ms), or None where its arithmetic would not be the polars path's: times other than UTC µs."""
    cols = _few_rows_lists(posts, previous, accounts)
    if cols is None:
        return None
    return pl.DataFrame([posts["post_id"], *[pl.Series(c, cols[c], dtype=pl.Int8) for c in ("day_of_week", "hour", "month")],
                         pl.Series("secs_since_prev_post", cols["secs_since_prev_post"], dtype=pl.Int64).cast(pl.Float32),
                         pl.Series("account_age_days", cols["account_age_days"], dtype=pl.Float64).cast(pl.Float32)])


def few_rows_arrays(posts: pl.DataFrame, previous: PreviousPosts,
                    accounts: AccountsCreated | None) -> dict[str, np.ndarray] | None:
    """``few_rows`` as float32 numpy columns (NaN: null), the values ``numeric_arrays`` reads from its frame."""
    cols = _few_rows_lists(posts, previous, accounts)
    if cols is None:
        return None
    return {c: np.array([np.nan if v is None else v for v in cols[c]], dtype=np.float64).astype(np.float32)
            for c in TEMPORAL_COLUMNS}


def _few_rows_lists(posts: pl.DataFrame, previous: PreviousPosts,
                    accounts: AccountsCreated | None) -> dict[str, list] | None:
    created = posts.get_column("created_at")
    dtype = created.dtype
    if dtype != pl.Datetime("us", "UTC") or previous.dtype != dtype:
        return None
    times = created.cast(pl.Int64).to_list()  # a µs column's physical values (``dt.epoch``: an expression, 72 µs)
    authors = posts["author_id"].to_list()
    prev = previous.before(authors, times)
    made = accounts.created(authors) if accounts is not None else [None] * len(times)
    cols: dict[str, list] = {c: [] for c in TEMPORAL_COLUMNS}
    for t, p, m in zip(times, prev, made):
        if t is None:
            for c in TEMPORAL_COLUMNS:
                cols[c].append(None)
            continue
        days = t // _DAY_US
        cols["day_of_week"].append((days + 3) % 7)  # 1970-01-01 was a Thursday; Monday = 0
        cols["hour"].append(t // _HOUR_US % 24)
        cols["month"].append(int(np.datetime64(t, "us").astype("datetime64[M]").astype(np.int64)) % 12 + 1)
        cols["secs_since_prev_post"].append(None if p is None else _seconds(t - p))
        cols["account_age_days"].append(None if m is None else _seconds(t - m) / 86400.0)
    return cols


def account_created(users: pl.DataFrame) -> pl.DataFrame:
    """author_id, _account_created: when each account was made, as the account-age lookup reads it."""
    return users.select(pl.col("user_id").alias("author_id"), pl.col("created_at").alias("_account_created"))


def temporal_features(posts: pl.DataFrame, users: pl.DataFrame | None = None,
                      known: pl.DataFrame | None = None, *, accounts: pl.DataFrame | None = None,
                      earlier: pl.DataFrame | None = None, previous: PreviousPosts | None = None,
                      created: AccountsCreated | None = None) -> pl.DataFrame:
    """Day of week (0 = Monday), hour and month (UTC), seconds since the same account's previous post
    (Adobe; null when no earlier post of the account is known) and the author's account age in days
    (null without a users table).

    ``known`` are the posts a "previous post" may be (post_id, author_id, created_at): the batch itself
    by default; at scoring time the snapshot of posts the run saw, so one post scored alone gets the
    same value as in the batch pipeline.

    ``accounts`` / ``earlier``: ``account_created(users)`` / ``earlier_posts(known)`` made once by the caller
    (a loaded run keeps them, the first indexed): one request then neither renames nor sorts the snapshot.
    ``previous``: ``PreviousPosts(earlier)``, which answers up to ``lookup.INDEX_MAX_KEYS`` posts without the join;
    with ``created`` (``AccountsCreated(accounts)``) up to ``FEW_ROWS`` posts take ``few_rows``.
    """
    if previous is not None and posts.height <= FEW_ROWS and (created is not None or (accounts is None and users is None)):
        if (out := few_rows(posts, previous, created)) is not None:
            return out
    rows = posts.select("post_id", "author_id", "created_at").with_row_index("_i")
    if previous is not None and posts.height <= INDEX_MAX_KEYS:
        ordered = rows.with_columns(previous.previous(rows))
    else:
        if earlier is None:
            earlier = earlier_posts(posts if known is None else known)
        ordered = rows.sort("created_at").join_asof(earlier, left_on="created_at", right_on="_prev", by="author_id",
                                                    strategy="backward", allow_exact_matches=False,
                                                    check_sortedness=False)
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
