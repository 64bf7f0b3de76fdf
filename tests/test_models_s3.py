"""Model files and fitted feature state on a real S3 server (SeaweedFS): saved to s3:// and loaded back,
they predict exactly what the in-memory objects predict."""

import numpy as np
import pyarrow as pa

from engagesim import io
from engagesim.models import knn, nn, xgb
from engagesim.models.bundle import ImpressionModels, PostModels


def _table(n: int = 400, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.float32)
    return pa.table({**{f"f{i}": x[:, i] for i in range(6)}, "y": y})


def test_models_roundtrip_through_s3(s3_bucket):
    table = _table()
    features = [f"f{i}" for i in range(6)]
    root = f"s3://{s3_bucket}/runs/r1/models/post"

    booster = xgb.train_booster(xgb.dmatrix(table, features, "y"), None,
                                xgb.params_for("layer6", "reg:squarederror", {"nthread": 1}), 20)
    xgb.save(booster, f"{root}/xgb.ubj", features, {"task": "regression"})
    loaded, meta = xgb.load(f"{root}/xgb.ubj")
    assert meta["features"] == features
    assert np.array_equal(xgb.predict(loaded, table, features), xgb.predict(booster, table, features))

    x = np.column_stack([table.column(f).to_numpy() for f in features])
    mean, std = nn.fit_normaliser(x)
    net = nn.EngagementNet(nn.NNSpec(arch="layer6_mlp", n_inputs=6, n_outputs=1, task="regression",
                                     hidden=[16, 8], mean=mean, std=std)).eval()
    nn.save(net, f"{root}/nn", features)
    net2, feats2 = nn.load(f"{root}/nn")
    assert feats2 == features and np.array_equal(net2.predict(x), net.predict(x))

    model = knn.KNNRegressor(k=5).fit(x, table.column("y").to_numpy())
    model.save(f"{root}/knn")
    again = knn.KNNRegressor.load(f"{root}/knn")
    assert np.array_equal(again.predict(x[:20]), model.predict(x[:20]))

    # The run's bundle finds them on S3 (no ensemble file: the first member is served).
    io.write_json(f"{root}/knn/column.json", {"column": "text_emb"})
    bundle = PostModels(root)
    assert bundle.members == ["xgb", "knn", "nn"] and bundle.knn_column == "text_emb"
    preds = bundle.predict(table)
    assert np.array_equal(preds["ensemble"], np.clip(xgb.predict(booster, table, features), 0, None))
    assert ImpressionModels(f"s3://{s3_bucket}/runs/r1/models/impression").xgb == {}


def test_reports_publish_to_s3(s3_bucket):
    from engagesim.report import behaviour_report

    uri = f"s3://{s3_bucket}/runs/r1/reports/behaviour"
    metrics = {"test": {"post_level": {"baselines": {"global_mean": {"rmse": 1.0}}, "models": {"xgb": {"rmse": 0.8}},
                                       "oracle": {"rmse": 0.6}}}}
    out = behaviour_report(metrics, uri)
    assert out == f"{uri}/index.html" and io.exists(out)
    assert io.read_json(f"{uri}/metrics.json") == metrics and io.exists(f"{uri}/post_rmse.png")


def test_behaviour_job_writes_its_whole_run_to_s3(s3_server, s3_bucket, tmp_path):
    """`--out s3://…` (output_root) end to end: a job in its own process (its embedded Ray's workers get the S3
    settings from its environment, as cluster nodes get them from an instance profile), then the run is read
    back from S3 alone and predicts."""
    import json
    import tempfile

    from helpers import quiet_lines, run_cli

    from engagesim.runs import load_run

    root = f"s3://{s3_bucket}/runs"
    ray_tmp = tempfile.mkdtemp(prefix="rs3", dir="/tmp")  # short: Ray's socket paths have a length limit
    result = run_cli(
        "pipeline", "behaviour", "--json", "--run-id", "s3run", "--out", root,
        "--set", f"embed.cache_dir={tmp_path / 'cache'}", "--set", "synth.users=150", "--set", "synth.posts=400",
        "--set", "synth.impressions=4000", "--set", "synth.images=6", "--set", "synth.rows_per_shard=4000",
        "--set", "synth.days=5", "--set", "features.valid_hours=24", "--set", "embed.text_model=tiny:bert",
        "--set", "embed.image_model=tiny:clip", "--set", "train.xgb.rounds=10", "--set", "train.nn.epochs=1",
        "--set", "embed.pca_components=4", "--set", "ray.num_cpus=2",
        env={**s3_server, "RAY_TMPDIR": ray_tmp}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    # The first-hour bound on a quiet run's stderr: stage lines and training progress, one line each, no
    # warnings or wrapped lines (42 before: a sklearn warning, 8 wraps).
    lines = quiet_lines(result.stderr)
    assert len(lines) <= 40 and "impression-level models" in result.stderr, result.stderr
    assert any(x.strip().startswith("impression_xgb_like: round 10/10") for x in lines), result.stderr
    assert not any("Warning" in x or "Traceback" in x for x in lines), result.stderr
    assert all(x.startswith(("run directory", " ", "data", "eda", "features", "post", "impression", "evaluation",
                             "report", "behaviour")) for x in lines), result.stderr
    run_uri = f"{root}/s3run"
    assert json.loads(result.stdout.strip().splitlines()[-1])["run"] == run_uri
    manifest = io.read_json(f"{run_uri}/manifest.json")
    assert manifest["status"] == "succeeded"
    files = io.list_files(f"{run_uri}/models")
    assert any(f.endswith("post/xgb.ubj") for f in files) and any(f.endswith("impression/xgb_like.ubj") for f in files)
    assert io.exists(f"{run_uri}/reports/evaluation/index.html") and io.exists(f"{run_uri}/reports/eda/index.html")
    run = load_run(run_uri)
    posts = io.read_table(f"{run_uri}/data/posts").slice(0, 5)
    predicted = run.predict(posts)
    assert predicted.num_rows == 5 and np.all(np.isfinite(predicted.column("expected_likes").to_numpy()))
