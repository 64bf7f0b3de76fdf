"""The real Adobe data through features and post-level models (chronological 80/20 split)."""

import json
import os

import pytest

from engagesim import io
from engagesim.config import load_config
from engagesim.loaders import ingest
from engagesim.pipeline.features import run_features
from engagesim.pipeline.train import train_post_level

pytestmark = pytest.mark.ray


def test_adobe_features_and_models_beat_baselines(ray_local, adobe_dir, tmp_path):
    cfg = load_config(None, [f"embed.cache_dir={tmp_path / 'cache'}", "embed.image=false", "train.models=['xgb']",
                             "train.xgb.rounds=300", "train.xgb.checkpoint_every=100"])
    posts = str(tmp_path / "posts")
    ingest([str(adobe_dir / "content_simulation_test_company.xlsx")], "adobe", posts, cfg)
    summary = run_features(cfg, posts, str(tmp_path / "features"))
    assert summary["posts"]["rows"] == 10_000 and summary["posts"]["valid_rows"] == 1_000
    assert summary["posts"]["test_rows"] == 1_000  # the latest half of the held-out 20 %
    manifest = json.load(open(os.path.join(tmp_path, "features", "features.json")))
    names = {f["name"] for f in manifest["features"]}
    assert {"te_author_id", "te_company", "secs_since_prev_post", "day_of_week", "n_video", "text_pca_0"} <= names
    result = train_post_level(cfg, io.join(str(tmp_path / "features"), "posts"), str(tmp_path / "models"))
    xgb_rmse = result["models"]["xgb"]["rmse"]
    baselines = result["baselines"]
    assert xgb_rmse < baselines["account_mean"]["rmse"] < baselines["global_mean"]["rmse"]
