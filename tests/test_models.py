"""Model families as plain code (no Ray): they learn, they save and load in safe formats."""

import numpy as np
import pyarrow as pa
import pytest

from engagesim import metrics
from engagesim.models import ensemble, knn, nn, xgb
from engagesim.models.data import feature_columns, matrix


def _table(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n), rng.exponential(100, size=n)
    logit = 1.5 * x1 + 0.01 * x2 - 1
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    x2_null = np.where(rng.random(n) < 0.1, np.nan, x2)
    return pa.table({"post_id": [str(i) for i in range(n)], "x1": x1.astype(np.float32), "x2": x2_null,
                     "flag": rng.random(n) < 0.5, "y_like": y, "split": ["train"] * n})


def test_feature_columns_exclude_ids_labels_split():
    assert feature_columns(_table().schema) == ["x1", "x2", "flag"]
    m = matrix(_table(10), ["x2", "flag"])
    assert m.dtype == np.float32 and m.shape == (10, 2)


def test_xgb_learns_and_round_trips(tmp_path):
    train, valid = _table(3000, 0), _table(1000, 1)
    f = ["x1", "x2", "flag"]
    params = xgb.params_for("layer6", "binary:logistic", {"nthread": 1})
    booster = xgb.train_booster(xgb.dmatrix(train, f, "y_like"), xgb.dmatrix(valid, f, "y_like"), params, 50, 10)
    p = xgb.predict(booster, valid, f)
    y = valid.column("y_like").to_numpy()
    assert metrics.rce(y, p) > 15
    path = str(tmp_path / "m.ubj")
    xgb.save(booster, path, f, {"engagement": "like"})
    loaded, meta = xgb.load(path)
    assert meta["features"] == f
    np.testing.assert_allclose(xgb.predict(loaded, valid, f), p, rtol=1e-6)
    assert open(path, "rb").read(1) == b"{"  # UBJSON object, not a pickle


@pytest.mark.parametrize("arch", ["layer6_mlp", "synerise_ffn"])
def test_nn_learns_and_round_trips(tmp_path, arch):
    t = _table(4000)
    f = ["x1", "x2", "flag"]
    x, y = matrix(t, f), t.column("y_like").to_numpy().reshape(-1, 1)
    mean, std = nn.fit_normaliser(x)
    spec = nn.NNSpec(arch=arch, n_inputs=3, n_outputs=1, hidden=[32, 64, 32, 16, 8], width=32, mean=mean, std=std)
    model = nn.EngagementNet(spec)
    losses = nn.train_epochs(model, x, y, epochs=4, batch_size=256, lr=3e-3)
    assert losses[-1] < losses[0]
    p = model.predict(x)[:, 0]
    assert metrics.rce(y[:, 0], p) > 10
    nn.save(model, str(tmp_path / "nn"), f)
    loaded, features = nn.load(str(tmp_path / "nn"))
    assert features == f
    np.testing.assert_allclose(loaded.predict(x)[:, 0], p, rtol=1e-5)
    assert (tmp_path / "nn" / "model.safetensors").exists()


def test_layer6_presets_shape():
    spec = nn.NNSpec(n_inputs=5, hidden=nn.LAYER6_PRESETS[2], mean=[0] * 5, std=[1] * 5)
    linear = [m for m in nn.EngagementNet(spec).modules() if isinstance(m, nn.nn.Linear)]
    assert [m.out_features for m in linear] == [512, 1024, 500, 250, 100, 4]  # 5 blocks + 4 sigmoid heads


def test_knn_regressor_flat_and_ivf(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    labels = rng.integers(0, 5, 2000)
    vecs = centres[labels] + 0.05 * rng.normal(size=(2000, 16))
    targets = labels.astype(np.float32) * 2.0
    flat = knn.KNNRegressor(k=5).fit(vecs, targets)
    assert flat.kind == "flat"
    np.testing.assert_allclose(flat.predict(centres), np.arange(5) * 2.0, atol=1e-3)
    ivf = knn.KNNRegressor(k=5, ivf_threshold=1000, nlist=8).fit(vecs, targets)
    assert ivf.kind == "ivf"
    np.testing.assert_allclose(ivf.predict(centres), np.arange(5) * 2.0, atol=1e-3)
    flat.save(str(tmp_path / "knn"))
    np.testing.assert_allclose(knn.KNNRegressor.load(str(tmp_path / "knn")).predict(centres), flat.predict(centres))


def test_ensemble_weights_and_stacking():
    w = ensemble.loss_weights({"a": 1.0, "b": 2.0})
    assert w == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    rng = np.random.default_rng(0)
    y = (rng.random(3000) < 0.3).astype(float)
    good = np.clip(0.3 + 0.4 * (y - 0.3) + 0.1 * rng.normal(size=3000), 0.01, 0.99)
    noise = np.clip(rng.random(3000), 0.01, 0.99)
    stacked, _, names = ensemble.stacked_cv({"good": good, "noise": noise}, y, "binary")
    assert names == ["good", "noise"]
    assert metrics.rce(y, stacked) > metrics.rce(y, noise)


def test_rce_and_ap_definitions():
    y = np.array([0, 0, 1, 1])
    assert metrics.rce(y, np.full(4, 0.5)) == pytest.approx(0.0)  # the constant predictor of the rate
    assert metrics.rce(y, np.array([0, 0, 1, 1.0])) == pytest.approx(100.0, abs=1e-3)
    assert metrics.average_precision(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert np.isnan(metrics.rce(np.ones(3), np.full(3, 0.9)))
    groups = metrics.popularity_groups(np.array([1, 10, 100, 1000, 10000]), n_groups=5)
    assert sorted(set(groups.tolist())) == [0, 1, 2, 3, 4]
