"""An ingest never loses what an earlier run committed: failed re-runs, killed runs and concurrent writers,
on a local disk and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import threading

import pytest
from helpers import venv_bin
from test_recsys import LINES, line

from engagesim import io
from engagesim.config import load_config
from engagesim.errors import UserError
from engagesim.loaders.ingest import ingest

HEADER = "post_id,author_id,username,created_at,likes,text\n"


def _csv(path, ids, prefix="p") -> str:
    rows = "".join(f"{prefix}{i},a{i % 7},u{i % 7},2024-01-{1 + i % 28:02d}T10:00:00Z,{i},post {i}\n" for i in ids)
    path.write_text(HEADER + rows)
    return str(path)


def _truncated_gz(path, ids) -> str:
    """A download cut short: the gzip stream ends mid-way (readers fail after some rows)."""
    data = gzip.compress((HEADER + "".join(f"t{i},a,u,2024-01-01,1,x{i}\n" for i in ids)).encode())
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _snapshot(uri: str) -> dict[str, bytes]:
    """Every object under ``uri`` (locks excluded: they are the live run's), byte for byte."""
    prefix = "s3://" if io.is_s3(uri) else ""
    return {f: io.read_bytes(prefix + f) for f in io.list_files(uri) if f"/{io.LOCKS_DIR}/" not in f}


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('s3_bucket')}/store"


def test_failed_rerun_leaves_the_committed_dataset_byte_identical(root, tmp_path):
    out, cfg = io.join(root, "posts"), load_config()
    first = ingest([_csv(tmp_path / "a.csv", range(20))], "csv", out, cfg)
    before = _snapshot(out)
    with pytest.raises(UserError, match=r"b\.csv\.gz could not be read"):
        ingest([_csv(tmp_path / "b.csv", range(100, 107), "q"), _truncated_gz(tmp_path / "b.csv.gz", range(5000))],
               "csv", out, cfg)
    assert _snapshot(out) == before  # no part, manifest or reject of run B is left
    assert io.read_table(out).num_rows == first.written == 20


def test_crash_between_the_two_commits_publishes_neither(root, tmp_path, monkeypatch):
    """The rejects manifest commits first but names the data manifest as its owner: until the data commits
    with the same run token, a reader refuses the new rejects instead of pairing them with the old data."""
    out, cfg = io.join(root, "posts"), load_config()
    ingest([_csv(tmp_path / "a.csv", range(20))], "csv", out, cfg)
    old = io.read_table(out)
    real = io.DatasetWriter.commit

    def crash_on_the_data(self, *args, **kwargs):
        if self.uri == out:
            raise KeyboardInterrupt("killed between the two commits")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(io.DatasetWriter, "commit", crash_on_the_data)
    bad = tmp_path / "b.csv"
    bad.write_text(HEADER + "q1,a,u,2024-01-01,1,x\nq2,a,u,not a date,1,y\n")
    with pytest.raises(KeyboardInterrupt):
        ingest([str(bad)], "csv", out, cfg)
    assert io.read_table(out).equals(old)
    with pytest.raises(io.DatasetNotCommitted, match="run that did not commit"):
        io.read_table(io.join(out, io.REJECTS_DIR))
    monkeypatch.setattr(io.DatasetWriter, "commit", real)
    ingest([str(bad)], "csv", out, cfg)  # the re-run makes both whole again
    assert io.read_table(out).num_rows == 1 and io.read_table(io.join(out, io.REJECTS_DIR)).num_rows == 1


def test_a_held_output_is_refused_with_the_holder_named(root, tmp_path):
    out, cfg = io.join(root, "posts"), load_config()
    src = _csv(tmp_path / "a.csv", range(5))
    with io.output_lock(out, cfg.storage, what="engagesim ingest (test)"):
        with pytest.raises(io.OutputBusy, match=rf"being written by engagesim ingest \(test\) \(pid {os.getpid()}"):
            ingest([src], "csv", out, cfg)
    assert ingest([src], "csv", out, cfg).written == 5  # released: the next run goes ahead
    assert not [f for f in io.list_files(out) if f"/{io.LOCKS_DIR}/" in f]


def test_a_dead_holders_lock_is_cleared(tmp_path):
    out = str(tmp_path / "posts")
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    io.write_json(io.join(out, io.LOCKS_DIR, "dead.json"),
                  {"what": "a killed ingest", "host": socket.gethostname(), "pid": int(proc.stdout)})
    assert ingest([_csv(tmp_path / "a.csv", range(5))], "csv", out, load_config()).written == 5


