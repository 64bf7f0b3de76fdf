"""Every registered model family, at every level it supports, keeps one contract (PEFT's common-tester shape):
fit on a tiny table → save → load → identical predictions; finite outputs of the level's shape; no rows in →
no rows out; the bundle serves what the member evaluated. And a family registered from outside (here, from
this test module) trains, saves, loads, serves and is reported with no edit to engagesim."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from helpers import TINY_WORLD, run_root

from engagesim import io
from engagesim.config import load_config
from engagesim.models.bundle import MAX_LOG1P_LIKES, ImpressionModels, PostModels
from engagesim.models.family import (
    FAMILIES,
    IMPRESSION,
    LEVELS,
    POST,
    Family,
    FitContext,
    Member,
    family_names,
    get_family,
    register_family,
)

pytestmark = pytest.mark.ray

N, DIM = 600, 8
TINY = ["train.xgb.rounds=8", "train.xgb.checkpoint_every=4", "train.xgb.cpus_per_worker=1", "train.nn.epochs=1",
        "train.nn.batch_size=128", "train.knn.k=5", "train.slm.encoder=tiny:bert", "train.slm.epochs=1",
        "train.slm.max_length=12", "train.slm.hidden=[8]", "train.slm.batch_size=64", "train.slm.distill_layers=1",
        "train.slm.cpus_per_worker=1"]


def _table(level, seed: int) -> pa.Table:
    """A feature table of the level's shape: numeric features, labels, the columns families read."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 5)).astype(np.float32)
    start = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    when = [start + dt.timedelta(minutes=i) for i in range(N)]
    words = np.array(["launch", "sale", "today", "#new", "team", "win", "hello"])
    texts = [" ".join(rng.choice(words, 4)) for _ in range(N)]
    cols: dict = {f"f{i}": x[:, i] for i in range(5)}
    signal = 2 * x[:, 0] - x[:, 1]
    cols["split"] = ["train"] * (N * 3 // 4) + ["valid"] * (N - N * 3 // 4)
    cols["author_id"] = [f"a{i % 20}" for i in range(N)]
    if level is POST:
        cols.update(label_log1p_likes=(3 + signal + rng.normal(0, 0.3, N)).astype(np.float32),
                    created_at=pa.array(when, pa.timestamp("us", tz="UTC")), text=texts)
        vectors = rng.normal(size=(N, DIM)).astype(np.float32)
        cols["text_emb"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM)
        author = np.arange(N) % 20  # an account's mean label, as the post state's apply-mode encoding gives it
        means = np.bincount(author, cols["label_log1p_likes"]) / np.bincount(author)
        cols["te_author_id"] = means[author].astype(np.float32)
    else:
        for k, label in enumerate(IMPRESSION.labels):
            p = 1 / (1 + np.exp(-(signal - 1 - k)))
            cols[label] = (rng.random(N) < p).astype(np.int8)
        cols.update(impression_at=pa.array(when, pa.timestamp("us", tz="UTC")), post_text=texts,
                    creator_follower_count=rng.integers(1, 10_000, N), user_id=[f"u{i}" for i in range(N)])
    return pa.table(cols)


def _features(table: pa.Table) -> list[str]:
    from engagesim.models.data import feature_columns

    return feature_columns(table.schema)


def _split(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    cut = N * 3 // 4
    return table.slice(0, cut), table.slice(cut)


CASES = [(name, level) for name in family_names() for level in get_family(name).levels]


@pytest.fixture(scope="module")
def fitted(ray_local, tmp_path_factory):
    """(family, level) → (members, models folder, validation rows); required families fit first."""
    cfg = load_config(None, TINY)
    root = tmp_path_factory.mktemp("families")
    cache: dict = {}

    def fit(name: str, level_name: str):
        if (name, level_name) in cache:
            return cache[(name, level_name)][:3]
        level, family = LEVELS[level_name], get_family(name)
        upstream = {}
        for required in family.requires:
            members, _, valid = fit(required, level_name)
            upstream.update({m.name: np.asarray(m.predict(valid, upstream)).reshape(valid.num_rows, -1)
                             for m in members})
        train, valid = _split(_table(level, seed=1))
        ctx = FitContext(cfg, str(root / level_name), str(root / "ray"))
        members = family.fit(level, train, valid, _features(train), ctx)
        for m in members:
            m.save(ctx.out_dir)
        cache[(name, level_name)] = (members, ctx.out_dir, valid, upstream)
        return cache[(name, level_name)][:3]

    def get(name: str, level_name: str):
        fit(name, level_name)
        return cache[(name, level_name)]

    return get


@pytest.mark.parametrize(("name", "level_name"), CASES, ids=[f"{n}-{lv}" for n, lv in CASES])
def test_family_contract(fitted, name, level_name):
    level, family = LEVELS[level_name], get_family(name)
    members, directory, valid, upstream = fitted(name, level_name)
    assert members, f"{name} made no member at {level_name} level"
    assert {m.name for m in members} <= set(family.members())
    for member in members:
        p = np.asarray(member.predict(valid, upstream)).reshape(valid.num_rows, -1)
        assert p.shape == (valid.num_rows, len(level.outputs)) and np.isfinite(p).all()
        if level.task == "binary":
            assert ((p >= 0) & (p <= 1)).all()
        again = family.load(directory, level, member.name)
        assert again is not None and again.name == member.name
        np.testing.assert_array_equal(np.asarray(again.predict(valid, upstream)).reshape(p.shape), p)
        empty = np.asarray(again.predict(valid.slice(0, 0), {k: v[:0] for k, v in upstream.items()}))
        assert empty.size == 0
        # served = evaluated: the run's bundle (discovering members from their files) predicts the same.
        bundle = (PostModels if level is POST else ImpressionModels)(directory)
        served = bundle.predict(valid)
        if member.name in served:  # post level serves log1p(likes) clipped to a count's range
            expected = np.clip(p, 0, MAX_LOG1P_LIKES) if level is POST else p
            np.testing.assert_allclose(np.asarray(served[member.name]).reshape(p.shape), expected, rtol=1e-6,
                                       atol=1e-6)
    assert family.load(str(directory) + "-missing", level, members[0].name) is None


# --- a family from outside engagesim --------------------------------------------------------------

class AuthorMean(Member):
    """Predicts each author's training mean of log1p(likes) (the global mean for unseen authors)."""

    name = "author_mean"

    def __init__(self, means: dict[str, float], prior: float):
        self.means, self.prior = means, prior

    def predict(self, table: pa.Table, upstream: dict) -> np.ndarray:
        authors = table.column("author_id").to_pylist()
        return np.array([self.means.get(a, self.prior) for a in authors], dtype=np.float32)[:, None]

    def save(self, directory: str) -> None:
        io.write_json(io.join(directory, "author_mean.json"), {"means": self.means, "prior": self.prior})


class AuthorMeanFamily(Family):
    name = "author_mean"
    levels = ("post",)

    def fit(self, level, train, valid, features, ctx) -> list[Member]:
        frame = pl.DataFrame({"a": train.column("author_id").to_pylist(),
                              "y": train.column(level.labels[0]).to_numpy()})
        means = dict(frame.group_by("a").agg(pl.col("y").mean()).iter_rows())
        ctx.info["author_mean_accounts"] = len(means)
        return [AuthorMean(means, float(frame["y"].mean()))]

    def load(self, directory, level, member):
        path = io.join(directory, "author_mean.json")
        if not io.exists(path):
            return None
        saved = io.read_json(path)
        return AuthorMean(saved["means"], saved["prior"])


@pytest.fixture()
def toy_family():
    register_family(AuthorMeanFamily)
    try:
        yield
    finally:
        FAMILIES.pop("author_mean", None)


def test_a_family_registered_outside_trains_serves_and_is_reported(toy_family, ray_local, tmp_path):
    import json
    import os

    import engagesim
    from engagesim.pipeline import behaviour

    cfg = load_config(None, [*run_root(tmp_path), *TINY_WORLD, "features.valid_hours=24", "embed.text=false",
                             "embed.image=false", "train.impression_level=false",
                             "train.models=['xgb','author_mean']", *TINY[:3]])
    job = behaviour.run(cfg, "toy", log=lambda _: None)
    run = engagesim.load_run(job.uri, snapshot="cutoff")
    assert run.post_models.members == ["xgb", "author_mean"]
    assert io.read_json(run.path("models", "post", "ensemble.json"))["families"]["author_mean"] == "author_mean"
    post = run.metrics["valid"]["post_level"]
    assert post["author_mean_accounts"] > 0 and np.isfinite(post["models"]["author_mean"]["rmse"])
    report = json.load(open(os.path.join(run.uri, "reports", "evaluation", "metrics.json")))
    assert "author_mean" in report["test"]["post_level"]["models"]
    evaluated = pl.from_arrow(io.read_table(run.path("predictions", "posts")))
    raw = pl.from_arrow(io.read_table(run.path("data", "posts"))).filter(
        pl.col("post_id").is_in(evaluated["post_id"].implode()))
    fresh = pl.from_arrow(run.predict(raw.drop("likes", "retweets", "replies", "quotes")))
    joined = evaluated.join(fresh, on="post_id", suffix="_fresh")
    assert joined.height == evaluated.height > 0
    for column in ("log1p_likes_author_mean", "log1p_likes"):
        assert (joined[column] - joined[f"{column}_fresh"]).abs().max() <= 1e-6


def test_unknown_family_is_a_config_error_naming_the_key():
    from engagesim.config import ConfigError
    from engagesim.models.family import check_models

    check_models(load_config(None, ["train.models=['xgb','slm']"]))
    with pytest.raises(ConfigError, match=r"train.models: unknown model family boost; registered: xgb"):
        check_models(load_config(None, ["train.models=['xgb','boost']"]))


def test_negative_sampling_refuses_families_that_cannot_weight_rows():
    from engagesim.config import ConfigError
    from engagesim.models.family import check_models

    check_models(load_config(None, ["train.models=['xgb','nn','knn']", "train.sample.negatives=0.5"]))
    with pytest.raises(ConfigError, match=r"train.sample.negatives=0.5: slm cannot weight rows"):
        check_models(load_config(None, ["train.models=['xgb','slm']", "train.sample.negatives=0.5"]))


def test_builtin_names_checked_without_imports_are_the_registered_ones():
    from engagesim.models.family import BUILTIN_FAMILIES

    assert list(BUILTIN_FAMILIES) == [f for f in family_names() if f in BUILTIN_FAMILIES]
    assert set(BUILTIN_FAMILIES) <= set(family_names())
