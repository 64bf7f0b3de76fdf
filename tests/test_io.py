"""Atomic datasets on local disk and on a real S3 server (SeaweedFS)."""

import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from engagesim import io
from engagesim.config import load_config
from engagesim.loaders import ingest

REJECTS = pa.table({"source": ["s"], "row": [1], "reason": ["r"], "raw": ["{}"]})

SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    import pyarrow as pa
    from engagesim import io
    w = io.DatasetWriter(sys.argv[1], "rejects")
    t = pa.table({"source": ["s"] * 1000, "row": list(range(1000)), "reason": ["r"] * 1000, "raw": ["{}"] * 1000})
    for i in range(1000):
        w.write(t)
        print("part", i, flush=True)
        time.sleep(0.05)
    w.commit()
    """
)


def _write(uri, table=REJECTS):
    w = io.DatasetWriter(uri, "rejects")
    w.write(table)
    return w.commit()


def _kill_midway(uri, env=None):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, uri], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    for _ in range(3):  # let it write a few parts, then kill it hard
        assert proc.stdout.readline().startswith("part")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def test_uncommitted_dataset_is_refused(tmp_path):
    uri = str(tmp_path / "d")
    w = io.DatasetWriter(uri, "rejects")
    w.write(REJECTS)
    with pytest.raises(io.DatasetNotCommitted):
        io.read_table(uri)
    w.commit()
    assert io.read_table(uri).num_rows == 1


def test_killed_writer_leaves_nothing_readable(tmp_path):
    uri = str(tmp_path / "d")
    _kill_midway(uri)
    assert any(f.endswith(".parquet") for f in io.list_files(uri))  # it did write parts...
    with pytest.raises(io.DatasetNotCommitted):  # ...but no reader accepts them
        io.read_table(uri)


def test_killed_rewrite_keeps_previous_version(tmp_path):
    uri = str(tmp_path / "d")
    _write(uri)
    before = io.read_table(uri)
    _kill_midway(uri)
    assert io.read_table(uri).equals(before)


def test_rewrite_replaces_and_cleans_stale_parts(tmp_path):
    uri = str(tmp_path / "d")
    _write(uri)
    _write(uri, pa.concat_tables([REJECTS] * 3))
    assert io.read_table(uri).num_rows == 3
    assert len([f for f in io.list_files(uri) if f.endswith(".parquet")]) == 1


@pytest.mark.s3
def test_s3_ingest_reads_back_identical(adobe_dir, tmp_path, s3_bucket):
    src = str(adobe_dir / "train_caption_generated_top100.csv")
    local = ingest([src], "adobe", str(tmp_path / "local"), load_config())
    remote = ingest([src], "adobe", f"s3://{s3_bucket}/posts", load_config())
    assert (remote.read, remote.written, remote.rejected) == (local.read, local.written, local.rejected)
    assert io.read_table(f"s3://{s3_bucket}/posts").equals(io.read_table(str(tmp_path / "local")))
    assert io.exists(f"s3://{s3_bucket}/posts/_rejects/_SUCCESS")


@pytest.mark.s3
def test_s3_killed_writer_leaves_nothing_readable(s3_bucket, s3_server):
    uri = f"s3://{s3_bucket}/killed"
    _kill_midway(uri, env=s3_server)
    assert any(f.endswith(".parquet") for f in io.list_files(uri))
    with pytest.raises(io.DatasetNotCommitted):
        io.read_table(uri)


@pytest.mark.s3
def test_s3_ingest_from_s3_source(adobe_dir, s3_bucket):
    import boto3

    client = boto3.client("s3")
    client.upload_file(str(adobe_dir / "content_simulation_train_sample22.xlsx"), s3_bucket, "in/sample.xlsx")
    summary = ingest([f"s3://{s3_bucket}/in/sample.xlsx"], "adobe", f"s3://{s3_bucket}/p22", load_config())
    assert (summary.read, summary.written) == (22, 22)
