"""The training stage: feature tables → fitted models, validation predictions, metrics.

(config, features URI[, truth URI]) → ``<run>/models/<level>/...`` and metrics. One loop for both levels
(post: log1p(likes); impression: P(like/reply/retweet/quote)) over the registered model families that
``train.models`` names (``models/families``). Every member is scored on the held-out (later-in-time)
split against baselines and, on synthetic data, against the oracle; then ensembled by validation loss and
by a cross-validated stacker. ``ensemble.json`` records the served ensemble and which family made each
member, so the bundle loads exactly what was trained.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from engagesim import datasets, io
from engagesim.config import AppConfig
from engagesim.metrics import (
    AP_FROM_BINS,
    average_precision,
    cross_entropy_sum,
    grouped,
    popularity_groups,
    quantile_edges,
    rce,
    rmse,
)
from engagesim.models import distributed, ensemble
from engagesim.models.bundle import ensemble_spec
from engagesim.models.data import feature_columns, label_matrix, rows_of_split, sample_negatives
from engagesim.models.distributed import Resources
from engagesim.models.family import IMPRESSION, POST, FitContext, Level, family_names, get_family, gpu_available
from engagesim.pipeline import validation
from engagesim.runtime import ensure_ray
from engagesim.schema import ENGAGEMENTS

LevelScore = Callable[[np.ndarray], dict[str, Any]]


def _split(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(train, valid); the test rows stay for the evaluation stage."""
    return rows_of_split(table, "train"), rows_of_split(table, "valid")


