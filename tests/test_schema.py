from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engagesim import io
from engagesim.schema import POSTS, SCHEMA_VERSION, SchemaError, validate


def _posts(**overrides):
    base = {
        "post_id": ["1", "2", "3"],
        "author_id": ["a", "b", "c"],
        "username": ["a", "b", "c"],
        "text": ["hello", "world", "!"],
        "media": [[], [{"kind": "photo", "uri": "s3://b/x.png"}], []],
        "created_at": [datetime(2021, 1, 1, tzinfo=timezone.utc)] * 3,
        "likes": [1, 2, 3],
    }
    base.update(overrides)
    return pa.table(base)


def test_valid_table_passes_and_conforms_to_contract():
    valid, rejects = validate(_posts(), "posts", "t")
    assert valid.num_rows == 3 and rejects.num_rows == 0
    assert valid.schema.equals(POSTS)
    assert valid.column("company").null_count == 3


@pytest.mark.parametrize(
    "overrides, bad_row, reason",
    [
        ({"likes": [1, -5, 3]}, 1, "negative likes"),
        ({"post_id": ["1", None, "3"]}, 1, "missing post_id"),
        ({"username": ["a", "b", " "]}, 2, "empty username"),
        ({"media": [[], [{"kind": "audio", "uri": "x"}], []]}, 1, "media kind not in ('photo', 'video', 'gif') or empty uri"),
        ({"post_id": ["1", "2", "1"]}, 2, "duplicate post_id"),
        ({"text": ["hello", "x" * 50, "!"]}, 1, "text longer than 10 characters"),
    ],
)
def test_each_check_rejects_exactly_the_bad_row(overrides, bad_row, reason):
    valid, rejects = validate(_posts(**overrides), "posts", "src.csv", max_text_chars=10)
    assert rejects.num_rows == 1
    rec = rejects.to_pylist()[0]
    assert (rec["row"], rec["reason"], rec["source"]) == (bad_row, reason, "src.csv")
    assert valid.num_rows + rejects.num_rows == 3


def test_duplicate_of_a_rejected_row_keeps_the_later_valid_one():
    table = _posts(post_id=["1", "1", "2"], likes=[-1, 5, 3])
    valid, rejects = validate(table, "posts", "t")
    assert valid.column("post_id").to_pylist() == ["1", "2"]
    assert valid.column("likes").to_pylist() == [5, 3]
    assert rejects.column("reason").to_pylist() == ["negative likes"]


def test_missing_required_column_is_a_schema_error():
    with pytest.raises(SchemaError, match="created_at"):
        validate(_posts().drop(["created_at"]), "posts", "t")


def test_parquet_carries_schema_version(tmp_path):
    valid, _ = validate(_posts(), "posts", "t")
    writer = io.DatasetWriter(str(tmp_path / "posts"), "posts")
    writer.write(valid)
    writer.commit()
    assert io.file_schema_version(str(tmp_path / "posts")) == {"schema_version": SCHEMA_VERSION, "kind": "posts"}
    part = io.dataset_files(str(tmp_path / "posts"))[0]
    assert pq.read_schema(part).metadata[b"engagesim.kind"] == b"posts"
