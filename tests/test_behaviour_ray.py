"""Features and training on the shared local Ray cluster, on a small synthetic world."""

import json
import os

import numpy as np
import pyarrow.compute as pc
import pytest
from helpers import frame_mismatches

from engagesim import io
from engagesim.config import SynthConfig, load_config
from engagesim.models import xgb
from engagesim.models.data import feature_columns
from engagesim.pipeline.features import run_features
from engagesim.pipeline.train import train_impression_level, train_post_level
from engagesim.synth import generate

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world"))
    generate(SynthConfig(users=400, posts=1200, impressions=40_000, images=20, rows_per_shard=10_000, days=6, seed=5), out)
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    # broadcast_max_rows=0: every history group (and the post features) is joined partition against partition, and
    # post_stream_rows=0: the post features run on the Ray post plane, leiden_max_edges=500: Leiden on a user
    # sample (2,807 engaged or followed pairs here) and the rest assigned (the large-log paths).
    return load_config(None, [f"embed.cache_dir={cache}", "features.valid_hours=24", "embed.pca_components=4",
                              "features.broadcast_max_rows=0", "features.partitions=3", "features.post_stream_rows=0",
                              "features.leiden_max_edges=500", "train.xgb.rounds=30", "train.xgb.checkpoint_every=10",
                              "train.nn.epochs=2", "train.nn.layer6_preset=0"])


@pytest.fixture(scope="module")
def features(world, config, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("features"))
    summary = run_features(config, io.join(world, "posts"), out, io.join(world, "users"), io.join(world, "interactions"))
    return out, summary


def test_feature_tables_and_manifest(features):
    out, summary = features
    posts = io.read_table(io.join(out, "posts"))
    imps = io.read_table(io.join(out, "impressions"))
    assert posts.num_rows == 1200 and imps.num_rows == 40_000
    cols = set(imps.column_names)
    for family in ("n_hashtags", "mean_word_len", "day_of_week", "secs_since_prev_post", "te_author_id",
                   "te_hashtags_top1", "text_pca_0", "sketch_pca_0", "clarity_contrast", "hue_count",
                   "author_reach_log_impressions", "author_reach_posts"):
        assert f"post_{family}" in cols, family
    for family in ("user_like_rate", "pair_reply_count", "creator_n", "post_like_rate", "user_like_secs_since_last",
                   "cf_similarity", "similar_creators_engaged", "same_community_like", "inv_community_size_quote",
                   "user_follower_count", "creator_account_age_days", "follows_creator"):
        assert family in cols, family
    manifest = json.load(open(os.path.join(out, "features.json")))
    leak = {f["name"]: f["leak"] for f in manifest["features"] if f["table"] == "impressions"}
    assert leak["post_te_author_id"].startswith("label-derived") and leak["post_n_words"] == "no labels"
    assert "own left out" in leak["post_author_reach_log_impressions"]
    assert set(summary["posts"]["te_smoothing"]) == {"author_id", "company", "language", "hashtags", "domains"}
    split = pc.value_counts(imps.column("split")).to_pylist()
    assert {s["values"] for s in split} == {"train", "valid", "test"}
    assert summary["posts"]["images_embedded_now"] > 0
    # Unreachable media (.invalid URLs, http fetching off) → a null embedding and a recorded reason, no crash.
    assert summary["posts"]["image_errors"] > 0
    without = posts.filter(pc.invert(pc.is_valid(posts.column("image_emb"))))
    assert without.num_rows >= summary["posts"]["image_errors"]