def test_concurrent_writers_end_with_one_consistent_dataset(root, tmp_path):
    """Two ingests into one --out at once: each either commits whole or is refused; the dataset left is
    exactly one of the two inputs, readable, with its own rejects."""
    out, cfg = io.join(root, "posts"), load_config()
    sources = {"a": (_csv(tmp_path / "a.csv", range(30_000)), 30_000), "b": (_csv(tmp_path / "b.csv", range(7), "q"), 7)}
    outcome: dict[str, str] = {}
    barrier = threading.Barrier(2)

    def run(name):
        barrier.wait()
        try:
            ingest([sources[name][0]], "csv", out, cfg)
            outcome[name] = "committed"
        except io.OutputBusy:
            outcome[name] = "refused"

    threads = [threading.Thread(target=run, args=(n,)) for n in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(outcome) == {"a", "b"} and "committed" in outcome.values()
    assert io.read_table(out).num_rows in {sources[n][1] for n, o in outcome.items() if o == "committed"}
    assert io.read_table(io.join(out, io.REJECTS_DIR)).num_rows == 0
    # only the committed run's parts remain: nothing of the refused one, nothing half-cleaned
    parts = [f for f in io.list_files(out) if f.endswith(".parquet") and f"/{io.REJECTS_DIR}/" not in f]
    assert sorted(os.path.basename(p) for p in parts) == io.read_manifest(out)["files"]


def test_two_cli_ingests_at_once_never_both_write(tmp_path):
    """As a user would do it: two `engagesim ingest` processes into one --out."""
    out = str(tmp_path / "posts")
    big = _csv(tmp_path / "big.csv", range(60_000))
    small = _csv(tmp_path / "small.csv", range(9), "q")
    procs = [subprocess.Popen([venv_bin("engagesim"), "ingest", src, "--format", "csv", "--out", out, "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for src in (big, small)]
    results = [(p.wait(300), p.stdout.read(), p.stderr.read()) for p in procs]
    for code, _, stderr in results:
        assert code in (0, 2), stderr
        if code == 2:
            assert "is being written by" in stderr and "Traceback" not in stderr
    committed = [n for (code, _, _), n in zip(results, (60_000, 9)) if code == 0]
    assert committed and io.read_table(out).num_rows in committed


# --- RecSys: four datasets per run, staged on the way -------------------------------------------------

def _log(path, lines) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _recsys_tree(out: str) -> dict[str, bytes]:
    return {k: v for k, v in _snapshot(out).items() if "/_staging/" not in k}


@pytest.mark.ray
def test_recsys_failed_rerun_leaves_every_dataset_byte_identical(ray_local, tmp_path):
    from engagesim.loaders.recsys_ingest import ingest_recsys

    out, cfg = str(tmp_path / "logs"), load_config()
    ingest_recsys([_log(tmp_path / "a.tsv", LINES)], out, cfg, chunk_lines=3)
    before = _snapshot(out)
    cut = gzip.compress(("\n".join(line(tweet=f"z{i}", user=f"v{i}") for i in range(4000)) + "\n").encode())
    (tmp_path / "cut.tsv.gz").write_bytes(cut[: len(cut) // 2])
    good_b = _log(tmp_path / "b.tsv", [line(tweet=f"b{i}", user=f"w{i}") for i in range(7)])
    with pytest.raises(UserError, match=r"cut\.tsv\.gz could not be read to its end"):
        ingest_recsys([good_b, str(tmp_path / "cut.tsv.gz")], out, cfg, chunk_lines=3)
    assert _snapshot(out) == before  # interactions, posts, post_meta, users and rejects: all untouched
    assert not io.exists(io.join(out, "_staging"))


@pytest.mark.ray
def test_recsys_killed_runs_leftovers_never_reach_the_next_run(ray_local, tmp_path):
    """A run killed after staging (its buckets and parts still on disk) must not leak into the next one."""
    import pyarrow as pa

    from engagesim.loaders.recsys_ingest import ingest_recsys

    out, cfg = str(tmp_path / "logs"), load_config()
    extra = pa.table({"post_id": ["ghost1", "ghost2"]})
    io.write_named_part(io.join(out, "_staging", "deadrun", "posts", "b0000"), "part-deadrun-f00000-c00000.parquet",
                        extra, "staging_posts")
    io.write_named_part(io.join(out, "interactions"), "part-deadrun-f00000-c00000.parquet", extra, "leftover")
    summary = ingest_recsys([_log(tmp_path / "a.tsv", LINES)], out, cfg, chunk_lines=3)
    assert (summary["read"], summary["written"], summary["posts"], summary["users"]) == (8, 4, 3, 4)
    assert "ghost1" not in io.read_table(io.join(out, "posts")).column("post_id").to_pylist()
    assert not io.exists(io.join(out, "_staging"))
    assert not [f for f in io.list_files(io.join(out, "interactions")) if "deadrun" in f]
    for name, rows in (("posts", 3), ("users", 4), ("post_meta", 3)):
        manifest = io.read_manifest(io.join(out, name))
        # every dataset's own count check: staged = written + deduplicated
        assert manifest["rows"] == rows and manifest["staged"] == rows + manifest["deduplicated"]
        assert manifest["run"] == io.read_manifest(io.join(out, "interactions"))["run"]


@pytest.mark.s3
def test_recsys_failed_rerun_on_s3_from_the_cli(s3_server, s3_bucket, tmp_path):
    """The RecSys job on S3 (its own process and embedded Ray, whose workers get the S3 settings)."""
    out = f"s3://{s3_bucket}/logs"
    import tempfile

    env = {**os.environ, **s3_server, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ri", dir="/tmp")}  # short socket paths
    cmd = [venv_bin("engagesim"), "ingest", "--format", "recsys2021", "--out", out]
    first = subprocess.run([*cmd, _log(tmp_path / "a.tsv", LINES)], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _snapshot(out)
    cut = gzip.compress(("\n".join(line(tweet=f"z{i}") for i in range(4000)) + "\n").encode())
    (tmp_path / "cut.tsv.gz").write_bytes(cut[: len(cut) // 2])
    second = subprocess.run([*cmd, _log(tmp_path / "b.tsv", [line(tweet="b1")]), str(tmp_path / "cut.tsv.gz")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and "cut.tsv.gz could not be read to its end" in second.stderr
    assert "Traceback" not in second.stderr
    assert _snapshot(out) == before


def test_the_lock_survives_its_folder_vanishing_under_the_write(tmp_path, monkeypatch):
    """A writer that just finished removes the empty _locks folder; another writer's lock write in that instant
    found no folder (CI, 2026-12-05: FileNotFoundError killed the ingest). The write is retried."""
    real, calls = io.write_json, []

    def flaky(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 1:
            raise FileNotFoundError("the folder went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(io, "write_json", flaky)
    with io.output_lock(str(tmp_path / "out")):
        assert len(calls) == 2 and os.path.exists(calls[1].replace("file://", ""))
