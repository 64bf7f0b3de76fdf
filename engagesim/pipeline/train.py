"""The training stage: feature tables → fitted models, validation predictions, metrics.

(config, features URI[, truth URI]) → ``<run>/models/...`` and metrics. Post level:
XGBoost regression on log1p(likes), the FAISS kNN regressor, an MLP; impression
level: one XGBoost booster per engagement and a multi-task network. Every
family is scored on the held-out (later-in-time) split against baselines and,
on synthetic data, against the oracle; then ensembled by validation loss and
by a cross-validated stacker.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from engagesim import io
from engagesim.config import AppConfig
from engagesim.metrics import (
    average_precision,
    cross_entropy_sum,
    grouped,
    popularity_groups,
    quantile_edges,
    rce,
    rmse,
)
from engagesim.models import ensemble, knn, nn, xgb
from engagesim.models.bundle import embedding_matrix, ensemble_spec, knn_predict, stack_image_columns
from engagesim.models.data import LABELS, feature_columns, matrix
from engagesim.pipeline.train_slm import fit_slm_family
from engagesim.schema import ENGAGEMENTS


def _split(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    is_train = pc.equal(table.column("split"), "train")
    return table.filter(is_train), table.filter(pc.invert(is_train))


def _nn_spec(cfg: AppConfig, x: np.ndarray, n_outputs: int, task: str) -> nn.NNSpec:
    mean, std = nn.fit_normaliser(x)
    c = cfg.train.nn
    return nn.NNSpec(arch=c.arch, n_inputs=x.shape[1], n_outputs=n_outputs, task=task,
                     hidden=list(nn.LAYER6_PRESETS[c.layer6_preset]), dropout=c.dropout, width=c.width,
                     fourier_scales=cfg.features.fourier_scales, mean=mean, std=std)


def _fit_nn(cfg: AppConfig, train: pa.Table, features: list[str], labels: list[str], task: str, storage: str,
            name: str, time_column: str) -> tuple[nn.EngagementNet, dict]:
    """Stage 1 on Ray Train (DDP); stage 2, when configured, fine-tunes on the most recent training rows."""
    x = matrix(train, features)
    spec = _nn_spec(cfg, x, len(labels), task)
    c = cfg.train.nn
    batch = c.batch_size or nn.default_batch(train.num_rows, c.workers)
    model = nn.fit_ray(train, features, labels, spec, storage, name, epochs=c.epochs, batch_size=batch, lr=c.lr,
                       workers=c.workers, use_gpu=_gpu(), deepspeed=c.deepspeed)
    info: dict = {}
    if c.finetune_hours > 0:
        times = pc.cast(train.column(time_column), pa.int64()).to_numpy(zero_copy_only=False)
        recent = times >= times.max() - int(c.finetune_hours * 3600 * 1e6)
        y = np.column_stack([train.column(col).to_numpy(zero_copy_only=False) for col in labels]).astype(np.float32)
        losses = nn.train_epochs(model, x[recent], y[recent], epochs=c.finetune_epochs,
                                 batch_size=min(batch, max(int(recent.sum()) // 10, 32)), lr=c.lr * c.finetune_lr_scale)
        model.eval()
        info = {"finetune_rows": int(recent.sum()), "finetune_loss": losses}
    return model, info


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# --- post level ---------------------------------------------------------------------------------

def train_post_level(cfg: AppConfig, posts_uri: str, models_dir: str, truth_uri: str | None = None,
                     log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    table = io.read_table(posts_uri, cfg.storage)
    labelled = table.filter(pc.invert(pc.is_nan(table.column("label_log1p_likes"))))
    train, valid = _split(labelled)
    if train.num_rows < 10 or valid.num_rows < 2:
        return {"skipped": f"too few labelled posts (train {train.num_rows}, valid {valid.num_rows})"}
    y_tr = train.column("label_log1p_likes").to_numpy()
    y_va = valid.column("label_log1p_likes").to_numpy()
    features = feature_columns(table.schema)
    result: dict[str, Any] = {"rows": {"train": train.num_rows, "valid": valid.num_rows}, "features": len(features)}

    baselines = {"global_mean": np.full(len(y_va), y_tr.mean())}
    acct = pl.DataFrame({"a": train.column("author_id").to_pylist(), "y": y_tr}).group_by("a").agg(pl.col("y").mean())
    per = pl.DataFrame({"a": valid.column("author_id").to_pylist()}).join(acct, on="a", how="left", maintain_order="left")
    baselines["account_mean"] = per["y"].fill_null(y_tr.mean()).to_numpy()
    result["baselines"] = {k: {"rmse": rmse(y_va, v)} for k, v in baselines.items()}

    preds: dict[str, np.ndarray] = {}
    timings = {}
    if "xgb" in cfg.train.models:
        t = time.perf_counter()
        params = xgb.params_for(cfg.train.xgb.preset, "reg:squarederror",
                                {"nthread": cfg.train.xgb.cpus_per_worker, **cfg.train.xgb.params}, _gpu())
        booster = xgb.fit_ray(train, valid, features, "label_log1p_likes", params, cfg.train.xgb.rounds,
                              io.join(models_dir, "ray"), "post_xgb", cfg.train.xgb.workers,
                              cfg.train.xgb.checkpoint_every, cfg.train.xgb.early_stopping, use_gpu=_gpu(),
                              cpus_per_worker=cfg.train.xgb.cpus_per_worker)
        xgb.save(booster, io.join(models_dir, "post", "xgb.ubj"), features, {"task": "regression"})
        preds["xgb"] = xgb.predict(booster, valid, features)
        timings["xgb"] = time.perf_counter() - t
        importance = booster.get_score(importance_type="gain")
        result["xgb_top_features"] = dict(sorted(importance.items(), key=lambda kv: -kv[1])[:15])
        log(f"post xgb: rmse {rmse(y_va, preds['xgb']):.4f}")
    if "stacked_mlp" in cfg.train.models and "xgb" in preds:
        t = time.perf_counter()
        preds["stacked_mlp"] = _smp_stacked_mlp(cfg, train, valid, features, y_tr, preds["xgb"], models_dir)
        timings["stacked_mlp"] = time.perf_counter() - t
        log(f"post stacked mlp: rmse {rmse(y_va, preds['stacked_mlp']):.4f}")
    if "knn" in cfg.train.models and cfg.train.knn.embedding in table.column_names:
        t = time.perf_counter()
        vec_tr, ok_tr = embedding_matrix(train, cfg.train.knn.embedding)
        if ok_tr.sum() >= cfg.train.knn.k:
            model = knn.KNNRegressor(cfg.train.knn.k, cfg.train.knn.ivf_threshold).fit(vec_tr[ok_tr], y_tr[ok_tr])
            model.save(io.join(models_dir, "post", "knn"))
            io.write_json(io.join(models_dir, "post", "knn", "column.json"), {"column": cfg.train.knn.embedding})
            preds["knn"] = knn_predict(model, valid, cfg.train.knn.embedding)
            timings["knn"] = time.perf_counter() - t
            log(f"post knn: rmse {rmse(y_va, preds['knn']):.4f}")
    if "nn" in cfg.train.models:
        t = time.perf_counter()
        model, info = _fit_nn(cfg, train, features, ["label_log1p_likes"], "regression", io.join(models_dir, "ray"),
                              "post_nn", "created_at")
        result["nn_two_stage"] = info or None
        nn.save(model, io.join(models_dir, "post", "nn"), features)
        preds["nn"] = model.predict(matrix(valid, features))[:, 0]
        timings["nn"] = time.perf_counter() - t
        log(f"post nn: rmse {rmse(y_va, preds['nn']):.4f}")

    if "slm" in cfg.train.models:
        t = time.perf_counter()
        slm_preds, result["slm"] = fit_slm_family(cfg, train, valid, features, ["label_log1p_likes"], "regression",
                                                  "text", "created_at", io.join(models_dir, "post"),
                                                  io.join(models_dir, "ray"), "post", _gpu(), log)
        for name, p in slm_preds.items():
            preds[name] = p[:, 0]
            timings[name] = time.perf_counter() - t
            log(f"post {name}: rmse {rmse(y_va, preds[name]):.4f}")

    result["models"] = {k: {"rmse": rmse(y_va, v), "seconds": round(timings[k], 1)} for k, v in preds.items()}
    if preds:
        weights = ensemble.loss_weights({k: rmse(y_va, v) for k, v in preds.items()})
        if len(preds) >= 2:
            stacked, stacker, names = ensemble.stacked_cv(preds, y_va, "regression")
            result["ensemble"] = {"loss_weighted": {"rmse": rmse(y_va, ensemble.weighted(preds, weights)),
                                                    "weights": weights},
                                  "stacked": {"rmse": rmse(y_va, stacked)}, "served": cfg.train.ensemble}
            spec = ensemble_spec(cfg.train.ensemble, weights, stacker, names, "regression")
            served = stacked if cfg.train.ensemble == "stacked" else ensemble.weighted(preds, weights)
        else:
            spec = {"method": "loss_weighted", "task": "regression", "members": list(preds), "weights": weights}
            served = next(iter(preds.values()))
        # An 80 % interval from the (out-of-fold) validation residuals of what is served.
        residual = y_va - served
        spec["residual_quantiles"] = {"q10": float(np.quantile(residual, 0.1)),
                                      "q90": float(np.quantile(residual, 0.9))}
        io.write_json(io.join(models_dir, "post", "ensemble.json"), spec)
    if truth_uri:
        truth = pl.from_arrow(io.read_table(truth_uri, cfg.storage, columns=["post_id", "expected_log1p_likes"]))
        joined = pl.DataFrame({"post_id": valid.column("post_id").to_pylist()}).join(truth, on="post_id", how="left",
                                                                                    maintain_order="left")
        result["oracle"] = {"rmse": rmse(y_va, joined["expected_log1p_likes"].to_numpy())}
    return result


def _smp_stacked_mlp(cfg: AppConfig, train: pa.Table, valid: pa.Table, features: list[str], y_tr: np.ndarray,
                     xgb_valid: np.ndarray, models_dir: str) -> np.ndarray:
    """SMP 2019: an MLP on [XGBoost prediction, image embedding (PCA) + the five image features].

    The XGBoost input of the training rows is out-of-fold (3 time-ordered folds, in-process boosters),
    so the MLP never learns from predictions made on rows the booster was fit on.
    """
    image_cols = stack_image_columns(features)
    params = xgb.params_for(cfg.train.xgb.preset, "reg:squarederror",
                            {"nthread": cfg.train.xgb.cpus_per_worker, **cfg.train.xgb.params})
    folds = np.arange(train.num_rows) * 3 // max(train.num_rows, 1)
    oof = np.zeros(train.num_rows, dtype=np.float32)
    for k in range(3):
        fit_idx, out_idx = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        fit_t, out_t = train.take(pa.array(fit_idx)), train.take(pa.array(out_idx))
        booster = xgb.train_booster(xgb.dmatrix(fit_t, features, "label_log1p_likes"), None, params,
                                    min(cfg.train.xgb.rounds, 150))
        oof[out_idx] = xgb.predict(booster, out_t, features)
    x_tr = np.column_stack([oof, matrix(train, image_cols)]) if image_cols else oof[:, None]
    x_va = np.column_stack([xgb_valid, matrix(valid, image_cols)]) if image_cols else xgb_valid[:, None]
    mean, std = nn.fit_normaliser(x_tr)
    spec = nn.NNSpec(arch="layer6_mlp", n_inputs=x_tr.shape[1], n_outputs=1, task="regression",
                     hidden=[64, 32], dropout=0.1, mean=mean, std=std)
    model = nn.EngagementNet(spec)
    nn.train_epochs(model, x_tr.astype(np.float32), y_tr.reshape(-1, 1).astype(np.float32), epochs=30,
                    batch_size=256, lr=1e-3)
    nn.save(model, io.join(models_dir, "post", "stacked_mlp"), ["xgb_prediction", *image_cols])
    return model.predict(x_va.astype(np.float32))[:, 0]


# --- impression level ---------------------------------------------------------------------------

def _impression_metrics(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    out = {}
    for k, e in enumerate(ENGAGEMENTS):
        out[e] = {"ap": average_precision(y[:, k], p[:, k]), "rce": rce(y[:, k], p[:, k]),
                  "rce_by_popularity": grouped(rce, y[:, k], p[:, k], groups)["mean"],
                  "ap_by_popularity": grouped(average_precision, y[:, k], p[:, k], groups)["mean"]}
    return out


def train_impression_level(cfg: AppConfig, impressions_uri: str, models_dir: str, truth_uri: str | None = None,
                           log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    table = io.read_table(impressions_uri, cfg.storage)
    train, valid = _split(table)
    if train.num_rows < 100 or valid.num_rows < 10:
        return {"skipped": f"too few impressions (train {train.num_rows}, valid {valid.num_rows})"}
    features = feature_columns(table.schema)
    y_va = np.column_stack([valid.column(c).to_numpy(zero_copy_only=False) for c in LABELS]).astype(np.float32)
    creator_followers = valid.column("creator_follower_count").to_numpy(zero_copy_only=False)
    edges = quantile_edges(train.column("creator_follower_count").to_numpy(zero_copy_only=False), 5)
    groups = popularity_groups(np.nan_to_num(creator_followers), edges)
    result: dict[str, Any] = {"rows": {"train": train.num_rows, "valid": valid.num_rows}, "features": len(features)}

    preds: dict[str, np.ndarray] = {}
    if "xgb" in cfg.train.models:
        t = time.perf_counter()
        params = xgb.params_for(cfg.train.xgb.preset, "binary:logistic",
                                {"nthread": cfg.train.xgb.cpus_per_worker, **cfg.train.xgb.params}, _gpu())
        out = np.zeros_like(y_va)
        for k, e in enumerate(ENGAGEMENTS):
            booster = xgb.fit_ray(train, valid, features, f"y_{e}", params, cfg.train.xgb.rounds,
                                  io.join(models_dir, "ray"), f"impression_xgb_{e}", cfg.train.xgb.workers,
                                  cfg.train.xgb.checkpoint_every, cfg.train.xgb.early_stopping, use_gpu=_gpu(),
                                  cpus_per_worker=cfg.train.xgb.cpus_per_worker)
            xgb.save(booster, io.join(models_dir, "impression", f"xgb_{e}.ubj"), features, {"engagement": e})
            out[:, k] = xgb.predict(booster, valid, features)
        preds["xgb"] = out
        log(f"impression xgb: {time.perf_counter() - t:.1f}s")
    if "nn" in cfg.train.models:
        t = time.perf_counter()
        model, info = _fit_nn(cfg, train, features, LABELS, "binary", io.join(models_dir, "ray"), "impression_nn",
                              "impression_at")
        result["nn_two_stage"] = info or None
        nn.save(model, io.join(models_dir, "impression", "nn"), features)
        preds["nn"] = model.predict(matrix(valid, features))
        log(f"impression nn: {time.perf_counter() - t:.1f}s")

    if "slm" in cfg.train.models:
        t = time.perf_counter()
        slm_preds, result["slm"] = fit_slm_family(cfg, train, valid, features, LABELS, "binary", "post_text",
                                                  "impression_at", io.join(models_dir, "impression"),
                                                  io.join(models_dir, "ray"), "impression", _gpu(), log)
        preds.update(slm_preds)
        log(f"impression slm: {time.perf_counter() - t:.1f}s")

    result["models"] = {name: _impression_metrics(y_va, p, groups) for name, p in preds.items()}
    if len(preds) >= 2:
        weighted = np.zeros_like(y_va)
        stacked = np.zeros_like(y_va)
        weights_by_engagement, specs = {}, {}
        for k, e in enumerate(ENGAGEMENTS):
            member = {name: p[:, k] for name, p in preds.items()}
            losses = {name: cross_entropy_sum(y_va[:, k], v) / len(v) for name, v in member.items()}
            w = ensemble.loss_weights(losses)
            weights_by_engagement[e] = w
            weighted[:, k] = ensemble.weighted(member, w)
            stacked[:, k], stacker, names = ensemble.stacked_cv(member, y_va[:, k], "binary")
            specs[e] = ensemble_spec(cfg.train.ensemble, w, stacker, names, "binary")
        result["ensemble"] = {"loss_weighted": _impression_metrics(y_va, weighted, groups),
                              "stacked": _impression_metrics(y_va, stacked, groups),
                              "weights": weights_by_engagement, "served": cfg.train.ensemble}
        io.write_json(io.join(models_dir, "impression", "ensemble.json"), {"engagements": specs})
    if truth_uri:
        truth = pl.from_arrow(io.read_table(truth_uri, cfg.storage,
                                            columns=["user_id", "post_id", "impression_at",
                                                     *[f"p_{e}" for e in ENGAGEMENTS]]))
        keys = pl.from_arrow(valid.select(["user_id", "post_id", "impression_at"]))
        joined = keys.join(truth, on=["user_id", "post_id", "impression_at"], how="left", maintain_order="left")
        p_true = np.column_stack([joined[f"p_{e}"].to_numpy() for e in ENGAGEMENTS])
        result["oracle"] = _impression_metrics(y_va, p_true, groups)
    return result