def _impression_metrics(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    out = {}
    for k, e in enumerate(ENGAGEMENTS):
        out[e] = {"ap": average_precision(y[:, k], p[:, k]), "rce": rce(y[:, k], p[:, k]),
                  "rce_by_popularity": grouped(rce, y[:, k], p[:, k], groups)["mean"],
                  "ap_by_popularity": grouped(average_precision, y[:, k], p[:, k], groups)["mean"]}
    return out


def _popularity_edges(train: pa.Table | None, valid: pa.Table) -> np.ndarray:
    """Creator follower quintiles of the training rows (of the validation rows when training streams)."""
    return quantile_edges((train if train is not None else valid).column("creator_follower_count")
                          .to_numpy(zero_copy_only=False), validation.GROUPS)


def _scorer(level: Level, edges: np.ndarray | None, valid: pa.Table, y: np.ndarray) -> LevelScore:
    """The level's validation metrics of an (n, outputs) prediction, by popularity group at impression level."""
    if level is POST:
        return lambda p: {"rmse": rmse(y[:, 0], p[:, 0])}
    groups = popularity_groups(np.nan_to_num(valid.column("creator_follower_count").to_numpy(zero_copy_only=False)),
                               edges)
    return lambda p: _impression_metrics(y, p, groups)


def _loss(level: Level, y: np.ndarray, p: np.ndarray) -> float:
    return rmse(y, p) if level.task == "regression" else cross_entropy_sum(y, p) / len(p)


def post_baseline_predictions(train: pa.Table, valid: pa.Table) -> dict[str, np.ndarray]:
    """The training mean, and each account's training mean (the global one for a new account), per row."""
    y_tr = train.column("label_log1p_likes").to_numpy()
    out = {"global_mean": np.full(valid.num_rows, y_tr.mean())}
    acct = pl.DataFrame({"a": train.column("author_id").to_pylist(), "y": y_tr}).group_by("a").agg(pl.col("y").mean())
    per = pl.DataFrame({"a": valid.column("author_id").to_pylist()}).join(acct, on="a", how="left", maintain_order="left")
    out["account_mean"] = per["y"].fill_null(y_tr.mean()).to_numpy()
    return out


def post_baselines(train: pa.Table, valid: pa.Table) -> dict[str, dict]:
    """RMSE of each of ``post_baseline_predictions`` on ``valid``."""
    y_va = valid.column("label_log1p_likes").to_numpy()
    return {k: {"rmse": rmse(y_va, v)} for k, v in post_baseline_predictions(train, valid).items()}


def _winners(level: Level, preds: dict[str, np.ndarray], y: np.ndarray, baselines: dict[str, np.ndarray],
             log: Callable[[str], None]) -> tuple[list[list[str]], dict[str, dict[str, str]]]:
    """Per output, the members that beat the best baseline on the validation rows (the served ensemble is
    made of these), and why each other one was dropped. Post level: the global and account means; impression
    level: the validation rate itself (RCE ≤ 0). If none wins, the best member alone is kept."""
    kept, dropped = [], {}
    for k, output in enumerate(level.outputs):
        base = {n: _loss(level, y[:, k], np.asarray(v, dtype=np.float64)) for n, v in baselines.items()} or {
            "the validation rate": _loss(level, y[:, k], np.full(len(y), y[:, k].mean()))}
        best = min(base, key=base.get)
        loss = {n: _loss(level, y[:, k], p[:, k]) for n, p in preds.items()}
        wins = [n for n in preds if loss[n] < base[best]] or [min(loss, key=loss.get)]
        kept.append(wins)
        metric = "RMSE" if level.task == "regression" else "log loss"
        for n in preds:
            if n not in wins:
                dropped.setdefault(output, {})[n] = f"validation {metric} {loss[n]:.4f} ≥ {best} {base[best]:.4f}"
                log(f"{level.name} {output}: {n} dropped from the served ensemble ({dropped[output][n]})")
    return kept, dropped


def _oracle(cfg: AppConfig, level: Level, truth_uri: str, valid: pa.Table) -> np.ndarray:
    """The data generator's own expectation for each validation row (synthetic worlds only)."""
    if level is POST:
        keys, columns = ["post_id"], ["expected_log1p_likes"]
    else:
        keys, columns = ["user_id", "post_id", "impression_at"], [f"p_{e}" for e in ENGAGEMENTS]
    truth = pl.from_arrow(io.read_table(truth_uri, cfg.storage, columns=keys + columns))
    joined = pl.from_arrow(valid.select(keys)).join(truth, on=keys, how="left", maintain_order="left")
    return np.column_stack([joined[c].to_numpy() for c in columns])


STACK_MIN_ROWS = 50  # validation rows the 5-fold stacker needs (10 a fold); fewer: loss weights only


def _ensembles(cfg: AppConfig, level: Level, preds: dict[str, np.ndarray], y: np.ndarray, kept: list[list[str]]):
    """Per output, over its ``kept`` members: loss weights and (with ≥ 2) the out-of-fold stacker → (specs,
    weights, the loss-weighted and stacked predictions, the served one)."""
    weighted, stacked, served = np.zeros_like(y), np.zeros_like(y), np.zeros_like(y)
    specs, weights = {}, {}
    for k, output in enumerate(level.outputs):
        member = {name: preds[name][:, k] for name in kept[k]}
        w = ensemble.loss_weights({name: _loss(level, y[:, k], v) for name, v in member.items()})
        weighted[:, k] = ensemble.weighted(member, w)
        if len(member) >= 2 and len(y) >= STACK_MIN_ROWS:
            stacked[:, k], stacker, names = ensemble.stacked_cv(member, y[:, k], level.task)
            specs[output] = ensemble_spec(cfg.train.ensemble, w, stacker, names, level.task)
        else:
            stacked[:, k] = weighted[:, k]
            specs[output] = {"method": "loss_weighted", "task": level.task, "members": list(member), "weights": w}
        served[:, k] = stacked[:, k] if specs[output]["method"] == "stacked" else weighted[:, k]
        if level.task == "regression":
            choice = _simplest_within_one_se(y[:, k], member, served[:, k], specs[output]["method"])
            if choice in member:
                specs[output] = {"method": "loss_weighted", "task": level.task, "members": [choice],
                                 "weights": {choice: 1.0}, "chosen": "one-standard-error rule"}
                served[:, k] = member[choice]
        weights[output] = w
    return specs, weights, weighted, stacked, served


def _served_name(specs: dict[str, dict]) -> str:
    """What a level serves, in words: the ensemble method, or the member the one-standard-error rule chose."""
    if any(s["method"] == "stacked" for s in specs.values()):
        return "stacked"
    alone = sorted({s["members"][0] for s in specs.values() if s.get("chosen")})
    return f"{', '.join(alone)} alone (one-standard-error rule)" if alone else "loss_weighted"


SIMPLEST_FIRST = ("account_mean_eb",)  # the members the one-standard-error rule prefers, before the others


def _simplest_within_one_se(y: np.ndarray, members: dict[str, np.ndarray], ensemble: np.ndarray,
                            method: str) -> str:
    """The simplest of the account-mean member, each member alone (best first) and the ensemble whose
    validation MSE is within one standard error (of the paired per-row differences) of the best's: the
    one-standard-error rule of model selection (Hastie et al., ESL 7.10).

    Why: the choice is made on the validation rows, which on a sparse real log are few (55–122 rows on the
    Adobe splits of docs/evaluation.md). There a stacker fit on them beat its members on validation by noise
    and lost to them on later posts; with thousands of rows the standard error is small and the ensemble
    keeps its place."""
    errors = {n: (y - p) ** 2 for n, p in members.items()}
    errors[method] = (y - ensemble) ** 2
    best = min(errors, key=lambda n: errors[n].mean())
    singles = sorted(members, key=lambda n: (n not in SIMPLEST_FIRST, errors[n].mean()))
    for name in [*singles, method]:
        d = errors[name] - errors[best]
        if len(d) < 2 or d.mean() <= d.std(ddof=1) / np.sqrt(len(d)):
            return name
    return best


REGIME_MIN_ROWS = 30  # validation rows each account regime needs for an ensemble of its own


def _regime_ensembles(cfg: AppConfig, level: Level, valid: pa.Table, preds: dict[str, np.ndarray], y: np.ndarray,
                      baselines: dict[str, np.ndarray], served: np.ndarray, log: Callable[[str], None]) -> dict:
    """Post level: one ensemble for posts of accounts with labelled posts behind their encoding ("seen") and
    one for the others ("new"), each with its own drop rule and stacker; ``served`` gets the routed values.
    {} when the column is missing or a regime has fewer than ``REGIME_MIN_ROWS`` validation rows.

    Why: which member to trust depends on whether the account mean exists, and the validation rows mix the
    two regimes in proportions serving does not (an account whose posts all fall after the training cutoff
    is "new" in validation, "seen" once the run is served with its latest snapshot). Pooled, the stacker on
    the Adobe split thinned to 1–3 posts an account chose kNN weight for the new accounts and served 1.37 RMSE
    where its XGBoost and account mean made 1.16 (docs/evaluation.md)."""
    if level is not POST or "te_author_id_n" not in valid.column_names:
        return {}
    seen = np.nan_to_num(valid.column("te_author_id_n").to_numpy(zero_copy_only=False)) > 0
    masks = {"seen": seen, "new": ~seen}
    if min(int(m.sum()) for m in masks.values()) < REGIME_MIN_ROWS:
        return {}
    specs = {}
    for name, mask in masks.items():
        sub = {k: v[mask] for k, v in preds.items()}
        kept, _ = _winners(level, sub, y[mask], {k: v[mask] for k, v in baselines.items()},
                           lambda m, name=name: log(f"{name} accounts: {m}"))
        regime_specs, _, _, _, regime_served = _ensembles(cfg, level, sub, y[mask], kept)
        specs[name] = {**regime_specs[POST.outputs[0]], "rows": int(mask.sum())}
        served[mask] = regime_served
    return specs


@dataclass
class LevelInputs:
    """A level's rows: in memory below ``train.stream_rows``; above it the training split stays a Ray
    Dataset that families which can stream read shard by shard on their workers (the others gather it
    into the driver), and ``valid`` holds only the validation fit rows: the rest (``valid_scored``) is
    scored on Ray Data (``pipeline/validation.py``)."""

    rows: int
    valid: pa.Table
    train_table: pa.Table | None = None
    train_stream: Any = None
    schema: pa.Schema | None = None
    valid_scored: Any = None
    valid_rows: int = 0

    @property
    def streamed(self) -> bool:
        return self.train_stream is not None

    def train_for(self, family, log: Callable[[str], None]) -> Any:
        if self.streamed and family.streams:
            return self.train_stream
        if self.train_table is None:
            log(f"{family.name} cannot stream: gathering the training split into the driver")
            self.train_table = datasets.collect(self.train_stream)
        return self.train_table


# Automatic train.stream_rows: in-memory tables up to 320 MiB of 8-byte values, so the driver stays under 1.5 GB.
# The in-memory path costs the driver about twice that estimate on top of the ~0.76 GB it holds before training
# (the table, its split copies, the workers' slices it writes to the object store, the members' predictions):
# bench/rows.py at 400k impressions peaked at 1.58 GB in memory (0.76 GB before training) and 0.87 GB streamed
# (like RCE 30.09 / 29.95); at 1M in memory, 3.33 GB. The old 1 GiB let 1M rows in.
DRIVER_TABLE_BYTES = 320 << 20
# Automatic train.valid_fit_rows: the validation fit rows' 8-byte values. At 256 MiB (262k rows of 128 columns)
# the driver went from 1.13 to 1.66 GB while XGBoost fit at 4M impressions (bench/rows.py, its steps): the rows,
# their copy in the object store and the members' prediction matrices. Half of that keeps it under 1.5 GB.
VALID_FIT_BYTES = 1 << 27


def stream_threshold(cfg: AppConfig, columns: int) -> int:
    """``train.stream_rows``, or where unset the rows whose 8-byte values fill ``DRIVER_TABLE_BYTES``."""
    return cfg.train.stream_rows or max(DRIVER_TABLE_BYTES // (8 * max(columns, 1)), 1)


def _inputs(cfg: AppConfig, level: Level, uri: str, log: Callable[[str], None]) -> LevelInputs:
    rows = io.read_manifest(uri, cfg.storage).get("rows", 0)
    if level is POST or rows < stream_threshold(cfg, len(io.dataset_schema(uri, cfg.storage).names)):
        # Posts without a label (NaN) are dropped part by part while reading: filtering the table read whole kept
        # two copies at once (1M posts, 347 MB of Arrow: the driver went from 0.23 to 1.19 GB, 0.67 GB this way).
        labelled = pc.invert(pc.is_nan(pc.field("label_log1p_likes"))) if level is POST else None
        table = io.read_table(uri, cfg.storage, filters=labelled)
        train, valid = _split(table)
        if level is IMPRESSION:
            train = sample_negatives(train, cfg.train.sample.negatives, cfg.train.sample.seed)
        return LevelInputs(train.num_rows, valid, train_table=train, schema=table.schema)
    ensure_ray(cfg.ray)
    ds = datasets.read(uri, cfg.storage, cfg.features.blocks)
    schema = io.dataset_schema(uri, cfg.storage)
    fit_rows = cfg.train.valid_fit_rows or max(VALID_FIT_BYTES // (8 * len(schema.names)), 10)
    valid, scored, valid_rows = validation.split_valid(ds, fit_rows, cfg.train.sample.seed)
    train = ds.map_batches(validation.rows_of, fn_kwargs={"split": "train"}, batch_format="pyarrow")
    sample = cfg.train.sample
    if sample.negatives < 1:
        train = train.map_batches(sample_negatives, batch_format="pyarrow",
                                  fn_kwargs={"rate": sample.negatives, "seed": sample.seed})
    streaming = [get_family(name) for name in cfg.train.models if get_family(name).streams]
    if any(distributed.starves_data(Resources.of(getattr(cfg.train, f.name, None))) for f in streaming):
        # Every trainer would take the whole cluster and starve the read tasks (distributed.route_inputs):
        # execute the split once into the object store, shared by every family's fits and passes.
        log(f"{level.name}: trainers take every CPU; materializing the training split in the object store")
        train = train.materialize()
    kept = train.count() if sample.negatives < 1 else validation.count_splits(ds)["train"]
    return LevelInputs(kept, valid, train_stream=train, schema=schema, valid_scored=scored, valid_rows=valid_rows)


def _fit_members(cfg: AppConfig, level: Level, data: LevelInputs, features: list[str],
                 models_dir: str, log: Callable[[str], None]) -> tuple[dict, dict, dict, dict]:
    """Each family of ``train.models`` (registration order) → its members, saved; validation predictions."""
    out_dir = io.join(models_dir, level.name)
    valid = data.valid
    ctx = FitContext(cfg, out_dir, io.join(models_dir, "ray"), gpu_available(), log, train_rows=data.rows)
    preds: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    families: dict[str, str] = {}
    for name in [f for f in family_names() if f in cfg.train.models]:
        family = get_family(name)
        if level.name not in family.levels or not all(r in preds for r in family.requires):
            continue
        started = time.perf_counter()
        for member in family.fit(level, data.train_for(family, log), valid, features, ctx):
            member.save(out_dir)
            p = np.asarray(member.predict(valid, preds), dtype=np.float32)
            preds[member.name] = p[:, None] if p.ndim == 1 else p
            families[member.name] = name
            seconds[member.name] = time.perf_counter() - started
            log(f"{level.name} {member.name}: {seconds[member.name]:.1f}s")
    return preds, seconds, families, ctx.info


def train_level(cfg: AppConfig, level: Level, uri: str, models_dir: str, truth_uri: str | None = None,
                log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    data = _inputs(cfg, level, uri, log)
    valid = data.valid
    if data.rows < level.min_rows[0] or valid.num_rows < level.min_rows[1]:
        what = "labelled posts" if level is POST else "impressions"
        return {"skipped": f"too few {what} (train {data.rows}, valid {valid.num_rows})"}
    features = feature_columns(data.schema)
    y_va = label_matrix(valid, level.labels)
    edges = _popularity_edges(data.train_table, valid) if level is IMPRESSION else None
    # Streamed: the reported figures are the scored rows' (_streamed_scores), so the fit rows go unscored.
    score = _scorer(level, edges, valid, y_va) if data.valid_scored is None else (lambda _: {})
    result: dict[str, Any] = {"rows": {"train": data.rows, "valid": data.valid_rows or valid.num_rows},
                              "features": len(features),
                              "train_input": "ray_data" if data.streamed else "in_memory"}
    if level is IMPRESSION and cfg.train.sample.negatives < 1:
        result["sample"] = {"negatives": cfg.train.sample.negatives, "kept_rows": data.rows}
    if level is POST:
        result["baselines"] = post_baselines(data.train_table, valid)

    preds, seconds, families, info = _fit_members(cfg, level, data, features, models_dir, log)
    result.update(info)
    result["models"] = {k: score(v) | ({"seconds": round(seconds[k], 1)} if level is POST else {})
                        for k, v in preds.items()}
    if preds:
        baselines = post_baseline_predictions(data.train_table, valid) if level is POST else {}
        kept, dropped = _winners(level, preds, y_va, baselines, log)
        specs, weights, weighted, stacked, served = _ensembles(cfg, level, preds, y_va, kept)
        regimes = _regime_ensembles(cfg, level, valid, preds, y_va, baselines, served, log)
        if len(preds) >= 2:
            result["ensemble"] = {"loss_weighted": score(weighted), "stacked": score(stacked),
                                  "served": _served_name(specs), "dropped": dropped}
            if regimes:
                result["ensemble"].update(served="by_account_regime", by_account_regime=score(served),
                                          regimes={k: {n: v for n, v in spec.items() if n != "stacker"}
                                                   for k, spec in regimes.items()})
            if level is POST:
                result["ensemble"]["loss_weighted"]["weights"] = weights[POST.outputs[0]]
            else:
                result["ensemble"]["weights"] = weights
        if level is POST:
            # An 80 % interval from the (out-of-fold) validation residuals of what is served.
            residual = y_va[:, 0] - served[:, 0]
            spec = {**specs[POST.outputs[0]], "residual_quantiles": {"q10": float(np.quantile(residual, 0.1)),
                                                                     "q90": float(np.quantile(residual, 0.9))}}
            if regimes:
                spec["regimes"] = regimes
        else:
            spec = {"engagements": specs}
        io.write_json(io.join(models_dir, level.name, "ensemble.json"), {**spec, "families": families})
    if data.valid_scored is not None and preds:
        fit_preds = {**preds, **({"ensemble_loss_weighted": weighted, "ensemble_stacked": stacked}
                                 if len(preds) >= 2 else {})}
        _streamed_scores(cfg, data, fit_preds, edges, io.join(models_dir, level.name), truth_uri, result, log)
    elif truth_uri:
        result["oracle"] = score(_oracle(cfg, level, truth_uri, valid))
    return result


def _streamed_scores(cfg: AppConfig, data: LevelInputs, fit_preds: dict, edges: np.ndarray, level_dir: str,
                     truth_uri: str | None, result: dict, log: Callable[[str], None]) -> None:
    """Replace the figures of the fit rows by those of the scored validation rows (partial sums on Ray
    Data), which early stopping and the stacker never saw."""
    scores, scored = validation.stream_scores(cfg, data.valid_scored, level_dir, fit_preds, edges, truth_uri, log)
    result["validation"] = {"fit_rows": data.valid.num_rows, "scored_rows": scored,
                            "metrics_on": f"scored rows; {AP_FROM_BINS}"}
    result["models"] = {k: v for k, v in scores.items() if not k.startswith("ensemble_") and k != validation.ORACLE}
    if "ensemble" in result:
        result["ensemble"].update(loss_weighted=scores["ensemble_loss_weighted"], stacked=scores["ensemble_stacked"])
    if validation.ORACLE in scores:
        result["oracle"] = scores[validation.ORACLE]


def train_post_level(cfg: AppConfig, posts_uri: str, models_dir: str, truth_uri: str | None = None,
                     log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    return train_level(cfg, POST, posts_uri, models_dir, truth_uri, log)


def train_impression_level(cfg: AppConfig, impressions_uri: str, models_dir: str, truth_uri: str | None = None,
                           log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    return train_level(cfg, IMPRESSION, impressions_uri, models_dir, truth_uri, log)
