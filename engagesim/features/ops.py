"""Feature ops: the one unit both executors run (NVTabular's shape: fit per partition, finalize, transform).

An op is one fitted feature family — target encodings, PCA of an embedding, account attributes — as a class:

- ``fit_partial(rows) → part``: one block's partial fit. Blocks come in any size and order; an op that needs no
  fit returns None.
- ``combine(parts)``: the parts added up → the op's fitted state (in place). The executor decides how the parts
  meet, from the op's class attributes:
  - ``keys`` set (a *keyed* op): a part is a frame whose ``sums`` columns add up (and ``maxes`` columns take their
    maximum) per ``keys``. In process that is a polars ``group_by``; on Ray a hash shuffle (``groupby(keys)``), so
    no process sees every block's rows. ``combine`` gets the combined frame.
  - ``keys`` None: parts are small and fixed in size (moments, counts, a bounded sample), folded one by one in the
    driver (``pack`` / ``unpack`` carry them through Ray Data as bytes: safetensors or Arrow IPC, never pickle).
  - ``scope = "author"``: the op only looks at the same account's posts (time since its previous post, its
    reach). The Ray executor fits it inside each task that holds whole accounts (a hash partition of author_id),
    so no process holds every post; in process the whole frame is one partition.
- ``transform(df, at) → columns``: row-aligned with ``df``. ``at.roles`` (the rows' labels, training mask, time
  folds) switches a label-derived op to its leak-free values for training rows (out of fold, or earlier rows
  only); serving passes none and gets the apply values.
- ``save(uri, storage, skip) → (meta, arrays)`` / ``load(uri, storage, meta, arrays, snapshot)``: its tables under
  the state's directory, its scalars into the state's ``state.json`` and its arrays into one safetensors file.
  ``load`` returns None where the saved state has no such op.
- ``provenance`` (method, leak class) and ``columns()``: what the feature manifest says of every column it made.

The post ops are in ``features/post_ops.py`` and ``features/embedding_ops.py``, the impression ops in
``features/impression_ops.py``. A state (``features/state.PostState``, ``ImpressionState``) is an ordered list
of ops: fitting, transforming, saving, loading and the manifest are loops over it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import polars as pl

Snapshot = Literal["latest", "cutoff"]  # which label-derived state a loaded run serves


@dataclass(frozen=True)
class Provenance:
    source: str  # the method, and the system it comes from
    leak: str  # what the column may know of labels, and how it is kept from leaking


@dataclass
class Rows:
    """A block of post rows as a partial fit sees them."""

    df: pl.DataFrame
    y: np.ndarray  # log1p(likes); 0 where unlabelled
    train: np.ndarray  # bool: before the training cutoff
    fold: np.ndarray  # time fold of training rows
    labelled: np.ndarray  # bool: the row has a label (held-out labelled rows count in the latest snapshot)


@dataclass
class Apply:
    """What a transform may know beyond the rows: their roles (None at serving) and accounts the run never saw."""

    roles: Rows | None = None
    new_accounts: pl.DataFrame | None = None


class FeatureOp:
    """The protocol (see the module's docstring); the defaults are those of a row-local op with no state."""

    name: ClassVar[str]
    provenance: ClassVar[Provenance]
    keys: ClassVar[tuple[str, ...] | None] = None
    sums: ClassVar[tuple[str, ...]] = ()
    maxes: ClassVar[tuple[str, ...]] = ()
    scope: ClassVar[Literal["global", "author"]] = "global"
    fits: ClassVar[bool] = False  # whether fit_partial / combine do anything

    def fit_partial(self, rows: Rows) -> Any:
        return None

    def combine(self, parts: Iterable[Any]) -> None:
        pass

    def columns(self) -> list[str]:
        raise NotImplementedError

    def transform(self, df: pl.DataFrame, at: Apply) -> pl.DataFrame | None:
        raise NotImplementedError

    def arrays(self, df: pl.DataFrame, at: Any) -> dict[str, np.ndarray]:
        """The numeric columns of ``transform`` as numpy, NaN for null (what a model matrix reads): the serving
        path's form, which skips building a frame. An op whose transform computes numpy columns overrides it
        (and its transform is then this, as a frame); the default converts the frame."""
        out = self.transform(df, at)
        return {} if out is None else numeric_arrays(out)

    def save(self, uri: str, storage, skip: set[str]) -> tuple[dict, dict[str, np.ndarray]]:
        return {}, {}

    @classmethod
    def load(cls, uri: str, storage, meta: dict, arrays: dict[str, np.ndarray], snapshot: Snapshot) -> FeatureOp | None:
        return cls()

    def index_for_lookups(self) -> None:
        """Serving: mark the op's fitted tables for lookups by index (features/lookup.py)."""


def fit_in_process(ops: list[FeatureOp], rows: Any) -> None:
    """The in-process executor's fit: every op's partial fit on the whole frame as one block."""
    for op in ops:
        if op.fits:
            part = op.fit_partial(rows)
            op.combine([sum_by_keys(op, part)] if op.keys else [part])


def sum_by_keys(op: FeatureOp, parts: pl.DataFrame) -> pl.DataFrame:
    """A keyed op's parts (any number of blocks' rows, concatenated) summed (``maxes``: maximised, those the parts
    have) by its keys."""
    return parts.group_by(*op.keys).agg(pl.col(*op.sums).sum(), *[pl.col(c).max() for c in op.maxes
                                                                   if c in parts.columns])


def transform(ops: list[FeatureOp], df: pl.DataFrame, at: Apply) -> pl.DataFrame:
    return pl.concat([t for op in ops if (t := op.transform(df, at)) is not None], how="horizontal")


def arrays(ops: list[FeatureOp], df: pl.DataFrame, at: Any) -> dict[str, np.ndarray]:
    """``numeric_arrays(transform(ops, df, at))`` without the frame: each op's ``arrays``, in the ops' order."""
    out: dict[str, np.ndarray] = {}
    for op in ops:
        out.update(op.arrays(df, at))
    return out


def numeric_arrays(df: pl.DataFrame, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """A frame's numeric and boolean columns (of ``names``, those the frame has) as numpy (float32 where a column
    held nulls or booleans, NaN for null; a model matrix converts every column to float32 anyway).

    Column by column: a served post's 20 columns cost ~0.1 ms so, where one ``select`` of them alone cost 0.2 ms
    (and the frame's ``schema`` builds a dict of every column on each access: ~40 µs on a post's 40 columns, where
    a column's own dtype is 1 µs)."""
    out = {}
    present = df.columns
    if names is not None:
        has = set(present)
        present = [n for n in names if n in has]
    for name in present:
        column = df.get_column(name)
        dtype = column.dtype
        if not (dtype.is_numeric() or dtype == pl.Boolean):
            continue
        nulls = column.null_count()
        if dtype == pl.Boolean or (nulls and not dtype.is_float()):
            out[name] = column.cast(pl.Float32).to_numpy()
        elif nulls:  # a float column's nulls come out as NaN: the cast in numpy (the same rounding, µs not tens)
            out[name] = column.to_numpy().astype(np.float32)
        else:
            out[name] = column.to_numpy()
    return out


def null_mask(series: pl.Series) -> np.ndarray:
    """``series.is_null()`` as numpy. A Series method that is an expression costs ~85 µs at one row (a served
    request's frames); a column without nulls, or all null, is known from its null count (1 µs)."""
    nulls = series.null_count()
    if nulls == 0 or nulls == len(series):
        return np.full(len(series), bool(nulls))
    return series.is_null().to_numpy()


def epoch_us(series: pl.Series) -> np.ndarray:
    """A datetime column as µs since the epoch (int64; null: a float NaN column). A µs column's physical values
    are those (a cast: 4 µs at one row, where ``dt.epoch`` is an expression: 72 µs)."""
    dtype = series.dtype
    if isinstance(dtype, pl.Datetime) and dtype.time_unit == "us":
        return series.cast(pl.Int64).to_numpy()
    return series.dt.epoch("us").to_numpy()


def first(ops: list[FeatureOp], kind: type[FeatureOp]) -> Any:
    """A state's op of ``kind`` (None where the state has none)."""
    return next((op for op in ops if isinstance(op, kind)), None)


def provenance(ops: list[FeatureOp]) -> dict[str, Provenance]:
    """Column → the provenance of the op that made it."""
    return {column: op.provenance for op in ops for column in op.columns()}


# --- folded parts through Ray Data: bytes, never pickle ------------------------------------------

def pack(part: pl.DataFrame | dict[str, np.ndarray] | None) -> bytes:
    """A folded op's part → bytes: b"F" + Arrow IPC for a frame, b"A" + safetensors for arrays, b"" for None."""
    from engagesim.io import frame_bytes, safe_bytes

    if part is None:
        return b""
    return b"F" + frame_bytes(part) if isinstance(part, pl.DataFrame) else b"A" + safe_bytes(part)


def unpack(payload: bytes) -> pl.DataFrame | dict[str, np.ndarray] | None:
    if not payload:
        return None
    if payload[:1] == b"F":
        from engagesim.io import frame_of_bytes

        return frame_of_bytes(payload[1:])
    from safetensors.numpy import load

    return load(payload[1:])


def unpacked(payloads: Iterable[bytes]) -> Iterator[Any]:
    """The parts of a stream of packed payloads, skipping the empty ones."""
    for payload in payloads:
        part = unpack(payload)
        if part is not None:
            yield part
