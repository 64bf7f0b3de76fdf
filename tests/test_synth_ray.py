"""Generating a world on Ray: determinism across worker counts, contracts, oracle, reports."""

import json

import pytest
from helpers import run_cli

from engagesim import io
from engagesim.config import SynthConfig
from engagesim.report import eda
from engagesim.schema import SCHEMAS, validate
from engagesim.synth import generate

pytestmark = pytest.mark.ray

SMALL = dict(users=600, posts=2500, impressions=60_000, images=12, rows_per_shard=20_000, seed=11)


def _part_bytes(out):
    names = ("users", "posts", "interactions", "truth/posts", "truth/interactions")
    files = [f for name in names for f in io.dataset_files(io.join(out, name))] + io.list_files(io.join(out, "media"))
    return {f.replace(out, ""): open(f, "rb").read() for f in files}


@pytest.fixture(scope="module")
def world_dirs(ray_local, tmp_path_factory):
    """The same world generated twice at the same path (media URIs are absolute), with 1 and 2 workers."""
    base = tmp_path_factory.mktemp("worlds")
    s1 = generate(SynthConfig(**SMALL, workers=1), str(base / "world"))
    (base / "world").rename(base / "one")
    s2 = generate(SynthConfig(**SMALL, workers=2), str(base / "world"))
    return str(base / "one"), str(base / "world"), s1, s2


def test_same_seed_any_workers_identical_bytes(world_dirs):
    one, two, _, _ = world_dirs
    a, b = _part_bytes(one), _part_bytes(two)
    assert len([k for k in a if "interactions" in k and "truth" not in k]) == 3  # several shards, several files
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    media = [k for k in a if k.endswith(".png")]
    assert len(media) == 12 and all(a[k][:8] == b"\x89PNG\r\n\x1a\n" for k in media)


def test_outputs_conform_to_contracts(world_dirs):
    _, one, _, summary = world_dirs
    for kind in ("users", "posts", "interactions"):
        table = io.read_table(io.join(one, kind))
        assert table.schema.equals(SCHEMAS[kind])
        valid, rejects = validate(table, kind, "synth")
        assert rejects.num_rows == 0
    assert summary["rows"] == {"users": 600, "posts": 2500, "interactions": 60_000, "images": 12}
    posts = io.read_table(io.join(one, "posts")).to_pylist()
    drawn = [m["uri"] for p in posts for m in p["media"] if m["uri"].endswith(".png")]
    assert len(drawn) == 12 and all(io.exists(u) for u in drawn)


def test_oracle_metrics_reported(world_dirs):
    _, _, summary, _ = world_dirs
    oracle = summary["oracle"]
    assert 0.5 < oracle["rmse_log1p_likes"] < 0.8
    for e, lo in (("like", 30), ("retweet", 20), ("reply", 10), ("quote", 5)):
        assert oracle[e]["rce"] > lo
        assert oracle[e]["ap"] > oracle[e]["rate"]  # better than random ranking
        assert len(oracle[e]["rce_by_popularity"]) == 6


def test_eda_on_synthetic_posts(world_dirs, tmp_path):
    one, _, _, _ = world_dirs
    summary = eda(io.join(one, "posts"), str(tmp_path))
    assert (tmp_path / "likes_by_weekday_hour.png").exists()
    assert summary["posts"] == 2500 and summary["media_items"]["photo"] > 0


def test_cli_synth_json(tmp_path):
    proc = run_cli("synth", "--out", str(tmp_path / "w"), "--users", "300", "--posts", "800",
                   "--impressions", "20000", "--images", "5", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["users"], result["posts"], result["interactions"], result["images"]) == (300, 800, 20000, 5)
    assert set(result["oracle"]) == {"rmse_log1p_likes", "like", "reply", "retweet", "quote"}
    assert result["oracle"]["like"]["rce"] > 0
