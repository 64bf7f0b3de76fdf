"""Hyperparameter search with Ray Tune: XGBoost boosters on a feature table, ASHA early stopping.

Each trial is plain in-process xgboost (trials run in parallel across the
cluster; the data is shared through the object store), reporting the
validation loss every ``report_every`` rounds so ASHA can stop poor trials
early. Experiments are resumable (``Tuner.restore`` when the experiment
directory exists), and the best configuration is written back as a YAML
overlay that ``load_config`` / ``engagesim pipeline behaviour --config`` accept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import yaml

from engagesim import io
from engagesim.config import AppConfig
from engagesim.models import xgb
from engagesim.models.data import feature_columns, rows_of_split


def xgb_space() -> dict[str, Any]:
    from ray import tune

    return {
        "eta": tune.loguniform(0.02, 0.3),
        "max_depth": tune.randint(3, 11),
        "subsample": tune.uniform(0.6, 1.0),
        "colsample_bytree": tune.uniform(0.4, 1.0),
        "min_child_weight": tune.loguniform(1.0, 50.0),
    }


def _trial(config: dict, data: Any, base: dict, rounds: int, report_every: int) -> None:
    from ray import tune

    dtrain, dvalid = (xgb.xgb.DMatrix(x, label=y, missing=np.nan) for x, y in data)
    params = {**base, **config}
    xgb.train_booster(dtrain, dvalid, params, rounds,
                      callbacks=[xgb.ReportEveryK(report_every, checkpoint=False, report=tune.report)])


def tune_xgb(cfg: AppConfig, features_uri: str, out_yaml: str, storage_path: str, name: str = "tune_xgb",
             level: str = "impression", engagement: str = "like", num_samples: int = 8, rounds: int = 200,
             report_every: int = 10, seed: int = 0) -> dict[str, Any]:
    """Search XGBoost parameters; write the best as a config overlay; return the best config and scores."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from engagesim.models.data import matrix
    from engagesim.runtime import ensure_ray

    ensure_ray(cfg.ray)
    table = io.read_table(io.join(features_uri, "impressions" if level == "impression" else "posts"), cfg.storage)
    label = f"y_{engagement}" if level == "impression" else "label_log1p_likes"
    if level == "post":
        table = table.filter(pc.invert(pc.is_nan(table.column(label))))
    features = feature_columns(table.schema)
    parts = [rows_of_split(table, "train"), rows_of_split(table, "valid")]  # the test rows stay untouched
    data = [(matrix(t, features), t.column(label).to_numpy(zero_copy_only=False).astype(np.float32)) for t in parts]
    objective = "binary:logistic" if level == "impression" else "reg:squarederror"
    base = xgb.params_for(cfg.train.xgb.preset, objective, {"nthread": 1, "seed": seed})
    metric = "valid-" + base["eval_metric"]
    # with_parameters puts the matrices in the object store once; every trial reads the same copy.
    trainable = tune.with_parameters(_trial, data=data, base=base, rounds=rounds,
                                     report_every=report_every)
    trainable = tune.with_resources(trainable, {"cpu": 1})
    experiment = str(Path(storage_path).resolve() / name)
    if tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=xgb_space(),
            tune_config=tune.TuneConfig(
                metric=metric, mode="min", num_samples=num_samples,
                scheduler=ASHAScheduler(max_t=max(rounds // report_every, 1),
                                        grace_period=min(3, max(rounds // report_every, 1)), reduction_factor=2),
                # The preset itself is the first trial, so the search can only match or beat it.
                search_alg=tune.search.BasicVariantGenerator(
                    random_state=seed, points_to_evaluate=[{k: base[k] for k in xgb_space()}]),
            ),
            run_config=tune.RunConfig(name=name, storage_path=str(Path(storage_path).resolve()), verbose=0),
        )
    results = tuner.fit()
    best = results.get_best_result(metric=metric, mode="min")
    best_params = {k: (float(v) if isinstance(v, (float, np.floating)) else int(v)) for k, v in best.config.items()}
    overlay = {"train": {"xgb": {"preset": cfg.train.xgb.preset, "params": best_params, "rounds": rounds}}}
    Path(out_yaml).parent.mkdir(parents=True, exist_ok=True)
    Path(out_yaml).write_text(yaml.safe_dump(overlay, sort_keys=True))
    scores = [r.metrics.get(metric) for r in results if r.metrics and metric in r.metrics]
    return {"best": best_params, "best_score": float(best.metrics[metric]), "metric": metric,
            "trials": len(results), "scores": [float(s) for s in scores], "config": out_yaml,
            "experiment": experiment}
