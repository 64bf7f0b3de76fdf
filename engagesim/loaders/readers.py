"""Format readers: files → batches of raw values under contract column names.

Readers do no type conversion (that is ``coerce``'s job); they only find the
rows, rename columns, keep each row's source text for the rejects dataset and
flag what can only be seen at the byte level (invalid UTF-8).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from engagesim.config import StorageConfig
from engagesim.errors import UserError
from engagesim.io import filesystem

FORMATS = ("adobe", "csv", "jsonl", "parquet")

# Adobe challenge columns (lower-cased) → posts contract fields.
ADOBE_COLUMNS = {
    "id": "post_id",
    "date": "created_at",
    "likes": "likes",
    "content": "text",
    "username": "username",
    "media": "media",
    "inferred company": "company",
    "company": "company",
}


@dataclass
class RawBatch:
    frame: pd.DataFrame  # raw values, contract column names
    rows: np.ndarray  # 0-based data-row index in the source file (header excluded)
    raw: list[str]  # each row as it was read, JSON, for the rejects dataset
    reasons: np.ndarray  # object array: a reason where the reader already knows the row is bad


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _clean(value: Any) -> Any:
    """Make a cell safe to put in Arrow: lone surrogates (undecodable bytes) become \\x escapes."""
    if isinstance(value, str) and _has_surrogates(value):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def _raw_batch(records: list[dict[str, Any]], start: int, rename: dict[str, str]) -> RawBatch:
    n = len(records)
    reasons = np.full(n, None, dtype=object)
    raw = []
    for i, record in enumerate(records):
        bad = [k for k, v in record.items() if isinstance(v, str) and _has_surrogates(v)]
        if bad:
            reasons[i] = f"invalid UTF-8 in {bad[0]}"
            record = {k: _clean(v) for k, v in record.items()}
            records[i] = record
        raw.append(json.dumps(record, default=str, ensure_ascii=False))
    # object dtype: pandas would turn ints with one blank into floats ("55" → "55.0", 2^53+1 → rounded).
    frame = pd.DataFrame(records, dtype=object) if records else pd.DataFrame()
    frame = frame.rename(columns=rename)
    frame = frame.loc[:, [c for c in frame.columns if c in set(rename.values())]]
    frame = frame.loc[:, ~frame.columns.duplicated()]
    return RawBatch(frame.reset_index(drop=True), np.arange(start, start + n), raw, reasons)


def _text_stream(uri: str, storage: StorageConfig | None) -> io.TextIOBase:
    fs, path = filesystem(uri, storage)
    binary = fs.open_input_stream(path, compression="detect")
    # surrogateescape keeps undecodable bytes visible so the row can be rejected, not lost;
    # utf-8-sig drops the byte-order mark Excel's "CSV UTF-8" puts first.
    return io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _header(names: list[str], uri: str) -> list[str]:
    """A header that cannot name its columns is the file's problem, not a row's: one clear error."""
    header = [str(h).strip() if h is not None else "" for h in names]
    bad = next((h for h in header if _has_surrogates(h)), None)
    if bad is not None:
        raise UserError(f"{uri}: the header has bytes that are not UTF-8 ({_clean(bad)!r}); save the file as UTF-8")
    seen: set[str] = set()
    dup = next((h for h in header if h and (h.lower() in seen or seen.add(h.lower()))), None)
    if dup is not None:
        raise UserError(f"{uri}: column {dup!r} appears twice in the header; rename or drop one")
    return header


# One field may be large (a long post, a JSON blob): the text-length check rejects it with a reason,
# instead of the csv module's 128 KiB limit aborting the whole file.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def _chunks(rows: Iterator[dict[str, Any]], batch_rows: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    chunk: list[dict[str, Any]] = []
    start = 0
    for row in rows:
        chunk.append(row)
        if len(chunk) >= batch_rows:
            yield start, chunk
            start += len(chunk)
            chunk = []
    if chunk:
        yield start, chunk


def _csv_records(uri: str, storage: StorageConfig | None) -> Iterator[dict[str, Any]]:
    with _text_stream(uri, storage) as f:
        reader = csv.reader(f)
        header = _header(next(reader, []), uri)
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            record = {h: (v if v != "" else None) for h, v in zip(header, values) if h}
            if len(values) != len(header):  # a ragged row: which value belongs to which column is unknown
                record = {**dict.fromkeys(h for h in header if h), "__unparseable__": ",".join(values)[:2000],
                          "__error__": f"row has {len(values)} fields, the header has {len(header)}"}
            yield record


def adobe_records(uri: str, storage: StorageConfig | None = None) -> Iterator[dict[str, Any]]:
    """The rows of an Adobe challenge file (.xlsx or .csv) as they are: one dict per row, original column names."""
    return _xlsx_records(uri, storage) if uri.lower().endswith((".xlsx", ".xlsm")) else _csv_records(uri, storage)


def _xlsx_records(uri: str, storage: StorageConfig | None) -> Iterator[dict[str, Any]]:
    from openpyxl import load_workbook

    fs, path = filesystem(uri, storage)
    with fs.open_input_file(path) as f:
        book = load_workbook(io.BytesIO(f.read()), read_only=True, data_only=True)
    sheet = book.worksheets[0]
    rows = sheet.iter_rows(values_only=True)
    header = _header(list(next(rows, ())), uri)
    for values in rows:
        if all(v is None for v in values):
            continue
        yield {h: v for h, v in zip(header, values) if h}
    book.close()


def _jsonl_records(uri: str, storage: StorageConfig | None) -> Iterator[dict[str, Any]]:
    with _text_stream(uri, storage) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                record = {"__unparseable__": line.rstrip("\n")[:2000], "__error__": exc.msg}
            except RecursionError:
                record = {"__unparseable__": line.rstrip("\n")[:2000], "__error__": "nested too deeply"}
            yield record if isinstance(record, dict) else {"__unparseable__": line.rstrip("\n"), "__error__": "not an object"}


def _parquet_batches(uri: str, storage: StorageConfig | None, batch_rows: int) -> Iterator[tuple[int, list[dict]]]:
    fs, path = filesystem(uri, storage)
    start = 0
    for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=batch_rows):
        records = batch.to_pylist()
        yield start, records
        start += len(records)


def read_raw(
    uri: str,
    fmt: str,
    mapping: dict[str, str] | None = None,
    storage: StorageConfig | None = None,
    batch_rows: int = 50_000,
) -> Iterator[RawBatch]:
    """Yield raw batches of one source file.

    ``mapping`` maps source column → contract field for csv/jsonl/parquet;
    columns already named like the contract need no entry. The adobe format
    knows its own columns (``inferred company`` or ``company`` → company).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if fmt == "adobe":
        records = adobe_records(uri, storage)
        chunks = _chunks(({k.lower(): v for k, v in r.items()} for r in records), batch_rows)
        rename = ADOBE_COLUMNS
    else:
        if fmt == "parquet":
            chunks = _parquet_batches(uri, storage, batch_rows)
        else:
            reader = _csv_records if fmt == "csv" else _jsonl_records
            chunks = _chunks(reader(uri, storage), batch_rows)
        rename = dict(mapping or {})
    for start, records in chunks:
        batch = _raw_batch(records, start, _identity_plus(rename))
        for i, record in enumerate(records):
            if "__unparseable__" in record and batch.reasons[i] is None:
                batch.reasons[i] = f"unparseable line: {record['__error__']}"
        yield batch


def _identity_plus(rename: dict[str, str]) -> dict[str, str]:
    """Contract-named columns pass through; mapped ones are renamed."""
    from engagesim.schema import SCHEMAS

    names = {f.name for kind in ("posts", "users", "interactions") for f in SCHEMAS[kind]}
    out = {n: n for n in names}
    out.update(rename)
    return out