def test_partitioned_executor_equals_the_in_process_one(features, world, config):
    """The Ray executor (history fit per block, combined by a key-hash shuffle, every group joined partition
    against partition, nothing broadcast) and the in-process executor on one polars frame make the same table."""
    import polars as pl

    from engagesim.features.history import GROUPS
    from engagesim.features.impression import features_in_process

    out, summary = features
    plan = summary["impressions"]["history"]
    assert plan["partitions"] == 3 and plan["broadcast"] == []
    assert sorted(p for ps in plan["partitioned"].values() for p in ps) == sorted(GROUPS)
    assert set(plan["partitioned"]) == {"user_id", "creator_id", "post_id"}  # user, pair and topic share one
    f = config.features
    assert plan["graph_edges"] > 4 * f.leiden_max_edges  # Leiden ran on a user sample, the rest assigned
    local = pl.from_arrow(features_in_process(
        io.read_table(io.join(world, "interactions")), pl.from_arrow(io.read_table(io.join(out, "posts"))),
        pl.from_arrow(io.read_table(io.join(world, "users"))), f.valid_hours, f.window_hours, f.history_mode,
        f.jaccard_k, f.seed, test_share=f.test_share, leiden_max_edges=f.leiden_max_edges,
        community_folds=f.community_folds))
    ray_table = pl.from_arrow(io.read_table(io.join(out, "impressions")))
    assert ray_table.height == local.height == 40_000
    assert frame_mismatches(ray_table, local, ["impression_at", "user_id", "post_id"]) == []
    # The apply tables are saved as parts, one per partition, and the state reads them whole.
    for snapshot in ("apply", "recent", "latest"):  # the held-out snapshots too (History.extend)
        assert len(io.list_files(io.join(out, "state", "impressions", "history", "pair", snapshot))) == 3
    # The post features met the impressions by a hash join; the serving snapshot's post tables were written
    # as parts and load back as the table the broadcast path would have held.
    from engagesim.features.impression import impression_post_columns
    from engagesim.features.state import ImpressionState

    assert summary["impressions"]["posts"] == "hash join on post_id"
    snapshot = ImpressionState.load(io.join(out, "state", "impressions"))
    want = impression_post_columns(pl.from_arrow(io.read_table(io.join(out, "posts"))))
    assert frame_mismatches(snapshot.posts, want, ["post_id"]) == []
    assert snapshot.topics.height == 1200 and set(snapshot.topics.columns) == {"post_id", "topic"}


def test_post_plane_equals_the_in_process_executor(features, world, config):
    """The Ray post plane (split keys from a histogram, target-encoding sums combined by a shuffle, PCA from
    moments, featurised author by author after a hash join with the impression counts) and the in-process
    executor on one polars frame make the same post table and the same state."""
    import polars as pl

    from engagesim.datasets import collect
    from engagesim.features.state import PostState
    from engagesim.pipeline.features import _post_rows, build_post_features, impression_counts, impression_span

    out, summary = features
    cutoff = impression_span(config, io.join(world, "interactions"))[2]
    rows = collect(_post_rows(config, io.join(world, "posts")))  # cached embeddings: nothing is embedded again
    local, info, local_state = build_post_features(
        config, rows, pl.from_arrow(io.read_table(io.join(world, "users"))),
        (impression_counts(config, io.join(world, "interactions"), cutoff), cutoff))
    ray_table = pl.from_arrow(io.read_table(io.join(out, "posts")))
    assert ray_table.height == local.height == 1200
    assert frame_mismatches(ray_table.drop(["text_emb", "text_sketch", "image_emb"]),
                            local.drop(["text_emb", "text_sketch", "image_emb"]), ["post_id"]) == []
    for key in ("rows", "train_rows", "valid_rows", "test_rows", "te_smoothing"):
        assert summary["posts"][key] == info[key], key
    saved = PostState.load(io.join(out, "state", "posts"))
    assert saved.known_posts.height == 1200 and saved.reach.exposed.height == local_state.reach.exposed.height
    assert saved.top_langs == local_state.top_langs
    assert np.array_equal(saved.centres, local_state.centres)
    # The served (latest) target encodings, over every labelled post, are the same sums from both executors.
    for key, stats in local_state.latest.items():
        served = {**saved.te_scalar, **saved.te_list}[key]
        assert frame_mismatches(served.table, stats.table, [key]) == [], key
        assert served.prior == pytest.approx(stats.prior) and served.smoothing == pytest.approx(stats.smoothing)


def test_second_run_embeds_nothing(features, world, config, tmp_path):
    summary = run_features(config, io.join(world, "posts"), str(tmp_path / "again"))
    assert summary["posts"]["texts_embedded_now"] == 0
    assert summary["posts"]["images_embedded_now"] == 0


