"""Training overhead: XGBoost on Ray Train vs plain in-process xgboost.train, and NN samples/s.

Same 1M-row table, same parameters and rounds on both sides; the ratio is
Ray Train wall time / plain wall time (goal ≤ 1.3). Rounds default to the
pipeline's own ``train.xgb.rounds``, because Ray Train's cost is mostly fixed
(starting the worker group, reading the shard, collecting the result), so the
ratio depends on how long the fit is; ``overhead_seconds`` reports that fixed
part directly. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
from common import emit  # noqa: E402

from engagesim.config import AppConfig, RayConfig  # noqa: E402
from engagesim.models import nn, xgb  # noqa: E402
from engagesim.models.data import matrix  # noqa: E402


def table(rows: int, cols: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, cols)).astype(np.float32)
    logit = x[:, :5] @ rng.normal(size=5) + 0.5 * x[:, 5] * x[:, 6]
    y = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return pa.table({**{f"f{i}": x[:, i] for i in range(cols)}, "y": y})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cols", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=AppConfig().train.xgb.rounds,
                        help="Boosting rounds on both sides (default: the pipeline's train.xgb.rounds).")
    args = parser.parse_args()
    data = table(args.rows, args.cols)
    features = [f"f{i}" for i in range(args.cols)]
    params = xgb.params_for("layer6", "binary:logistic", {"nthread": 2})

    start = time.perf_counter()
    booster = xgb.train_booster(xgb.dmatrix(data, features, "y"), None, params, args.rounds)
    plain = time.perf_counter() - start
    emit(bench="xgb_plain", rows=args.rows, rounds=args.rounds, seconds=round(plain, 2))

    from engagesim.runtime import ensure_ray

    ensure_ray(RayConfig(num_cpus=2))  # the embedded Ray exactly as the pipeline starts it
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ray_booster = xgb.fit_ray(data, None, features, "y", params, args.rounds, tmp, "bench", workers=1,
                                  checkpoint_every=50, early_stopping=None, cpus_per_worker=2)
        on_ray = time.perf_counter() - start
    assert ray_booster.num_boosted_rounds() == booster.num_boosted_rounds()
    emit(bench="xgb_ray_train", rows=args.rows, rounds=args.rounds, seconds=round(on_ray, 2),
         baseline_seconds=round(plain, 2), ratio=round(on_ray / plain, 3),
         overhead_seconds=round(on_ray - plain, 2))

    x = matrix(data, features)
    y = data.column("y").to_numpy().reshape(-1, 1)
    mean, std = nn.fit_normaliser(x[:100_000])
    for arch in ("layer6_mlp", "synerise_ffn"):
        spec = nn.NNSpec(arch=arch, n_inputs=args.cols, n_outputs=1, width=256, mean=mean, std=std)
        model = nn.EngagementNet(spec)
        n = min(len(x), 200_000)
        start = time.perf_counter()
        nn.train_epochs(model, x[:n], y[:n], epochs=1, batch_size=4096, lr=1e-3)
        emit(bench="nn_train", arch=arch, samples_per_s=round(n / (time.perf_counter() - start)))
        start = time.perf_counter()
        model.predict(x[:n])
        emit(bench="nn_predict", arch=arch, samples_per_s=round(n / (time.perf_counter() - start)))
    ray.shutdown()


if __name__ == "__main__":
    main()
