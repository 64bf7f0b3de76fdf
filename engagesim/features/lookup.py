"""Key lookups into a fitted table that cost the same whatever the table's size.

A left join hashes its right side on every call. Serving joins a handful of request rows against the run's
fitted tables (target-encoding stats, authors, users, posts, history per group, graph ids) about ten times
per request, so latency grew with the snapshot: one row against a unique-keyed table took 0.22 ms at 1k
rows, 4.1 ms at 100k and 70 ms at 1M (polars 1.x, this 2-core machine). ``left_lookup`` answers a few keys
from an index built once per table (key → row, a dict) and a gather — about 0.4 ms at any size, nearly all of
it the polars calls around the dict — and keeps the hash join for many keys, where hashing both sides is the
cheaper plan. Both plans give the join's result
exactly (same rows, order, columns, dtypes; null keys never match), which ``tests/test_lookup.py`` holds them
to on random tables.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np
import polars as pl

# Up to this many keys a lookup of a marked table (``indexed``) goes through its index; above it, the hash
# join (its cost is then dominated by the keys themselves, and the Python-level index walk would be slower).
INDEX_MAX_KEYS = 2048


class KeyIndex:
    """Row of each key of ``table`` on the columns ``on`` (a key must be unique; a key with a null never
    matches, as in a join)."""

    def __init__(self, table: pl.DataFrame, on: list[str]):
        keys = table.select(on)
        rows = keys.rows() if len(on) > 1 else keys.to_series().to_list()
        self.on = on
        self.rest = table.drop(on)  # the looked-up columns (no copy: the table's own buffers)
        self.rest_dtypes = self.rest.dtypes
        self.row: dict[Any, int] = {}
        for i, key in enumerate(rows):
            if key is None or (len(on) > 1 and None in key):
                continue
            if key in self.row:
                raise ValueError(f"key {key!r} is not unique in the table: a lookup would drop the join's extra rows")
            self.row[key] = i

    def positions(self, keys: pl.DataFrame) -> pl.Series:
        """The table row of each key (null where the table has none)."""
        values = keys.rows() if len(self.on) > 1 else keys.to_series().to_list()
        get = self.row.get
        return pl.Series([get(k) for k in values], dtype=pl.UInt32)


_LOCK = threading.Lock()
_INDEXES: dict[tuple[int, tuple[str, ...]], list] = {}  # (id, on) → [weakref to the table, KeyIndex or None]


def indexed(table: pl.DataFrame | None, on: str | list[str]) -> pl.DataFrame | None:
    """Marks a fitted table that serving looks keys up in (the run's loaded state): its index is built on the
    first lookup of a few keys and kept while the table lives. Only marked tables are indexed — the batch
    pipeline's large, short-lived tables keep the hash join, and never pay a Python-level build."""
    if table is not None:
        key = (id(table), tuple([on] if isinstance(on, str) else on))
        with _LOCK:
            if key not in _INDEXES or _INDEXES[key][0]() is not table:
                _INDEXES[key] = [weakref.ref(table, lambda _, k=key: _INDEXES.pop(k, None)), None]
    return table


def index_of(table: pl.DataFrame, on: list[str]) -> KeyIndex | None:
    """The marked table's index on ``on`` (built now if this is its first use); None for an unmarked table."""
    entry = _INDEXES.get((id(table), tuple(on)))
    if entry is None or entry[0]() is not table:
        return None
    if entry[1] is None:
        index = KeyIndex(table, on)
        with _LOCK:
            entry[1] = entry[1] or index
    return entry[1]


def left_lookup(keys: pl.DataFrame, table: pl.DataFrame, on: str | list[str],
                extra: pl.DataFrame | None = None, with_keys: bool = True) -> pl.DataFrame:
    """``keys.join(table, on=on, how="left", maintain_order="left")`` for a table unique on ``on``: the keys'
    columns, then the table's other columns, one row per key.

    ``extra``: rows with keys the table lacks (a request's new posts), as if concatenated below it
    (``pl.concat([table, extra], how="vertical_relaxed")``) — without re-indexing the table for them.
    ``with_keys=False``: the table's columns only (the join's, less the keys' columns)."""
    on = [on] if isinstance(on, str) else list(on)
    both = table if extra is None or not extra.height else None
    clash = set(keys.columns) & set(table.columns) - set(on)  # the join would suffix these: leave it to the join
    index = None if keys.height > INDEX_MAX_KEYS or clash else index_of(table, on)
    if index is None:
        if both is None:
            both = pl.concat([table, extra.select(table.columns)], how="vertical_relaxed")
        joined = keys.join(both, on=on, how="left", maintain_order="left")
        return joined if with_keys else joined.drop(keys.columns)
    found = index.positions(keys.select(on))
    hit = found.is_not_null().to_numpy()
    rest = index.rest
    if not rest.width:
        return keys if with_keys else keys.drop(keys.columns)
    if both is None and not hit.any() and (alone := _only_extra(keys.select(on), extra, on, index)) is not None:
        return pl.concat([keys, alone], how="horizontal") if with_keys else alone  # a new post scored alone
    if both is not None or hit.all():
        got = rest.select(pl.all().gather(found))
        if both is None:  # every key in the table: the result still takes the extra rows' column types
            got = pl.concat([got, extra.select(rest.columns).head(0)], how="vertical_relaxed")
    else:  # keys the table lacks, from the few extra rows (a join: they are few)
        more = keys.select(on).join(extra.select(table.columns), on=on, how="left", maintain_order="left").drop(on)
        if not hit.any():  # one new post scored alone: all from the extra rows, in the table's column types
            got = pl.concat([rest.head(0), more], how="vertical_relaxed")
        else:
            n = keys.height
            got = pl.concat([rest.select(pl.all().gather(found)), more], how="vertical_relaxed")
            got = got[np.where(hit, np.arange(n), np.arange(n, 2 * n))]
    return pl.concat([keys, got], how="horizontal") if with_keys else got


def _only_extra(keys: pl.DataFrame, extra: pl.DataFrame, on: list[str], index: KeyIndex) -> pl.DataFrame | None:
    """The extra rows of keys that are all in ``extra`` (and none in the table), by position, in the table's
    column types; None where that does not hold (a missing key, repeated extra keys, other types: the join)."""
    values = keys.rows() if len(on) > 1 else keys.to_series().to_list()
    extra_keys = extra.select(on).rows() if len(on) > 1 else extra[on[0]].to_list()
    position = {k: i for i, k in enumerate(extra_keys)}
    rows = [position.get(k) for k in values]
    if len(position) != len(extra_keys) or None in rows or any(k is None or (len(on) > 1 and None in k)
                                                                for k in values):
        return None
    got = extra.select(pl.col(index.rest.columns).gather(rows))
    return got if got.dtypes == index.rest_dtypes else None


def lookup_columns(table: pl.DataFrame, on: str | list[str], keys: pl.DataFrame, columns: list[str],
                   fill: dict[str, float]) -> dict[str, np.ndarray]:
    """``columns`` of the ``table`` row (unique on ``on``) of each key of ``keys`` (its ``on`` columns) as
    float64 numpy, ``fill[column]`` where the table has no such key or the value is null or NaN (a null key
    never matches): a left join's columns without a frame per lookup.

    Two plans, one result (tests/test_lookup.py): up to ``INDEX_MAX_KEYS`` keys of a marked table, its key →
    row index and its columns converted to numpy once (a served row: µs); otherwise a hash join carrying the
    columns (a block of the batch pipeline)."""
    on = [on] if isinstance(on, str) else list(on)
    index = index_of(table, on) if keys.height <= INDEX_MAX_KEYS else None
    if index is not None:
        # Tuples of the key columns' values (``keys.select(on).rows()``, without the select: ~0.2 ms at one row).
        values = (list(zip(*(keys.get_column(k).to_list() for k in on))) if len(on) > 1
                  else keys.get_column(on[0]).to_list())
        return _indexed_columns(table, index, values, columns, fill)
    joined = keys.select(on).join(table.select(*on, *columns), on=on, how="left", maintain_order="left")
    if joined.height != keys.height:
        raise ValueError(f"the table is not unique on {on}: a lookup would repeat rows")
    # One parallel pass; to_numpy then copies only the columns still holding nulls (as NaN).
    filled = joined.select(pl.col(c).cast(pl.Float64) if np.isnan(fill[c]) else
                           pl.col(c).cast(pl.Float64).fill_null(fill[c]).fill_nan(fill[c]) for c in columns)
    return {c: filled[c].to_numpy() for c in columns}


def lookup_values(table: pl.DataFrame, on: str, values: list, columns: list[str],
                  fill: dict[str, float], dtype: pl.DataType = pl.String) -> dict[str, np.ndarray]:
    """``lookup_columns`` for keys given as a Python list (one key column of type ``dtype``): a served row's
    keys go straight to the index, without the Series and frame ``lookup_columns`` reads them from."""
    index = index_of(table, [on]) if len(values) <= INDEX_MAX_KEYS else None
    if index is None:
        return lookup_columns(table, on, pl.DataFrame({on: values}, schema={on: dtype}), columns, fill)
    return _indexed_columns(table, index, values, columns, fill)


def _indexed_columns(table: pl.DataFrame, index: KeyIndex, values: list, columns: list[str],
                     fill: dict[str, float]) -> dict[str, np.ndarray]:
    get = index.row.get
    rows = [get(k, -1) for k in values]
    block, fills, fillable = _block(table, columns, fill)
    missing = [i for i, r in enumerate(rows) if r < 0]  # mostly none: the masked write below is then skipped
    # One gather of every column (a copy: the fills below never write into the table's memory), the fills in
    # place: a served request's 17 lookups took 384 µs column by column, 150 µs so (identical values).
    got = (block.take([max(r, 0) for r in rows] if missing else rows, axis=1) if table.height
           else np.zeros((len(columns), len(rows)))).astype(np.float64, copy=False)
    if missing:
        got[:, missing] = np.nan
    if fillable is not None:  # a fill that is not NaN replaces NaN (null) values
        nan = np.isnan(got)
        nan &= fillable
        np.copyto(got, fills, where=nan)
    return dict(zip(columns, got))


def segment_left(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each query i, the first index in ``[lo[i], hi[i])`` of the sorted-within-segment ``values`` whose value
    is ≥ ``targets[i]`` (``hi[i]`` where none): ``np.searchsorted(values[lo:hi], t, "left") + lo`` for every query
    at once — log2(longest segment) numpy passes, no segment copied. ``lo`` / ``hi`` are int64 and not changed."""
    lo, hi = lo.copy(), hi.copy()
    last = len(values) - 1
    while (active := lo < hi).any():
        mid = (lo + hi) // 2
        right = active & (values[np.minimum(mid, last)] < targets)
        lo = np.where(right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)
    return lo


def frame(columns: dict[str, np.ndarray]) -> pl.DataFrame:
    """numpy columns → a frame, as ``pl.DataFrame(columns)`` makes it: built from Series, which costs half
    (0.07 vs 0.14 ms for ten one-row columns — a served request builds a dozen such frames)."""
    return pl.DataFrame([pl.Series(name, values) for name, values in columns.items()])


def float32_frame(columns: dict[str, np.ndarray]) -> pl.DataFrame:
    """Feature columns computed from ``lookup_columns`` → a Float32 frame, NaN as null (what the joins gave)."""
    return pl.DataFrame([pl.Series(name, values.astype(np.float32), nan_to_null=True)
                         for name, values in columns.items()])


_BLOCKS: dict[tuple[int, tuple[str, ...]], list] = {}  # (id, columns) of a marked table → [weakref, block]


def _block(table: pl.DataFrame, columns: list[str], fill: dict[str, float]):
    """A marked table's ``columns`` as one (columns, rows) numpy array in their common type (nulls as NaN; the
    posts' float32 and int8 stay float32), kept while the table lives, with the fills as a column vector and
    which of them are not NaN (None: all NaN). A lookup site asks for the same columns and fills each time."""
    key = (id(table), tuple(columns))
    fills = tuple(fill[c] for c in columns)
    entry = _BLOCKS.get(key)
    if entry is None or entry[0]() is not table:
        arrays = [table[c].to_numpy() for c in columns]
        block = np.stack(arrays).astype(np.result_type(*arrays), copy=False) if arrays else np.zeros((0, table.height))
        entry = [weakref.ref(table, lambda _, k=key: _BLOCKS.pop(k, None)), block, (None, None, None)]
        with _LOCK:
            _BLOCKS[key] = entry
    made = entry[2]  # read once: another thread may replace it
    if made[0] != fills:  # a NaN made anew compares unequal: recomputed, never wrong
        vector = np.array(fills, dtype=np.float64)[:, None]
        fillable = ~np.isnan(vector)
        made = entry[2] = (fills, vector, fillable if fillable.any() else None)
    return entry[1], made[1], made[2]


def absent(table: pl.DataFrame, on: str, values: list) -> list:
    """The distinct values (first-seen order) that are not keys of ``table`` (a null is never a key): a served
    request's posts the snapshot lacks, from the index without a Series operation (~0.3 ms at one row)."""
    index = index_of(table, [on]) if len(values) <= INDEX_MAX_KEYS else None
    if index is None:
        series = pl.Series(values, dtype=table.schema[on])
        hits = contains(table, on, series).to_list()
        return list(dict.fromkeys(v for v, hit in zip(values, hits) if not hit))
    row = index.row
    return list(dict.fromkeys(v for v in values if v is None or v not in row))


def contains(table: pl.DataFrame, on: str, values: pl.Series) -> pl.Series:
    """Whether each value is a key of ``table`` (``values.is_in(table[on])``; a null is never one)."""
    index = index_of(table, [on]) if len(values) <= INDEX_MAX_KEYS else None
    if index is None:
        return values.is_in(table[on].implode()).fill_null(False)
    return index.positions(values.to_frame(on)).is_not_null()
