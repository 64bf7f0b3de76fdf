"""Ingest: source files → a contract dataset plus ``_rejects/``, nothing lost.

Stage shape: (config, input URIs) → output URI. Batches stream from the
readers through ``coerce`` and ``schema.validate``; valid rows are written as
Parquet parts, rejects with their reason to ``<out>/_rejects``; both commit
atomically at the end and ``read == written + rejected`` is checked before
the manifests are published.
"""

from __future__ import annotations

import csv
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from engagesim.config import AppConfig
from engagesim.errors import UserError
from engagesim.io import REJECTS_DIR, DatasetWriter, commit_group, join, output_lock
from engagesim.loaders.coerce import coerce
from engagesim.loaders.readers import RawBatch, read_raw
from engagesim.schema import ID_COLUMNS, SchemaError, make_rejects, schema_for, validate


class CountMismatch(RuntimeError):
    """read != written + rejected: a row went missing, which must never happen silently."""


@dataclass
class IngestSummary:
    read: int
    written: int
    rejected: int
    out: str
    rejects: str
    by_reason: dict[str, int]
    by_source: dict[str, dict[str, int]]

    def to_json(self) -> dict:
        return asdict(self)


def _fill_defaults(batch: RawBatch, fmt: str, kind: str) -> None:
    """What a file may leave out: no media column = no media; one of author_id / username stands for both."""
    frame = batch.frame
    if kind != "posts":
        return
    if "author_id" not in frame.columns and "username" in frame.columns:
        frame["author_id"] = frame["username"]
    if "username" not in frame.columns and "author_id" in frame.columns:
        frame["username"] = frame["author_id"]
    if "media" not in frame.columns:
        # train_sample2355_with_likes.csv carries a BLIP caption instead of media URLs.
        frame["media"] = None
    if fmt == "adobe" and "text" not in frame.columns:
        # content_simulation_test_company.xlsx has no text: it was that task's target.
        frame["text"] = ""


def _mark_seen_ids(table: pa.Table, kind: str, seen: set[str], reasons: np.ndarray) -> None:
    """Ids already written by an earlier batch or file are duplicates too."""
    if kind not in ID_COLUMNS or not seen:
        return
    ids = table.column(ID_COLUMNS[kind]).to_pylist()
    dup = np.fromiter((i in seen for i in ids), dtype=bool, count=len(ids))
    reasons[dup & (reasons == None)] = f"duplicate {ID_COLUMNS[kind]}"  # noqa: E711


def _file_errors(name: str, batches: Iterator[RawBatch]) -> Iterator[RawBatch]:
    """A file that cannot be read as its format (truncated, garbage, not what its name says) is the user's to
    fix: one line naming it, never a traceback from deep in a reader."""
    try:
        yield from batches
    except UserError:
        raise
    except (OSError, EOFError, zlib.error, csv.Error, zipfile.BadZipFile, KeyError, ValueError, pa.ArrowException,
            openpyxl_errors()) as exc:
        raise UserError(f"{name} could not be read ({type(exc).__name__}: {str(exc)[:200]}); check that it is a "
                        "complete file of the --format given") from exc


def openpyxl_errors() -> type[Exception]:
    from openpyxl.utils.exceptions import InvalidFileException

    return InvalidFileException


def ingest(
    sources: list[str],
    fmt: str,
    out: str,
    config: AppConfig,
    kind: str = "posts",
    mapping: dict[str, str] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> IngestSummary:
    """Every source → ``out`` (+ ``out/_rejects``), committed together or not at all, under ``out``'s lock."""
    storage = config.storage
    with output_lock(out, storage, what=f"an ingest of {len(sources)} {fmt} file(s)"):
        writer = DatasetWriter(out, kind, storage)
        rejects_writer = DatasetWriter(join(out, REJECTS_DIR), "rejects", storage, token=writer.token)
        try:
            return _ingest(sources, fmt, out, config, kind, mapping, on_batch, writer, rejects_writer)
        except BaseException:
            # A failed run leaves the committed dataset as it was: its own parts go, no manifest changes.
            writer.discard()
            rejects_writer.discard()
            raise


def _ingest(sources, fmt, out, config, kind, mapping, on_batch, writer, rejects_writer) -> IngestSummary:
    storage = config.storage
    seen: set[str] = set()
    read = 0
    by_source: dict[str, dict[str, int]] = {}
    by_reason: dict[str, int] = {}
    for source in sources:
        name = os.path.basename(source.rstrip("/"))
        counts = by_source.setdefault(name, {"read": 0, "written": 0, "rejected": 0})
        for batch in _file_errors(name, read_raw(source, fmt, mapping, storage, config.ingest.batch_rows)):
            _fill_defaults(batch, fmt, kind)
            table, reasons = coerce(batch.frame, kind, batch.reasons)
            _mark_seen_ids(table, kind, seen, reasons)
            pre_bad = reasons != None  # noqa: E711
            keep = np.flatnonzero(~pre_bad)
            valid, rejects = schema_for(kind).empty_table(), make_rejects(name, [], [], [])
            if len(keep):  # (a batch of only unparseable rows has no columns to check)
                try:
                    valid, rejects = validate(
                        table.take(pa.array(keep, type=pa.int64())), kind, name, row_numbers=batch.rows[keep],
                        max_text_chars=config.ingest.max_text_chars if kind == "posts" else None,
                        raw=[batch.raw[i] for i in keep])
                except SchemaError as exc:
                    raise UserError(f"{name}: {exc}; rename a source column to it with --map SOURCE=FIELD "
                                    "(csv/jsonl/parquet)") from None
            pre = np.flatnonzero(pre_bad)
            early = make_rejects(name, batch.rows[pre].tolist(), reasons[pre].tolist(), [batch.raw[i] for i in pre])
            if kind in ID_COLUMNS:
                seen.update(valid.column(ID_COLUMNS[kind]).to_pylist())
            all_rejects = pa.concat_tables([early, rejects])
            if valid.num_rows:
                writer.write(valid)
            if all_rejects.num_rows:
                rejects_writer.write(all_rejects)
                for reason, count in zip(*np.unique(all_rejects.column("reason").to_numpy(zero_copy_only=False), return_counts=True)):
                    by_reason[str(reason)] = by_reason.get(str(reason), 0) + int(count)
            n = len(batch.rows)
            read += n
            counts["read"] += n
            counts["written"] += valid.num_rows
            counts["rejected"] += all_rejects.num_rows
            if on_batch:
                on_batch(n)
    if read != writer.rows + rejects_writer.rows:
        raise CountMismatch(f"read {read} rows but wrote {writer.rows} + rejected {rejects_writer.rows}")
    extra = {"sources": sources, "format": fmt, "read": read, "rejected": rejects_writer.rows}
    commit_group(writer, [rejects_writer], extra)
    return IngestSummary(read, writer.rows, rejects_writer.rows, out, join(out, REJECTS_DIR), by_reason, by_source)
