"""The Adobe loader on the real challenge files, and on a copy with planted bad rows."""

import csv
import io as pyio
import json

import pyarrow as pa
import pytest

from engagesim import io
from engagesim.config import load_config
from engagesim.loaders import ingest
from engagesim.schema import POSTS, validate

REAL_FILES = {
    "content_simulation_test_company.xlsx": 10_000,
    "behaviour_simulation_test_company.xlsx": 10_000,
    "train_sample2355_with_likes.csv": 2_355,
    "train_caption_generated_top100.csv": 100,
    "content_simulation_train_sample22.xlsx": 22,
}


@pytest.mark.parametrize("name, rows", REAL_FILES.items())
def test_real_files_load_completely(adobe_dir, tmp_path, name, rows):
    out = str(tmp_path / "posts")
    summary = ingest([str(adobe_dir / name)], "adobe", out, load_config())
    assert summary.read == rows == summary.written + summary.rejected
    table = io.read_table(out)
    assert table.num_rows == summary.written
    assert table.schema.equals(POSTS)
    # What was written passes the contract again, unchanged.
    revalidated, rejects = validate(table, "posts", "re")
    assert rejects.num_rows == 0 and revalidated.num_rows == table.num_rows
    assert pa.compute.min(table.column("created_at")).as_py().year >= 2018


def test_media_urls_become_kinds(adobe_dir, tmp_path):
    out = str(tmp_path / "posts")
    ingest([str(adobe_dir / "train_caption_generated_top100.csv")], "adobe", out, load_config())
    table = io.read_table(out)
    kinds = {m["kind"] for ms in table.column("media").to_pylist() for m in ms}
    assert kinds == {"photo", "video", "gif"}
    first = table.to_pylist()[0]
    assert first["media"] == [{"kind": "photo", "uri": "https://pbs.twimg.com/media/Eo8N3JLVoAAlDJT?format=jpg&name=large"}]
    assert first["company"] == "tim hortons" and first["author_id"] == "TimHortonsPH"
    assert "<hyperlink>" in first["text"]
    assert first["created_at"].isoformat() == "2020-12-12T00:47:00+00:00"


BROKEN = {  # data row index → (column, new value, expected reason)
    3: ("date", "not a date", "unparseable created_at"),
    5: ("likes", "-4", "negative likes"),
    7: ("likes", "12.5", "non-integer likes"),
    9: ("id", "", "missing post_id"),
    11: ("username", "", "missing username"),
    13: ("media", "[Photo(previewUrl='https://x'", "malformed media string: '(' was never closed"),
    15: ("content", "caf@@BAD@@ au lait", "invalid UTF-8 in content"),
    17: ("content", "y" * 600, "text longer than 500 characters"),
    19: ("id", "1", "duplicate post_id"),
}


def _broken_copy(adobe_dir, path):
    with open(adobe_dir / "train_caption_generated_top100.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, data = rows[0], rows[1:]
    for index, (column, value, _) in BROKEN.items():
        data[index][header.index(column)] = value
    buf = pyio.StringIO()
    csv.writer(buf).writerows([header, *data])
    path.write_bytes(buf.getvalue().encode("utf-8").replace(b"@@BAD@@", b"\xff\xfe"))
    return len(data)


def test_broken_rows_go_to_rejects_with_reasons(adobe_dir, tmp_path):
    src = tmp_path / "broken.csv"
    n = _broken_copy(adobe_dir, src)
    out = str(tmp_path / "posts")
    cfg = load_config(None, ["ingest.max_text_chars=500"])
    summary = ingest([str(src)], "adobe", out, cfg)
    assert (summary.read, summary.written, summary.rejected) == (n, n - len(BROKEN), len(BROKEN))
    rejects = io.read_table(io.join(out, "_rejects")).to_pylist()
    got = {r["row"]: r["reason"] for r in rejects}
    assert got == {row: reason for row, (_, _, reason) in BROKEN.items()}
    assert all(r["source"] == "broken.csv" for r in rejects)
    raw = {r["row"]: json.loads(r["raw"]) for r in rejects}
    assert raw[5]["likes"] == "-4" and raw[3]["date"] == "not a date"
    assert "\\xff" in raw[15]["content"]  # the undecodable bytes are kept, escaped
    written = set(io.read_table(out).column("post_id").to_pylist())
    assert not written & {str(int(r) + 1) for r in BROKEN if r != 9}


def test_duplicates_across_files_are_rejected(adobe_dir, tmp_path):
    src = str(adobe_dir / "content_simulation_train_sample22.xlsx")
    summary = ingest([src, src], "adobe", str(tmp_path / "p"), load_config())
    assert (summary.read, summary.written, summary.rejected) == (44, 22, 22)
    assert summary.by_reason == {"duplicate post_id": 22}
