"""The usual mistakes of a first hour, each ending in one line that names the problem and the fix: exit code 2,
no traceback, no directory created, Ray never started."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from engagesim import io
from engagesim.cli import app

CSV = "post_id,author_id,username,created_at,text\np1,a,u,2024-01-01,x\n"


def _cases(tmp):
    raw = tmp / "raw.csv"
    out = str(tmp / "out")
    runs = f"output_root={tmp / 'runs'}"
    return [
        ("ingest-missing-file", ["ingest", str(tmp / "nope.csv"), "--out", out], "no such file"),
        ("ingest-internal-kind", ["ingest", str(raw), "--format", "csv", "--kind", "truth_posts", "--out", out],
         "--kind must be one of posts, users, interactions"),
        ("ingest-unknown-format", ["ingest", str(raw), "--format", "excel", "--out", out], "--format must be one of"),
        ("ingest-map-to-unknown-field", ["ingest", str(raw), "--format", "csv", "--map", "x=txt", "--out", out],
         "unknown posts field(s) txt"),
        ("ingest-map-under-adobe", ["ingest", str(raw), "--map", "x=text", "--out", out],
         "--map applies to --format csv, jsonl or parquet"),
        ("ingest-bad-map-syntax", ["ingest", str(raw), "--format", "csv", "--map", "text", "--out", out],
         "expected source_column=contract_field"),
        ("ingest-a-directory", ["ingest", str(tmp), "--format", "csv", "--out", out], "not a file"),
        ("pipeline-missing-data", ["pipeline", "behaviour", "--data", str(tmp / "nope.csv"), "--set", runs],
         "no such file"),
        ("pipeline-glob-matches-nothing", ["pipeline", "behaviour", "--data", str(tmp / "none*.csv"), "--set", runs],
         "no such file"),
        ("eda-on-a-raw-csv", ["report", "eda", str(raw), "--out", out], "is a file, not a dataset: ingest it first"),
        ("eda-on-nothing", ["report", "eda", str(tmp / "nothing"), "--out", out], "no such dataset"),
        ("evaluate-not-a-run", ["evaluate", str(tmp)], "is not a run directory"),
        ("score-not-a-run", ["score", "--run", str(tmp), "--in", str(raw), "--out", out], "is not a run directory"),
        ("serve-not-a-run", ["serve", "--run", str(tmp / "nope")], "is not a run directory"),
    ]


CASE_IDS = [c[0] for c in _cases(__import__("pathlib").Path("/nonexistent"))]


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_a_mistake_is_one_line_and_exit_2(index, tmp_path, monkeypatch):
    import ray

    def no_ray(*_, **__):
        raise AssertionError("Ray was started for a mistake the inputs already show")

    # ray.init itself (looked up at call time): patching engagesim.runtime.ensure_ray would stay bound in
    # modules that import it by name during the test, and leak into later tests.
    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("ENGAGESIM_API_KEYS", "k" * 32)
    (tmp_path / "raw.csv").write_text(CSV)
    name, args, message = _cases(tmp_path)[index]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output or run directory was made


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(app, ["--debug", "evaluate", str(tmp_path)])
    assert result.exit_code != 0 and isinstance(result.exception, FileNotFoundError)


def test_a_busy_output_names_its_holder(tmp_path):
    (tmp_path / "raw.csv").write_text(CSV)
    out = str(tmp_path / "out")
    with io.output_lock(out, what="another engagesim ingest"):
        result = CliRunner().invoke(app, ["ingest", str(tmp_path / "raw.csv"), "--format", "csv", "--out", out])
    assert result.exit_code == 2 and "is being written by another engagesim ingest (pid" in result.output


def test_version():
    from engagesim import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"engagesim {__version__}"


@pytest.mark.parametrize("args", [["pipeline", "content"], ["generate", "--run", "x", "--account", "a", "--time", "2021-03-05T18:00"]])
def test_content_without_its_extra_names_the_install(args, tmp_path, monkeypatch):
    """The behaviour job needs none of the content packages; a content command without them is one line with
    the pip command, before any config is read or directory made."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else find_spec(name, *a))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "diffusers not installed" in lines[0] and "pip install 'engagesim[content]'" in lines[0]
    assert not any(tmp_path.iterdir())
