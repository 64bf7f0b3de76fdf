"""The command line as a user runs it: subprocesses, --json last lines, reports on disk."""

import json

from helpers import run_cli


def _last_json(proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_teaches():
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "ingest" in proc.stdout and "report" in proc.stdout


def test_ingest_json_and_eda_report(adobe_dir, tmp_path):
    out = tmp_path / "adobe"
    result = _last_json(run_cli("ingest", str(adobe_dir / "content_simulation_test_company.xlsx"),
                                "--format", "adobe", "--out", str(out), "--json"))
    assert result == {"read": 10000, "written": 10000, "rejected": 0, "out": str(out)}
    report = _last_json(run_cli("report", "eda", str(out), "--out", str(tmp_path / "eda"), "--json"))
    for plot in ("likes_distribution.png", "likes_by_weekday_hour.png", "top_accounts.png", "media_kinds.png"):
        assert (tmp_path / "eda" / plot).stat().st_size > 5000
        assert plot in (tmp_path / "eda" / "index.html").read_text()
    assert report["posts"] == 10000 and report["accounts"] == 811
    assert 2.3 < report["std_log1p_likes"] < 2.6  # the heavy tail the data README measured (≈ 2.45)


def test_generic_csv_with_mapping(tmp_path):
    src = tmp_path / "users.csv"
    src.write_text("uid,followers,following,blue,joined\nu1,10,5,true,2020-01-01\nu2,-1,5,false,2020-01-02\nu3,7,1,maybe,2020-01-03\n")
    out = tmp_path / "users"
    result = _last_json(run_cli(
        "ingest", str(src), "--format", "csv", "--kind", "users", "--out", str(out), "--json",
        "--map", "uid=user_id", "--map", "followers=follower_count", "--map", "following=following_count",
        "--map", "blue=verified", "--map", "joined=created_at",
    ))
    assert (result["read"], result["written"], result["rejected"]) == (3, 1, 2)


def test_config_error_names_the_key(tmp_path):
    bad = tmp_path / ("a-long-directory-name-" * 6) / "bad.yaml"  # past 80 columns: still one line, never wrapped
    bad.parent.mkdir()
    bad.write_text("ingest:\n  max_text_charz: 3\n")
    proc = run_cli("ingest", "x.csv", "--out", str(tmp_path / "o"), "--config", str(bad))
    assert proc.returncode == 2
    assert f"{bad}: ingest.max_text_charz: unknown key" in proc.stderr.splitlines()
