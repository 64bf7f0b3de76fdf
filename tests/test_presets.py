"""Every recipe preset runs end to end on a tiny world, and the comparison report reads the runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engagesim.config import ConfigError, data_overrides, load_config, preset_names

TINY = ["synth.users=200", "synth.posts=500", "synth.impressions=6000", "synth.images=10", "synth.days=5",
        "synth.rows_per_shard=6000", "synth.seed=3", "features.valid_hours=24", "embed.pca_components=4",
        "embed.text_model=tiny:bert", "embed.image_model=tiny:clip", "train.xgb.rounds=15",
        "train.xgb.checkpoint_every=15", "train.nn.epochs=1", "train.nn.width=64",
        "content.llm.model=tiny:llama", "content.llm.max_steps=2", "content.llm.eval_examples=2",
        "content.llm.max_length=96", "content.captions.model=tiny:blip", "train.slm.encoder=tiny:bert",
        "train.slm.max_rows=1000", "train.slm.max_length=24", "train.slm.epochs=1",
        # MLM adaptation and distillation run in tests/test_slm.py; here the recipe's SLM only.
        "train.slm.mlm_steps=0", "train.slm.distill_layers=0"]


def test_every_preset_is_valid_and_says_how_it_differs_from_its_paper():
    names = preset_names()
    assert {"adobe_team83", "adobe_team83_content", "layer6_recsys2021", "synerise_recsys2021", "smp2019",
            "okboomer"} <= set(names)
    for name in names:
        cfg = load_config(None, preset=name)
        assert cfg.preset.name == name and cfg.preset.paper and cfg.preset.metric
        assert cfg.preset.differences, f"{name}: state what differs from the paper"


def test_presets_override_only_what_their_paper_specifies():
    base = load_config("configs/local.yaml")
    layer6 = load_config("configs/local.yaml", preset="layer6_recsys2021")
    assert layer6.train.xgb.preset == "layer6" and layer6.train.models == ["xgb", "nn", "slm"]
    assert layer6.synth == base.synth and layer6.train.xgb.rounds == base.train.xgb.rounds  # the rest: base config
    # LAYER6's own NN widths, where the default is a smaller net
    assert layer6.train.nn.hidden is None and base.train.nn.hidden == [256, 128, 64]
    override = load_config("configs/local.yaml", ["train.xgb.rounds=7"], preset="layer6_recsys2021")
    assert override.train.xgb.rounds == 7  # --set wins over the preset
    with pytest.raises(ConfigError, match="known presets"):
        load_config(None, preset="layer7")


def test_data_option_tells_the_input_kind_from_the_file_names():
    assert data_overrides("synth") == ["data.source=synth"]
    assert data_overrides("a.csv,b.xlsx")[0] == "data.source=adobe"
    assert data_overrides("day1.tsv.gz")[0] == "data.source=recsys"
    assert data_overrides("s3://bucket/posts")[0] == "data.source=posts"
    with pytest.raises(ConfigError, match="mixes"):
        data_overrides("a.csv,b.tsv")


BEHAVIOUR = ["adobe_team83", "layer6_recsys2021", "synerise_recsys2021", "smp2019"]


@pytest.fixture(scope="module")
def preset_runs(ray_local, behaviour_run, tmp_path_factory):
    """Each preset once on the tiny world (content presets rank with the shared behaviour run)."""
    from engagesim.pipeline import behaviour, content

    root = tmp_path_factory.mktemp("presets")
    runs = {}
    for name in BEHAVIOUR + ["adobe_team83_content", "okboomer"]:
        overrides = ["data.source=synth", f"output_root={root}", f"embed.cache_dir={root / 'cache'}", *TINY,
                     f"content.behaviour_run={behaviour_run.uri}"]
        cfg = load_config(None, overrides, preset=name)
        job = behaviour if cfg.preset.task == "behaviour" else content
        runs[name] = job.run(cfg, name, log=lambda _: None).uri
    return runs


@pytest.mark.ray
@pytest.mark.parametrize("name", BEHAVIOUR + ["adobe_team83_content", "okboomer"])
def test_preset_runs_end_to_end_on_a_tiny_world(preset_runs, name):
    manifest = json.loads(Path(preset_runs[name], "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["config"]["preset"]["name"] == name
    metrics = manifest["metrics"]
    if manifest["config"]["preset"]["task"] == "behaviour":
        assert metrics["test"]["post_level"]["models"]["ensemble"]["rmse"] > 0
        if manifest["config"]["train"]["impression_level"]:
            train = manifest["config"]["train"]
            trained = set(train["models"]) - {"knn", "stacked_mlp"}
            if "slm" in trained and train["slm"]["distill_layers"]:
                trained.add("slm_distilled")
            assert set(metrics["test"]["impression_level"]["models"]) == trained | {"ensemble"}
        else:  # a post-level recipe: no impression features, no impression models
            assert "train_impression_level" not in manifest["stages"] and not metrics["test"]["impression_level"]
    elif name == "okboomer":
        assert set(manifest["stages"]) == {"data", "captions", "hashtags"}  # the paper's task only
        assert metrics["hashtags"]["model@3"]["posts"] > 0
    else:
        assert {"llm", "hashtags", "images", "behaviour"} <= set(manifest["stages"])
        assert metrics["llm"]["valid_loss_after"] < metrics["llm"]["valid_loss_before"] + 1e-6


@pytest.mark.ray
def test_report_compare_tables_every_run_with_measured_costs(preset_runs, tmp_path):
    from engagesim.compare import compare

    result = compare([preset_runs[n] for n in ("layer6_recsys2021", "smp2019", "okboomer")], str(tmp_path))
    records = {r["preset"]: r for r in result["records"]}
    assert records["layer6_recsys2021"]["rce_like"] == pytest.approx(json.loads(
        Path(preset_runs["layer6_recsys2021"], "manifest.json").read_text())["metrics"]["test"][
        "impression_level"]["models"]["ensemble"]["like"]["rce"])
    assert records["smp2019"]["rows_per_s"] > 0 and records["smp2019"]["latency_ms"] > 0
    assert records["okboomer"]["hashtag_bleu"] is not None and "rows_per_s" not in records["okboomer"]
    table = Path(result["table"]).read_text()
    assert records["okboomer"]["hashtag_k"] == 3  # content.hashtags.k: the P@k row is at this k
    assert "| RCE like |" in table and "oracle RCE like" in table and "| hashtag P@k |" in table
    assert all(Path(p).stat().st_size > 0 for p in result["plots"])
