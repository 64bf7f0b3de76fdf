"""Model families as plain code (no Ray, except the Ray Train paths marked so): they learn, they save and load in safe formats."""

import os

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_a_few_rows_convert_once_for_every_member_and_equal_the_per_member_matrix():
    from engagesim.models import data

    t = _table(20).append_column("n", pa.array([None, *range(19)], pa.int64()))
    few, big = t.slice(0, 5), t
    for columns in (["x2", "flag"], ["n", "x1"], ["x1", "x2", "flag", "n"]):
        want = data._float32(few, columns)
        got = matrix(few, columns)
        assert got.flags["C_CONTIGUOUS"] and np.array_equal(got, want, equal_nan=True)
    assert data._LAST.table[0] is few  # converted once, reused by the next member
    assert matrix(big, ["x1"]).shape == (20, 1) and data._LAST.table[0] is big
    assert np.array_equal(matrix(few, ["y_like"]), data._float32(few, ["y_like"]))  # a label: not in the cache


_TYPES = [pa.int8(), pa.int32(), pa.int64(), pa.uint8(), pa.float32(), pa.float64(), pa.bool_()]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_float32_conversion_equals_polars_for_every_numeric_type(draw):
    """A few rows convert through Arrow's row-major tensor (nulls → NaN), larger or boolean tables through
    polars: the same float32 matrix either way, for integers, floats with NaN and nulls, and tables in chunks."""
    import polars as pl

    from engagesim.models import data

    n = draw.draw(st.integers(1, data.FEW_ROWS + 3))
    types = draw.draw(st.lists(st.sampled_from(_TYPES), min_size=1, max_size=6))
    rng = np.random.default_rng(draw.draw(st.integers(0, 2**16)))
    columns = {}
    for i, t in enumerate(types):
        values = rng.normal(0, 1e6, n) if pa.types.is_floating(t) else rng.integers(0, 100, n)
        values = values.astype(t.to_pandas_dtype())
        mask = rng.random(n) < 0.2
        if pa.types.is_floating(t):
            values[rng.random(n) < 0.1] = np.nan
        columns[f"c{i}"] = pa.array(values, t, mask=mask)
    table = pa.table(columns)
    if n > 1:
        table = pa.concat_tables([table.slice(0, n // 2), table.slice(n // 2)])
    names = list(columns)
    frame = pl.from_arrow(table.select(names))
    want = np.ascontiguousarray(frame.select(pl.all().cast(pl.Float32)).to_numpy(), dtype=np.float32)
    got = data._float32(table, names)
    assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"] and np.array_equal(got, want, equal_nan=True)


def test_small_batches_run_the_net_on_one_thread_and_restore_the_default():
    import torch

    seen = []
    with nn.threads_for(1):
        seen.append(torch.get_num_threads())
    with nn.threads_for(nn.ONE_THREAD_MAX_ROWS + 1):
        seen.append(torch.get_num_threads())
    assert seen == [1, nn._DEFAULT_THREADS] and torch.get_num_threads() == nn._DEFAULT_THREADS


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


def test_a_few_rows_walk_the_same_trees_as_xgboost():
    """Requests of a few rows go through treelite's GTIL (models/xgb.py): the same numbers as XGBoost's own
    predictor up to the best iteration, missing values included, and one row alone as inside a batch."""
    rng = np.random.default_rng(3)
    train, valid = _table(3000, 0), _table(1000, 1)
    f = ["x1", "x2", "flag"]
    for objective, label in (("binary:logistic", "y_like"), ("reg:squarederror", "x1")):
        features = [c for c in f if c != label] or f
        params = xgb.params_for("layer6", objective, {"nthread": 1})
        booster = xgb.train_booster(xgb.dmatrix(train, features, label), xgb.dmatrix(valid, features, label),
                                    params, 60, 5)
        x = matrix(valid, features)[:400].copy()
        x[rng.random(x.shape) < 0.2] = np.nan
        batch = xgb.predict(booster, x, features)  # 400 rows: XGBoost's predictor
        assert x.shape[0] > xgb.FEW_ROWS
        few = np.concatenate([xgb.predict(booster, x[i:i + xgb.FEW_ROWS], features)
                              for i in range(0, len(x), xgb.FEW_ROWS)])
        np.testing.assert_allclose(few, batch, rtol=0, atol=1e-6)
        np.testing.assert_allclose(xgb.predict(booster, x[7:8], features), batch[7:8], rtol=0, atol=1e-6)
        every_tree = booster.inplace_predict(x[7:8], missing=np.nan)  # the best iteration is honoured
        assert booster.best_iteration + 1 == booster.num_boosted_rounds() or abs(every_tree[0] - batch[7]) > 1e-6


def test_external_memory_is_chosen_by_the_values_a_worker_holds():
    assert not xgb.uses_external_memory("auto", 1_500_000, 160)  # 2M impressions: bins stay in RAM
    assert xgb.uses_external_memory("auto", 7_500_000, 160)  # 10M
    assert xgb.uses_external_memory("on", 10, 2) and not xgb.uses_external_memory("off", 1e9, 200)


def test_stale_page_directories_of_dead_workers_are_swept_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs (a worker killed before its finally)
    stale = tmp_path / f"{xgb.PAGES_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{xgb.PAGES_PREFIX}{os.getpid()}-def"
    other = tmp_path / f"{xgb.PAGES_PREFIX}xyz"  # not ours to judge (no pid): kept
    for d in (stale, live, other):
        (d / "train").mkdir(parents=True)
    assert xgb.sweep_stale_pages(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and other.exists()


@pytest.mark.ray
def test_external_memory_trains_the_same_booster_from_a_streamed_shard(ray_local, tmp_path):
    """A Ray Data shard trained from XGBoost's external memory (binned pages on the worker's disk) gives the
    very trees the in-memory QuantileDMatrix gives: same cuts, same histograms."""
    import ray.data

    from engagesim.config import XGBConfig

    train, valid = _table(6000, 0), _table(1500, 1)
    f = ["x1", "x2", "flag"]
    params = xgb.params_for("layer6", "binary:logistic", {"nthread": 1})
    boosters = {}
    for mode in ("off", "on"):
        settings = XGBConfig(rounds=12, early_stopping=30, checkpoint_every=6, workers=1, cpus_per_worker=1,
                             external_memory=mode)
        boosters[mode] = xgb.fit_ray(ray.data.from_arrow(train).repartition(6), ray.data.from_arrow(valid), f,
                                     "y_like", params, settings, str(tmp_path / mode), f"extmem_{mode}")
    assert boosters["on"].attr("external_memory") == "1" and boosters["off"].attr("external_memory") is None
    np.testing.assert_array_equal(xgb.predict(boosters["on"], valid, f), xgb.predict(boosters["off"], valid, f))


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


@pytest.mark.parametrize("arch", ["layer6_mlp", "synerise_ffn"])
def test_a_few_rows_run_the_nets_trace_with_the_eager_outputs(arch):
    """Up to ``nn.TRACE_MAX_ROWS`` rows a net runs as its TorchScript trace (a served request): the eager pass's
    outputs, rows alone as inside a batch, NaN inputs included; and a training step taken after the trace was
    made is seen by it (it reads the net's parameters)."""
    import torch

    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 6)).astype(np.float32) * 3
    x[rng.random(x.shape) < 0.1] = np.nan
    mean, std = nn.fit_normaliser(x)
    model = nn.EngagementNet(nn.NNSpec(arch=arch, n_inputs=6, n_outputs=2, hidden=[16, 8], width=16,
                                       mean=mean, std=std))
    for _ in range(2):
        batch = model.predict(x)  # 200 rows: eager
        assert len(x) > nn.TRACE_MAX_ROWS
        few = np.concatenate([model.predict(x[i:i + 10]) for i in range(0, len(x), 10)])
        np.testing.assert_allclose(few, batch, rtol=0, atol=1e-6)
        assert model in nn._TRACES
        model.train()
        with torch.no_grad():  # a training step after the trace was made
            for p in model.parameters():
                p.add_(0.05)
    assert not np.allclose(model.predict(x[:3]), few[:3])


def test_a_net_that_cannot_be_traced_runs_eager(monkeypatch):
    import torch

    def refuse(*args, **kwargs):
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    x = np.random.default_rng(6).normal(size=(5, 4)).astype(np.float32)
    with torch.random.fork_rng():  # the later tests' nets start from the torch RNG state they had without this one
        model = nn.EngagementNet(nn.NNSpec(n_inputs=4, n_outputs=1, hidden=[8], mean=[0.0] * 4, std=[1.0] * 4))
    with torch.inference_mode():
        eager = torch.sigmoid(model.eval()(torch.from_numpy(x))).numpy()
    np.testing.assert_array_equal(model.predict(x), eager)
    assert nn._TRACES[model] is False and model.predict(x[:1]).shape == (1, 1)


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
    # Product-quantised, trained on a sample and filled batch by batch (the streamed post level): 16 bytes a
    # vector instead of 64, the same votes on well-separated clusters, and it saves and loads.
    pq = knn.KNNRegressor(k=5, ivf_threshold=1000, nlist=8, pq_threshold=1000, pq_bytes=4).fit_stream(
        vecs[:500], ((vecs[i:i + 300], targets[i:i + 300]) for i in range(0, 2000, 300)), 2000)
    assert pq.kind == "ivfpq" and len(pq.targets) == 2000
    np.testing.assert_allclose(pq.predict(centres), np.arange(5) * 2.0, atol=1e-3)
    pq.save(str(tmp_path / "pq"))
    assert knn.KNNRegressor.load(str(tmp_path / "pq")).kind == "ivfpq"
    np.testing.assert_allclose(knn.KNNRegressor.load(str(tmp_path / "pq")).predict(centres), pq.predict(centres))


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


@pytest.mark.parametrize("rate", [0.4, 0.03])
def test_binary_scores_from_partial_sums_match_the_exact_metrics(rate):
    """RCE from block sums is exact; AP from equal-count score bins (edges from a 30 % sample, as the
    fit rows give them) is within 1e-4 of sklearn's sort (the documented error), overall and as the mean
    over popularity groups; merging blocks is addition; the curves end where they must."""
    rng = np.random.default_rng(3)
    n = 60_000
    s = rng.normal(size=(n, 2))
    base = np.log(rate / (1 - rate))
    y = (rng.random((n, 2)) < 1 / (1 + np.exp(-(1.5 * s + base)))).astype(np.float32)
    p = 1 / (1 + np.exp(-(s + base)))
    g = rng.integers(0, 5, n)
    edges = metrics.quantile_bin_edges(p[rng.random(n) < 0.3])
    blocks = [metrics.BinaryScores(2, 5, edges).add(y[i:i + 7_000], p[i:i + 7_000], g[i:i + 7_000])
              for i in range(0, n, 7_000)]
    total = blocks[0]
    for b in blocks[1:]:
        total.merge(b)
    for k in range(2):
        assert total.rce(k) == pytest.approx(metrics.rce(y[:, k], p[:, k]), abs=1e-9)
        assert abs(total.ap(k) - metrics.average_precision(y[:, k], p[:, k])) < 1e-4
        exact = metrics.grouped(metrics.average_precision, y[:, k], p[:, k], g)["mean"]
        assert abs(total.grouped("ap", k)["mean"] - exact) < 1e-4
        by_rce = metrics.grouped(metrics.rce, y[:, k], p[:, k], g)
        assert total.grouped("rce", k) == pytest.approx(by_rce)
    curves = total.curves(0)
    assert curves["recall"][-1] == 1.0 and curves["precision"][-1] == pytest.approx(y[:, 0].mean())
    # Calibration by score decile: these scores are too flat (the labels follow 1.5 × the logit), so the
    # observed rate rises faster than the predicted one, and both are increasing.
    assert len(curves["predicted"]) == 10 and np.all(np.diff(curves["observed"]) > 0)
    assert curves["observed"][-1] > curves["predicted"][-1]
    assert np.isnan(metrics.BinaryScores(1, 5).add(np.zeros((3, 1)), np.full((3, 1), 0.2), np.zeros(3)).ap(0))


@pytest.mark.parametrize("n,bins", [(1_400, 8192), (1_400, 64), (300, 16), (20_000, 256)])
def test_ap_bounds_bracket_the_exact_ap_whatever_the_order_inside_a_bin(n, bins):
    """The bounds are AP with each bin's positives last and first: the exact AP (ties included, scores
    rounded so that many rows tie) lies between them, and so does the interleaved estimate. On a few
    hundred rows of a rare label the bracket is wide (why a fixed tolerance was wrong there)."""
    rng = np.random.default_rng(n + bins)
    s = rng.normal(size=(n, 1))
    y = (rng.random((n, 1)) < 1 / (1 + np.exp(-(2 * s - 3.5)))).astype(np.float32)
    p = np.round(1 / (1 + np.exp(-(s - 3))), 4)
    scores = metrics.BinaryScores(1, 1, metrics.quantile_bin_edges(p[: n // 2], bins)).add(y, p, np.zeros(n))
    lo, hi = scores.ap_bounds(0)
    exact = metrics.average_precision(y[:, 0], p[:, 0])
    assert lo - 1e-12 <= exact <= hi + 1e-12 and lo <= scores.ap(0) <= hi
    # Every row in one bin: the positives-last order below, every positive tied at the top above.
    one = metrics.BinaryScores(1, 1, np.empty((1, 0))).add(y, p, np.zeros(n))
    k, m = int(y.sum()), n
    last = np.mean([(i + 1) / (m - k + i + 1) for i in range(k)])
    assert one.ap_bounds(0) == pytest.approx((last, 1.0))


def test_ap_bounds_hold_a_tie_group_of_positives_which_beats_every_order():
    """Two negatives above two tied positives: sklearn credits both positives with precision 2/4 (AP 0.5),
    above the positives-first order's (1/3 + 2/4) / 2 — what XGBoost's tied leaf sums did to the old bound."""
    y, p = np.array([[0], [0], [1], [1]], np.float32), np.array([[0.9], [0.8], [0.5], [0.5]])
    exact = metrics.average_precision(y[:, 0], p[:, 0])
    assert exact == pytest.approx(0.5)
    for edges in (np.array([[0.6]]), np.array([[0.55, 0.85]]), np.empty((1, 0))):
        lo, hi = metrics.BinaryScores(1, 1, edges).add(y, p, np.zeros(4)).ap_bounds(0)
        assert lo - 1e-12 <= exact <= hi + 1e-12, (edges, lo, hi)


def _impressions(n: int, seed: int = 0) -> pa.Table:
    """Impression rows: ids, a time, one informative feature, four labels (like ~ 25 %, the others rare)."""
    import datetime as dt

    from engagesim.models.data import LABELS

    rng = np.random.default_rng(seed)
    x = rng.normal(size=n).astype(np.float32)
    p = 1 / (1 + np.exp(-(1.5 * x - 1.5)))
    labels = {c: (rng.random(n) < p * scale).astype(np.int8) for c, scale in zip(LABELS, [1, 0.1, 0.1, 0.05])}
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return pa.table({"user_id": [f"u{i % 301}" for i in range(n)], "post_id": [f"p{i % 997}" for i in range(n)],
                     "impression_at": pa.array([start + dt.timedelta(seconds=int(i)) for i in range(n)],
                                               pa.timestamp("us", "UTC")), "x": x, **labels})


def test_negative_sampling_keeps_engaged_rows_and_weights_the_rest():
    from engagesim.models.data import LABELS, WEIGHT, sample_negatives

    t = _impressions(20_000)
    engaged = np.any([t.column(c).to_numpy() > 0 for c in LABELS], axis=0)
    s = sample_negatives(t, 0.25, seed=3)
    w = s.column(WEIGHT).to_numpy()
    s_engaged = np.any([s.column(c).to_numpy() > 0 for c in LABELS], axis=0)
    assert s_engaged.sum() == engaged.sum() and np.all(w[s_engaged] == 1)  # every engaged row, weight 1
    assert np.allclose(w[~s_engaged], 4.0) and abs((~s_engaged).sum() / (~engaged).sum() - 0.25) < 0.02
    assert abs(w.sum() - t.num_rows) / t.num_rows < 0.02  # weighted, the sample counts as the log
    # the same rows whatever the block boundaries (streamed and in-memory paths agree), another seed others
    halves = pa.concat_tables([sample_negatives(t.slice(0, 7000), 0.25, 3), sample_negatives(t.slice(7000), 0.25, 3)])
    assert halves.column("impression_at").equals(s.column("impression_at"))
    assert not sample_negatives(t, 0.25, seed=4).column("impression_at").equals(s.column("impression_at"))
    assert sample_negatives(t, 1.0) is t


def test_weighted_models_on_sampled_rows_stay_calibrated():
    """Trained on a quarter of the negatives with weights 4, XGBoost and the NN predict the full log's
    rates (mean prediction within 10 % of the observed like rate); unweighted, XGBoost overshoots."""
    import xgboost

    from engagesim.models.data import WEIGHT, sample_negatives

    s = sample_negatives(_impressions(30_000), 0.25, seed=1)
    test = _impressions(20_000, seed=9)
    rate = test.column("y_like").to_numpy().mean()
    params = xgb.params_for("adobe", "binary:logistic", {"nthread": 1})
    booster = xgb.train_booster(xgb.dmatrix(s, ["x"], "y_like"), None, params, 30)
    weighted = xgb.predict(booster, matrix(test, ["x"]), ["x"]).mean()
    plain = xgboost.train(params, xgboost.DMatrix(matrix(s, ["x"]), label=s.column("y_like").to_numpy()), 30)
    unweighted = plain.predict(xgboost.DMatrix(matrix(test, ["x"]))).mean()
    assert abs(weighted / rate - 1) < 0.1 and unweighted / rate > 1.3
    x, y = matrix(s, ["x"]), s.column("y_like").to_numpy().astype(np.float32).reshape(-1, 1)
    mean, std = nn.fit_normaliser(x)
    model = nn.EngagementNet(nn.NNSpec(arch="layer6_mlp", n_inputs=1, n_outputs=1, hidden=[16, 16, 8, 8, 4], width=16,
                                       mean=mean, std=std, task="binary"))
    nn.train_epochs(model, x, y, epochs=4, batch_size=256, lr=3e-3, w=s.column(WEIGHT).to_numpy())
    assert abs(model.predict(matrix(test, ["x"])).mean() / rate - 1) < 0.1


def test_members_that_lose_to_the_best_baseline_leave_the_served_ensemble():
    from engagesim.config import load_config
    from engagesim.models.family import IMPRESSION, POST
    from engagesim.pipeline.train import _ensembles, _winners
    from engagesim.report import metric_rows

    rng = np.random.default_rng(0)
    n = 2000
    y = rng.normal(size=(n, 1))
    good, bad = y + rng.normal(0, 0.5, (n, 1)), 2 * rng.normal(size=(n, 1))
    base = {"account_mean": np.zeros(n)}  # RMSE ≈ 1; bad's ≈ 2.2
    kept, dropped = _winners(POST, {"good": good, "bad": bad, "also": y + rng.normal(0, 0.7, (n, 1))}, y, base,
                             lambda _: None)
    assert kept == [["good", "also"]] and list(dropped["log1p_likes"]) == ["bad"]
    assert "≥ account_mean" in dropped["log1p_likes"]["bad"]
    also = y + rng.normal(0, 0.7, (n, 1))
    specs, _, _, stacked, served = _ensembles(load_config(None, []), POST, {"good": good, "bad": bad, "also": also},
                                              y, kept)
    # Two members with independent errors: stacked beats either alone by far more than a standard error.
    assert sorted(specs["log1p_likes"]["members"]) == ["also", "good"] and np.array_equal(served, stacked)
    # Nobody beats the baseline: the best member is served alone (loss-weighted, weight 1).
    kept, _ = _winners(POST, {"bad": bad, "worse": 2 * bad}, y, base, lambda _: None)
    specs, _, weighted, _, served = _ensembles(load_config(None, []), POST, {"bad": bad, "worse": 2 * bad}, y, kept)
    assert kept == [["bad"]] and specs["log1p_likes"]["method"] == "loss_weighted"
    np.testing.assert_allclose(served, bad)
    # Impression level: the baseline is the validation rate; per engagement.
    labels = (rng.random((n, 4)) < 0.2).astype(float)
    informed = np.clip(0.6 * labels + 0.1, 0, 1)
    wrong = np.full((n, 4), 0.8)
    kept, dropped = _winners(IMPRESSION, {"informed": informed, "wrong": wrong}, labels, {}, lambda _: None)
    assert kept == [["informed"]] * 4 and set(dropped) == set(IMPRESSION.outputs)
    # The printed table says so.
    rows = metric_rows({"post_level": {"baselines": {"account_mean": {"rmse": 1.0}},
                                       "models": {"good": {"rmse": 0.5}, "bad": {"rmse": 2.2}},
                                       "ensemble": {"stacked": {"rmse": 0.45}, "loss_weighted": {"rmse": 0.48},
                                                    "served": "stacked", "dropped": {"log1p_likes": {"bad": "x"}}}}})
    notes = {r["model"]: r["note"] for r in rows}
    assert notes == {"account_mean": "baseline", "good": "", "bad": "loses to account_mean, dropped",
                     "ensemble:stacked": "served", "ensemble:loss_weighted": ""}


def test_the_one_standard_error_rule_serves_the_account_mean_unless_more_beats_it_clearly():
    """Few validation rows: a stacker that wins by noise is not served; many rows: a real gain is."""
    from engagesim.config import load_config
    from engagesim.models.family import POST
    from engagesim.pipeline.train import _ensembles

    rng = np.random.default_rng(1)
    for n, expect in ((40, "account_mean_eb"), (4000, "stacked")):
        truth = rng.normal(size=(n, 1))
        y = truth + rng.normal(0, 1.0, (n, 1))
        members = {"account_mean_eb": truth + rng.normal(0, 0.5, (n, 1)),
                   "xgb": truth + rng.normal(0, 0.45, (n, 1)), "knn": truth + rng.normal(0, 0.5, (n, 1))}
        specs, _, _, stacked, served = _ensembles(load_config(None, []), POST, members, y, [list(members)])
        spec = specs["log1p_likes"]
        if expect == "stacked":
            assert spec["method"] == "stacked" and np.array_equal(served, stacked)
        else:
            assert spec["members"] == [expect] and spec["chosen"] == "2-standard-error rule"
            np.testing.assert_array_equal(served, members[expect])


def test_the_standard_error_rule_needs_k_standard_errors_of_evidence():
    """A member 1.5 standard errors better than the account mean on validation: chosen at k = 1, not at k = 2."""
    from engagesim.pipeline.train import _simplest_within_se

    rng = np.random.default_rng(3)
    n = 40
    y = np.zeros(n)
    base_err = rng.normal(0, 1, n)
    d = rng.normal(0, 1, n)
    d = (d - d.mean()) / d.std(ddof=1)  # paired differences of squared errors: mean 0, sd 1 …
    d = d + 1.5 / np.sqrt(n)  # … then a mean of 1.5 standard errors
    a = np.sqrt(base_err ** 2 + 10)  # the account mean's squared error: base² + 10 (always positive)
    x = np.sqrt(a ** 2 - d)  # xgb's squared error is 1.5 SE below it on average
    members = {"account_mean_eb": y + a, "xgb": y + x}
    for k, expect in ((1.0, "xgb"), (2.0, "account_mean_eb"), (0.0, "xgb")):
        assert _simplest_within_se(y, members, y + x, "stacked", k) == expect


def test_the_stacker_weights_are_not_negative():
    """Correlated members on few rows: a free ridge trades them against each other; ours may not."""
    rng = np.random.default_rng(2)
    truth = rng.normal(size=60)
    y = truth + rng.normal(0, 1, 60)
    shared = rng.normal(0, 0.3, 60)
    preds = {"a": truth + shared, "b": truth + shared + rng.normal(0, 0.05, 60), "c": truth + rng.normal(0, 0.8, 60)}
    _, model, names = ensemble.stacked_cv(preds, y, "regression")
    assert names == ["a", "b", "c"] and (model.coef_ >= 0).all()


def test_served_members_follow_the_ensemble_predict_applies():
    from engagesim.models.bundle import ImpressionModels, PostModels

    def level(cls, ensemble, members):
        models = object.__new__(cls)
        models.ensemble, models.loaded = ensemble, dict.fromkeys(members)
        return models

    kept = ["xgb", "nn", "stacked_mlp", "author_mean"]
    regimes = {"regimes": {"seen": {"members": ["xgb"]}, "new": {"members": ["author_mean"]}},
               "members": ["xgb", "nn"]}
    assert level(PostModels, regimes, kept).served_members() == {"xgb", "author_mean"}
    # The stacked MLP reads XGBoost's prediction: served, it brings XGBoost along.
    assert level(PostModels, {"members": ["stacked_mlp"]}, kept).served_members() == {"stacked_mlp", "xgb"}
    # A member of the ensemble missing from the run: predict falls back to the first member, and so does this.
    assert level(PostModels, {"members": ["nn", "knn"]}, kept).served_members() == {"xgb"}
    # ...and where what a member reads is missing (a stacked MLP without its XGBoost): predict cannot apply it.
    assert level(PostModels, {"members": ["stacked_mlp"]}, ["nn", "stacked_mlp"]).served_members() == {"nn"}
    engagements = {"engagements": {"like": {"members": ["xgb"]}, "reply": {"members": ["xgb", "nn"]}}}
    assert level(ImpressionModels, engagements, ["xgb", "nn", "slm"]).served_members() == {"xgb", "nn"}
    # The impression level applies per-engagement ensembles only: a top-level member list is not its ensemble.
    assert level(ImpressionModels, {"members": ["nn"]}, ["xgb", "nn"]).served == ("member", "xgb", {"xgb"})


def test_account_regimes_get_their_own_ensembles_and_route_by_the_encoding_count():
    """The validation rows of accounts with labelled posts and of new accounts choose apart; each served
    prediction follows its row's regime."""
    import pyarrow as pa

    from engagesim.config import load_config
    from engagesim.models.bundle import apply_ensemble
    from engagesim.models.family import POST
    from engagesim.pipeline.train import REGIME_MIN_ROWS, _ensembles, _regime_ensembles

    rng = np.random.default_rng(3)
    n = 600
    seen = rng.random(n) < 0.5
    y = rng.normal(size=(n, 1))
    # "account" is right for seen accounts only, "content" for new ones only.
    account = np.where(seen[:, None], y + rng.normal(0, 0.2, (n, 1)), rng.normal(size=(n, 1)))
    content = np.where(~seen[:, None], y + rng.normal(0, 0.2, (n, 1)), rng.normal(size=(n, 1)))
    preds = {"account_mean_eb": account, "xgb": content}
    valid = pa.table({"te_author_id_n": np.where(seen, 2.0, 0.0)})
    cfg = load_config(None, [])
    _, _, _, _, served = _ensembles(cfg, POST, preds, y, [list(preds)])
    pooled = float(np.sqrt(np.mean((served - y) ** 2)))
    regimes = _regime_ensembles(cfg, POST, valid, preds, y, {}, served, lambda _: None)
    assert set(regimes) == {"seen", "new"} and regimes["seen"]["rows"] == seen.sum()
    routed = float(np.sqrt(np.mean((served - y) ** 2)))
    assert routed < 0.3 < pooled  # each regime trusts its own member
    flat = {k: v[:, 0] for k, v in preds.items()}
    again = np.where(seen, apply_ensemble(regimes["seen"], flat), apply_ensemble(regimes["new"], flat))
    np.testing.assert_allclose(again, served[:, 0], rtol=1e-5, atol=1e-5)  # what PostModels.predict computes
    few = pa.table({"te_author_id_n": np.r_[np.ones(REGIME_MIN_ROWS - 1), np.zeros(n - REGIME_MIN_ROWS + 1)]})
    assert _regime_ensembles(cfg, POST, few, preds, y, {}, served.copy(), lambda _: None) == {}


def test_xgboost_boosts_from_the_account_company_global_mean():
    """The post-level margin: the account's posts shrunk towards its company's mean (a new account: the
    company's); the trees fit what is left."""
    import pyarrow as pa

    from engagesim.features.post_fit import hierarchical
    from engagesim.models.data import account_prior
    from engagesim.models.families.xgb import RESIDUAL, _residual

    sums, counts, company = np.array([6.0, 0.0, 4.0]), np.array([2.0, 0.0, 1.0]), np.array([1.0, 2.0, 9.0])
    hier = hierarchical(sums, counts, company, smoothing=1.0)
    np.testing.assert_allclose(hier, [7 / 3, 2.0, 6.5])  # (Σy + m·company) / (n + m)
    table = pa.table({"te_author_id": [3.0, 5.0, 4.0], "te_author_id_hier": hier, "label_log1p_likes": [4.0] * 3})
    np.testing.assert_array_equal(account_prior(table), hier)
    np.testing.assert_allclose(_residual(table, "label_log1p_likes").column(RESIDUAL).to_numpy(), 4.0 - hier)
    assert account_prior(table.drop_columns(["te_author_id_hier"])).tolist() == [3.0, 5.0, 4.0]  # older runs
    assert account_prior(pa.table({"x": [1.0]})) is None


def test_streamed_scoring_applies_an_output_without_a_stacker_as_its_weighted_mean():
    """An engagement whose validation kept one member has no stacker (pipeline/train.py::_ensembles scores its
    "stacked" as the loss-weighted mean); the streamed scorer does the same instead of failing (a foreign
    RecSys world's run hit KeyError 'stacker' here)."""
    from engagesim.models.bundle import apply_ensemble
    from engagesim.pipeline.validation import as_method

    preds = {"xgb": np.array([0.2, 0.7]), "nn": np.array([0.4, 0.1])}
    alone = {"method": "loss_weighted", "task": "binary", "members": ["xgb"], "weights": {"xgb": 1.0}}
    for method in ("loss_weighted", "stacked"):
        np.testing.assert_allclose(apply_ensemble(as_method(alone, method), preds), preds["xgb"])
    stacked = {**alone, "members": ["xgb", "nn"], "weights": {"xgb": 0.5, "nn": 0.5},
               "stacker": {"coef": [1.0, 0.0], "intercept": 0.0}}
    np.testing.assert_allclose(apply_ensemble(as_method(stacked, "stacked"), preds), preds["xgb"], rtol=1e-6)
    np.testing.assert_allclose(apply_ensemble(as_method(stacked, "loss_weighted"), preds), [0.3, 0.4])
