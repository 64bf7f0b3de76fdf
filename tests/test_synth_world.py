"""The synthetic world's generative model, without Ray: realistic where the papers describe reality."""

import numpy as np
import polars as pl
import pytest

from engagesim.config import SynthConfig
from engagesim.schema import validate
from engagesim.synth import rows
from engagesim.synth.images import draw_image
from engagesim.synth.world import build_world, rng_for


@pytest.fixture(scope="module")
def world():
    return build_world(SynthConfig(users=5000, posts=20000, impressions=0, images=100, seed=3))


@pytest.fixture(scope="module")
def impressions(world):
    return rows.interactions_tables(world, 200_000, rng_for(3, 4, 0))


def test_engagement_rates_near_recsys_2021(impressions):
    inter, _, _ = impressions
    rates = {e: inter.column(f"{e}_at").is_valid().to_numpy(zero_copy_only=False).mean()
             for e in ("like", "reply", "retweet", "quote")}
    assert 0.36 < rates["like"] < 0.44
    assert 0.085 < rates["retweet"] < 0.115
    assert 0.022 < rates["reply"] < 0.038
    assert 0.006 < rates["quote"] < 0.014


def test_popularity_changes_engagement(impressions, world):
    inter, truth, _ = impressions
    df = pl.from_arrow(truth.select(["p_like", "p_reply", "popularity_group"]))
    by = df.group_by("popularity_group").agg(pl.col("p_like").mean(), pl.col("p_reply").mean()).sort("popularity_group")
    assert by["p_like"][-1] > by["p_like"][0] + 0.03  # popular authors get more likes...
    assert by["p_reply"][-1] < by["p_reply"][0]  # ...and fewer replies per impression


def test_truth_is_consistent_with_labels(impressions):
    inter, truth, _ = impressions
    p = truth.column("p_like").to_numpy()
    y = inter.column("like_at").is_valid().to_numpy(zero_copy_only=False)
    for lo, hi in [(0.0, 0.2), (0.4, 0.6), (0.8, 1.0)]:
        m = (p >= lo) & (p < hi)
        assert abs(y[m].mean() - p[m].mean()) < 0.02  # calibrated truth


def test_posts_heavy_tailed_account_dominated_weekday(world):
    posts, truth = rows.posts_tables(world, 0, world.n_posts, rng_for(3, 2, 0), "/tmp/media")
    valid, rejects = validate(posts, "posts", "synth")
    assert rejects.num_rows == 0
    df = pl.from_arrow(posts.select(["author_id", "likes", "created_at"])).with_columns(
        pl.col("likes").log1p().alias("l"), pl.col("created_at").dt.weekday().alias("wd"))
    assert 2.3 < df["l"].std() < 2.8
    account_mean = df.group_by("author_id").agg(pl.col("l").mean().alias("m"))
    joined = df.join(account_mean, on="author_id")
    r2 = 1 - ((joined["l"] - joined["m"]) ** 2).mean() / joined["l"].var()
    assert r2 > 0.6  # the account effect dominates, as in the Adobe data
    weekday = df.filter(pl.col("wd") <= 5)["l"].mean()
    weekend = df.filter(pl.col("wd") > 5)["l"].mean()
    assert weekday > weekend
    counts = df.group_by("wd").len().sort("wd")["len"]
    assert counts[5] < counts[1] and counts[6] < counts[2]  # fewer posts at weekends
    expected = truth.column("expected_log1p_likes").to_numpy()
    assert np.sqrt(np.mean((expected - df["l"].to_numpy()) ** 2)) < 0.8


def test_text_has_the_parts_features_need(world):
    posts, _ = rows.posts_tables(world, 0, 2000, rng_for(3, 2, 0), "/tmp/media")
    texts = posts.column("text").to_pylist()
    assert sum("#" in t for t in texts) > 500
    assert sum("https://" in t for t in texts) > 400
    assert sum("@" in t for t in texts) > 200
    assert sum("?" in t for t in texts) > 150
    assert len(set(posts.column("language").to_pylist())) >= 5
    kinds = {m["kind"] for ms in posts.column("media").to_pylist() for m in ms}
    assert kinds == {"photo", "video", "gif"}
    assert posts.column("company").null_count < posts.num_rows


def test_image_pixels_follow_latents():
    rng = np.random.default_rng(0)
    props = rng.random((60, 5))
    imgs = [draw_image(p, 64, np.random.default_rng(i)).astype(float) for i, p in enumerate(props)]
    brightness = np.array([im.mean() for im in imgs])
    contrast = np.array([im.mean(axis=2).std() for im in imgs])
    assert np.corrcoef(brightness, props[:, 0])[0, 1] > 0.9
    assert np.corrcoef(contrast, props[:, 1])[0, 1] > 0.7


def test_follow_graph_prefers_communities(world):
    users = np.arange(world.n_users).repeat(20)
    creators = np.tile(world.authors[:20], world.n_users)
    follows = world.follows(users, creators)
    same = world.community[users] == world.community[creators]
    assert follows[same].mean() > 2 * follows[~same].mean()
    assert (world.follows(users, creators) == follows).all()  # a fixed graph, not a coin per impression