def test_post_and_impression_models_beat_baselines(features, world, config, tmp_path):
    out, _ = features
    post = train_post_level(config, io.join(out, "posts"), str(tmp_path), io.join(world, "truth/posts"))
    assert post["models"]["xgb"]["rmse"] < post["baselines"]["global_mean"]["rmse"]
    assert post["oracle"]["rmse"] < post["models"]["xgb"]["rmse"]
    assert (tmp_path / "post" / "xgb.ubj").exists() and (tmp_path / "post" / "knn" / "index.faiss").exists()
    # SMP's stacked MLP on [out-of-fold XGBoost prediction, image vector + image features]
    assert post["models"]["stacked_mlp"]["rmse"] < post["baselines"]["global_mean"]["rmse"]
    assert (tmp_path / "post" / "stacked_mlp" / "model.safetensors").exists()
    imp = train_impression_level(config, io.join(out, "impressions"), str(tmp_path), io.join(world, "truth/interactions"))
    for name in ("xgb", "nn"):
        assert imp["models"][name]["like"]["rce"] > 5
        assert imp["models"][name]["like"]["ap"] > 0.45  # like rate is ~0.4
    assert imp["oracle"]["like"]["rce"] > imp["models"]["xgb"]["like"]["rce"]
    assert "stacked" in imp["ensemble"]
    assert imp["train_input"] == "in_memory"  # 40k rows: below the automatic stream threshold


def test_impression_training_streams_from_ray_data_above_the_threshold(features, world, config, tmp_path):
    """Above train.stream_rows neither split enters the driver whole: xgb and nn workers read their Ray
    Data shard (XGBoost through a QuantileDMatrix iterator), here with half the negatives sampled away
    (weights 2); a hash half of the validation rows is gathered for early stopping and the stacker, and
    the other half is scored on Ray Data into partial sums. The booster matches plain in-process xgboost
    on the same weighted rows; the streamed RCE equals the exact one of the served models on the scored
    rows and the exact AP lies inside the reported histogram bracket; the oracle comes through the hash join."""
    import xgboost

    from engagesim.config import SampleConfig
    from engagesim.metrics import average_precision, rce
    from engagesim.models.bundle import ImpressionModels
    from engagesim.models.data import label_matrix, matrix, sample_negatives
    from engagesim.pipeline.validation import fit_fraction, is_fit_row

    out, _ = features
    streamed = config.model_copy(update={"train": config.train.model_copy(update={
        "stream_rows": 1, "valid_fit_rows": 1500, "models": ["xgb", "nn"], "sample": SampleConfig(negatives=0.5),
        "nn": config.train.nn.model_copy(update={"finetune_hours": 6})})})
    imp = train_impression_level(streamed, io.join(out, "impressions"), str(tmp_path),
                                 io.join(world, "truth/interactions"))
    assert imp["train_input"] == "ray_data" and imp["nn_two_stage"]["finetune_rows"] > 0
    table = io.read_table(io.join(out, "impressions"))
    train = sample_negatives(table.filter(pc.equal(table.column("split"), "train")), 0.5)
    valid = table.filter(pc.equal(table.column("split"), "valid"))
    assert imp["rows"] == {"train": train.num_rows, "valid": valid.num_rows}
    assert imp["sample"] == {"negatives": 0.5, "kept_rows": train.num_rows}
    is_fit = is_fit_row(valid, fit_fraction(valid.num_rows, 1500), streamed.train.sample.seed)
    fit, scored = valid.filter(is_fit), valid.filter(pc.invert(is_fit))
    assert imp["validation"]["fit_rows"] == fit.num_rows and imp["validation"]["scored_rows"] == scored.num_rows
    assert 1000 < fit.num_rows <= 1650 and scored.num_rows > 0  # ~3k validation rows: about half
    f = feature_columns(table.schema)
    params = xgb.params_for("adobe", "binary:logistic", {"nthread": 2})
    plain = xgboost.train(params, xgb.dmatrix(train, f, "y_like"), 30,
                          evals=[(xgb.dmatrix(fit, f, "y_like"), "valid")], early_stopping_rounds=30,
                          verbose_eval=False)
    y = label_matrix(scored)
    assert abs(imp["models"]["xgb"]["like"]["rce"] - rce(y[:, 0], xgb.predict(plain, matrix(scored, f), f))) < 1.0
    assert imp["models"]["xgb"]["like"]["rce"] > 25 and imp["models"]["nn"]["like"]["rce"] > 5
    served = ImpressionModels(str(tmp_path / "impression")).predict(scored)
    for k, e in enumerate(("like", "reply")):
        for name, p in (("xgb", served["xgb"]), ("stacked", served["ensemble"])):
            got = imp["models"]["xgb"] if name == "xgb" else imp["ensemble"]["stacked"]
            assert got[e]["rce"] == pytest.approx(rce(y[:, k], p[:, k]), abs=1e-3), (name, e)
            # AP from score bins: the exact AP lies inside the reported bracket (positives last / tied first
            # within each bin), which is wide on ~1.5k rows of a rare label; the estimate sits inside it.
            lo, hi = got[e]["ap_bounds"]
            assert lo - 1e-5 <= average_precision(y[:, k], p[:, k]) <= hi + 1e-5, (name, e, lo, hi)
            assert lo <= got[e]["ap"] <= hi and hi - lo < 0.05, (name, e, lo, hi)
    assert imp["oracle"]["like"]["rce"] > imp["models"]["xgb"]["like"]["rce"]
    assert served["ensemble"].shape == (scored.num_rows, 4)


