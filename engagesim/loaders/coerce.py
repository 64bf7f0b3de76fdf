"""Turn raw string columns into contract types, recording why a value failed.

Loaders of every format first produce a table of raw values under contract
column names; this module converts them column by column (vectorised with
pandas/pyarrow, row-wise only for the media mini-language) and returns, per
row, the first reason it could not be converted. ``schema.validate`` then
applies the contract's own checks. Two stages, one reject stream.
"""

from __future__ import annotations

import ast
import json
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from engagesim.schema import MEDIA_ITEM, TIMESTAMP, schema_for

MEDIA_CALLS = {"photo": "photo", "video": "video", "gif": "gif", "animatedgif": "gif"}
_URI_KEYS = {"photo": ("fullUrl", "previewUrl", "url"), "video": ("thumbnailUrl", "url"), "gif": ("thumbnailUrl", "url")}


class MediaParseError(ValueError):
    pass


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Call):
        return {"__call__": node.func.id if isinstance(node.func, ast.Name) else None,
                **{kw.arg: _literal(kw.value) for kw in node.keywords}}
    raise MediaParseError(f"unexpected {type(node).__name__}")


def parse_media(value: Any) -> list[dict[str, str]]:
    """Parse a media field into ``[{kind, uri}]``.

    Accepts the Adobe/snscrape repr (``[Photo(previewUrl='…', fullUrl='…'), Video(thumbnailUrl='…', variants=[…])]``,
    parsed with ``ast`` — never evaluated), a JSON list of ``{kind, uri}``, or empty/None for no media.
    Photos map to their full-size URL; videos and GIFs to their thumbnail (the still an image model can read).
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, list):
        items = value
    else:
        text = str(value).strip()
        if text in ("", "[]", "nan", "None"):
            return []
        if text.startswith("[{") or text.startswith("[ {"):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as exc:
                raise MediaParseError(f"malformed media JSON: {exc.msg}") from None
        else:
            try:
                tree = ast.parse(text, mode="eval").body
            except SyntaxError as exc:
                raise MediaParseError(f"malformed media string: {exc.msg}") from None
            if not isinstance(tree, ast.List):
                raise MediaParseError("malformed media string: expected a [...] list")
            items = [_literal(e) for e in tree.elts]
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise MediaParseError("malformed media string: items must be Photo(...)/Video(...)/Gif(...)")
        if "__call__" in item:
            kind = MEDIA_CALLS.get(str(item["__call__"]).lower())
            if kind is None:
                raise MediaParseError(f"unknown media kind {item['__call__']!r}")
            uri = next((item[k] for k in _URI_KEYS[kind] if isinstance(item.get(k), str) and item[k]), None)
            if uri is None and isinstance(item.get("variants"), list) and item["variants"]:
                uri = item["variants"][0].get("url")
        else:
            kind, uri = str(item.get("kind", "")).lower(), item.get("uri")
        if not uri:
            raise MediaParseError(f"media item of kind {kind!r} has no URL")
        out.append({"kind": kind, "uri": str(uri)})
    return out


def _first_reason(reasons: np.ndarray, failing: np.ndarray, reason: str) -> None:
    reasons[failing & (reasons == None)] = reason  # noqa: E711


def _present(series: pd.Series) -> np.ndarray:
    return (series.notna() & (series.astype(str).str.strip() != "")).to_numpy()


def to_int(series: pd.Series, name: str, reasons: np.ndarray) -> pa.Array:
    present = _present(series)
    numeric = pd.to_numeric(series.where(present), errors="coerce")
    bad = present & (numeric.isna().to_numpy() | (numeric.fillna(0) % 1 != 0).to_numpy())
    _first_reason(reasons, bad, f"non-integer {name}")
    values = numeric.where(present & ~bad).round()
    return pa.array(values.astype("Int64"), type=pa.int64(), from_pandas=True)


def to_timestamp(series: pd.Series, name: str, reasons: np.ndarray) -> pa.Array:
    present = _present(series)
    if pd.api.types.is_numeric_dtype(series):
        parsed = pd.to_datetime(series, unit="s", utc=True, errors="coerce")
    else:
        parsed = pd.to_datetime(series.where(present), utc=True, errors="coerce", format="mixed")
    bad = present & parsed.isna().to_numpy()
    _first_reason(reasons, bad, f"unparseable {name}")
    return pa.array(parsed.dt.as_unit("us"), type=TIMESTAMP, from_pandas=True)


def to_bool(series: pd.Series, name: str, reasons: np.ndarray) -> pa.Array:
    present = _present(series)
    text = series.astype(str).str.strip().str.lower()
    truth = text.isin(["true", "1", "yes", "t"]).to_numpy()
    false = text.isin(["false", "0", "no", "f"]).to_numpy()
    _first_reason(reasons, present & ~truth & ~false, f"not a boolean {name}")
    return pa.array(np.where(present, truth, None), type=pa.bool_(), from_pandas=True)


def to_media(series: pd.Series, name: str, reasons: np.ndarray) -> pa.Array:
    values = []
    for i, value in enumerate(series.tolist()):
        try:
            values.append(parse_media(value))
        except MediaParseError as exc:
            if reasons[i] is None:
                reasons[i] = str(exc)
            values.append([])
    return pa.array(values, type=pa.list_(MEDIA_ITEM))


def to_string(series: pd.Series, name: str, reasons: np.ndarray) -> pa.Array:
    present = series.notna().to_numpy()
    return pa.array(np.where(present, series.astype(str), None), type=pa.string(), from_pandas=True)


_CONVERTERS = {
    pa.int64(): to_int,
    TIMESTAMP: to_timestamp,
    pa.bool_(): to_bool,
    pa.string(): to_string,
    pa.list_(MEDIA_ITEM): to_media,
}


def coerce(frame: pd.DataFrame, kind: str, reasons: np.ndarray | None = None) -> tuple[pa.Table, np.ndarray]:
    """Convert raw columns (any of the contract's names present in ``frame``) to contract types.

    Returns the typed table (absent optional columns become nulls later, in
    ``schema.conform``) and an object array with a reason per failed row.
    """
    schema = schema_for(kind)
    reasons = np.full(len(frame), None, dtype=object) if reasons is None else reasons
    arrays, names = [], []
    for field in schema:
        if field.name not in frame.columns:
            continue
        converter = _CONVERTERS[field.type]
        arrays.append(converter(frame[field.name], field.name, reasons))
        names.append(field.name)
    return pa.Table.from_arrays(arrays, names=names), reasons