def test_post_training_streams_from_ray_data_above_the_threshold(features, world, config, tmp_path):
    """The post level above train.stream_rows: xgb (with its account-prior margin, applied block by block), the
    kNN index (trained on a sample, filled batch by batch) and the account-mean member stream; the stacked MLP,
    which cannot, gathers the split and says so. Account means come from a
    Ray Data groupby; half the validation posts (by a hash of post_id) fit the ensemble, the others are scored
    on Ray Data: the reported RMSE of each member, the served ensemble, both baselines and the oracle equal the
    exact ones of the saved models on those posts."""
    from engagesim.metrics import rmse
    from engagesim.models.bundle import PostModels
    from engagesim.models.family import POST
    from engagesim.pipeline.level_inputs import post_baseline_predictions
    from engagesim.pipeline.validation import fit_fraction, is_fit_row

    out, _ = features
    streamed = config.model_copy(update={"train": config.train.model_copy(update={
        "stream_rows": 1, "valid_fit_rows": 60, "models": ["xgb", "knn", "stacked_mlp", "account_mean_eb"]})})
    lines: list[str] = []
    post = train_post_level(streamed, io.join(out, "posts"), str(tmp_path), io.join(world, "truth/posts"),
                            log=lines.append)
    assert post["train_input"] == "ray_data"
    assert any("stacked_mlp cannot stream" in line for line in lines)
    assert any(line.startswith("knn: flat index over") for line in lines)
    table = io.read_table(io.join(out, "posts"))
    table = table.filter(pc.invert(pc.is_nan(table.column("label_log1p_likes"))))
    train = table.filter(pc.equal(table.column("split"), "train"))
    valid = table.filter(pc.equal(table.column("split"), "valid"))
    is_fit = is_fit_row(valid, fit_fraction(valid.num_rows, 60), streamed.train.sample.seed, POST.keys)
    scored = valid.filter(pc.invert(is_fit))
    assert post["rows"] == {"train": train.num_rows, "valid": valid.num_rows}
    assert post["validation"]["scored_rows"] == scored.num_rows > 20
    assert post["validation"]["fit_rows"] == valid.num_rows - scored.num_rows
    y = scored.column("label_log1p_likes").to_numpy()
    served = PostModels(str(tmp_path / "post")).predict(scored)
    for name in ("xgb", "knn", "stacked_mlp", "account_mean_eb"):
        assert post["models"][name]["rmse"] == pytest.approx(rmse(y, served[name]), abs=1e-5), name
    assert post["models"]["xgb"]["seconds"] > 0
    shown = post["ensemble"].get("by_account_regime") or post["ensemble"][
        "stacked" if post["ensemble"]["served"] == "stacked" else "loss_weighted"]
    if "alone" not in post["ensemble"]["served"]:
        assert shown["rmse"] == pytest.approx(rmse(y, served["ensemble"]), abs=1e-5)
    for name, p in post_baseline_predictions(train, scored).items():
        assert post["baselines"][name]["rmse"] == pytest.approx(rmse(y, p), abs=1e-5), name
    assert post["oracle"]["rmse"] < post["baselines"]["global_mean"]["rmse"]
    assert post["models"]["xgb"]["rmse"] < post["baselines"]["global_mean"]["rmse"]


def test_streamed_normaliser_equals_the_in_memory_fit(ray_local):
    import pyarrow as pa
    import ray

    from engagesim.models import nn

    rng = np.random.default_rng(2)
    x = np.column_stack([rng.normal(size=5000), rng.exponential(100, size=5000)]).astype(np.float32)
    ds = ray.data.from_arrow(pa.table({"a": x[:, 0], "b": x[:, 1]})).repartition(7)
    mean, std = nn.fit_normaliser_stream(ds, ["a", "b"])
    np.testing.assert_allclose(mean, nn.fit_normaliser(x)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, nn.fit_normaliser(x)[1], rtol=1e-5, atol=1e-6)


def test_xgb_outputs_fit_in_one_run_and_a_killed_worker_resumes_the_booster_it_was_on(features, tmp_path):
    """Two labels, one Ray Train run: rank 0 dies at round 25 of the second booster; the retry keeps the first
    from the checkpoint and resumes the second from its last checkpointed round. Each booster equals plain
    xgboost on its own label (one worker, no row or column sampling: the fit is deterministic)."""
    out, _ = features
    table = io.read_table(io.join(out, "impressions"))
    train = table.filter(pc.equal(table.column("split"), "train"))
    valid = table.filter(pc.equal(table.column("split"), "valid"))
    f = feature_columns(table.schema)[:20]
    from engagesim.config import XGBConfig
    from engagesim.models.chaos import CrashOnce

    marker = str(tmp_path / "crashed")
    params = xgb.params_for("layer6", "binary:logistic", {"nthread": 1, "subsample": 1.0, "colsample_bytree": 1.0})
    settings = XGBConfig(rounds=40, checkpoint_every=10, cpus_per_worker=1, early_stopping=40)
    labels = ["y_like", "y_reply"]
    boosters = xgb.fit_ray_many(train, valid, f, labels, params, settings, str(tmp_path), "chaos",
                                callbacks=[CrashOnce(25, marker, skip_fits=1)])
    assert open(marker).read() == "25"  # the worker really died at round 25 of the second booster...
    resumed = int(open(marker + ".resumed").read())
    # ...the retry started from a checkpoint (every 10 rounds; the newest may not be registered yet)...
    assert 0 < resumed < 25 and resumed % 10 == 0
    for label in labels:  # ...and both boosters are those of one plain fit per label
        plain = xgb.train_booster(xgb.dmatrix(train, f, label), xgb.dmatrix(valid, f, label), params, 40, 40)
        assert boosters[label].num_boosted_rounds() == plain.num_boosted_rounds()
        np.testing.assert_allclose(xgb.predict(boosters[label], valid, f), xgb.predict(plain, valid, f),
                                   rtol=1e-5, atol=1e-6, err_msg=label)
    assert not np.allclose(xgb.predict(boosters["y_like"], valid, f), xgb.predict(boosters["y_reply"], valid, f))


def test_tune_matches_or_beats_default_and_train_accepts_it(features, config, tmp_path):
    from engagesim.config import load_config as load
    from engagesim.tune import tune_xgb

    out, _ = features
    yaml_path = str(tmp_path / "best.yaml")
    # 20 rounds reported every 10: ASHA's max_t is 2, below its usual grace period of 3 (which crashed once).
    result = tune_xgb(config, out, yaml_path, str(tmp_path / "tune"), level="post", num_samples=4, rounds=20,
                      report_every=10)
    assert result["trials"] == 4
    default_score = result["scores"][0]  # the preset is the first trial
    assert result["best_score"] <= default_score
    tuned = load(yaml_path, ["train.models=['xgb']", "train.xgb.checkpoint_every=20"])
    assert tuned.train.xgb.params == result["best"]
    post = train_post_level(tuned, io.join(out, "posts"), str(tmp_path / "models"))
    assert np.isfinite(post["models"]["xgb"]["rmse"])


def test_nn_two_stage_fine_tunes_on_the_latest_window(features, config, tmp_path):
    out, _ = features
    two_stage = config.model_copy(deep=True)
    two_stage.train.models = ["nn"]
    two_stage.train.nn.finetune_hours = 24
    two_stage.train.nn.epochs = 1
    two_stage.train.nn.hidden = [32, 16]  # replaces layer6_preset's widths
    imp = train_impression_level(two_stage, io.join(out, "impressions"), str(tmp_path))
    assert io.read_json(str(tmp_path / "impression" / "nn" / "config.json"))["spec"]["hidden"] == [32, 16]
    info = imp["nn_two_stage"]
    assert 0 < info["finetune_rows"] < imp["rows"]["train"]  # only the most recent training rows
    assert np.isfinite(info["finetune_loss"]).all()
    assert imp["models"]["nn"]["like"]["rce"] > 0


def test_nn_fit_is_a_function_of_its_seed(ray_local, tmp_path):
    """Initial weights and batch order come from train.nn.seed, not from the worker process's RNG state:
    the same seed gives the same weights bit for bit, another seed other weights."""
    import pyarrow as pa

    from engagesim.config import NNConfig
    from engagesim.models import nn

    rng = np.random.default_rng(1)
    x1 = rng.normal(size=2000).astype(np.float32)
    table = pa.table({"x1": x1, "y_like": (rng.random(2000) < 1 / (1 + np.exp(-2 * x1))).astype(np.float32)})
    spec = nn.NNSpec(arch="layer6_mlp", n_inputs=1, n_outputs=1, hidden=[16, 16, 8, 8, 4], width=16, mean=[0.0],
                     std=[1.0], task="binary")

    def weights(seed: int, name: str) -> np.ndarray:
        model = nn.fit_ray(table, ["x1"], ["y_like"], spec, str(tmp_path), name, NNConfig(epochs=1, seed=seed), 256)
        return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])

    first = weights(0, "a")
    np.testing.assert_array_equal(first, weights(0, "b"))
    assert np.abs(first - weights(1, "c")).max() > 1e-3


@pytest.mark.parametrize("deepspeed", [False, True], ids=["ddp", "deepspeed-zero2"])
def test_nn_trains_on_two_workers_with_ddp_or_deepspeed_zero2(ray_local, tmp_path, deepspeed):
    import pyarrow as pa

    from engagesim import metrics
    from engagesim.config import NNConfig
    from engagesim.models import nn

    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=4000).astype(np.float32), rng.normal(size=4000).astype(np.float32)
    y = (rng.random(4000) < 1 / (1 + np.exp(-(2 * x1 - x2)))).astype(np.float32)
    table = pa.table({"x1": x1, "x2": x2, "y_like": y})
    x = np.column_stack([x1, x2])
    mean, std = nn.fit_normaliser(x)
    spec = nn.NNSpec(arch="layer6_mlp", n_inputs=2, n_outputs=1, hidden=[32, 64, 32, 16, 8], width=32, mean=mean,
                     std=std, task="binary")
    settings = NNConfig(epochs=3, lr=3e-3, workers=2, deepspeed=deepspeed)
    model = nn.fit_ray(table, ["x1", "x2"], ["y_like"], spec, str(tmp_path), "nn", settings, batch_size=128)
    assert model.train_metrics["workers"] == 2 and model.train_metrics["zero_stage"] == (2 if deepspeed else 0)
    assert metrics.rce(y, model.predict(x)[:, 0]) > 20


def test_zero2_restart_restores_every_ranks_adamw_moments(ray_local, tmp_path):
    """A ZeRO-2 worker dies after epoch 1; the restarted group loads each rank's own optimizer partition (Ray
    Train merges the ranks' checkpoint files into one folder) and finishes."""
    import pyarrow as pa

    from engagesim.config import NNConfig
    from engagesim.models import nn
    from engagesim.models.chaos import CrashOnce

    rng = np.random.default_rng(1)
    x1 = rng.normal(size=2000).astype(np.float32)
    table = pa.table({"x1": x1, "y_like": (x1 > 0).astype(np.float32)})
    mean, std = nn.fit_normaliser(x1[:, None])
    spec = nn.NNSpec(n_inputs=1, n_outputs=1, hidden=[8, 8, 8, 8, 8], mean=mean, std=std, task="binary")
    marker = str(tmp_path / "crashed")
    model = nn.fit_ray(table, ["x1"], ["y_like"], spec, str(tmp_path), "zero2_resume",
                       NNConfig(epochs=3, workers=2, deepspeed=True), batch_size=128,
                       callbacks=[CrashOnce(1, marker, delay=1.0)])
    assert open(marker).read() == "1" and open(marker + ".resumed").read() == "1"
    assert model.train_metrics["resumed_optimizer"] is True and model.train_metrics["zero_stage"] == 2
    assert model.train_metrics["epoch"] == 2


def test_worker_shards_cover_the_table_and_equal_ones_have_one_length(ray_local):
    """DDP ranks must see the same number of rows (else one waits forever in all-reduce); XGBoost keeps all."""
    import pyarrow as pa
    import ray

    from engagesim.models.distributed import put_shards

    table = pa.table({"v": np.arange(1001)})
    every = put_shards({"train": table, "valid": None}, 2)
    assert set(every) == {"train"}  # an absent table gets no shards
    parts = [ray.get(ref) for ref in every["train"]]
    assert [p.num_rows for p in parts] == [500, 501]
    assert np.concatenate([p.column("v").to_numpy() for p in parts]).tolist() == list(range(1001))
    equal = [ray.get(ref).num_rows for ref in put_shards({"train": table}, 3, equal=True)["train"]]
    assert equal == [333, 333, 333]
