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
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from engagesim import io
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
from engagesim.models import ensemble
from engagesim.models.bundle import ensemble_spec
from engagesim.models.data import feature_columns, label_matrix
from engagesim.models.family import IMPRESSION, POST, FitContext, Level, family_names, get_family, gpu_available
from engagesim.pipeline import validation
from engagesim.pipeline.level_inputs import LevelInputs, baselines_of, read_inputs
from engagesim.schema import ENGAGEMENTS

LevelScore = Callable[[np.ndarray], dict[str, Any]]


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
            choice = _simplest_within_se(y[:, k], member, served[:, k], specs[output]["method"],
                                         cfg.train.selection_se)
            if choice in member:
                # "fitted": the ensemble the rule set aside (streamed validation still scores it).
                specs[output] = {"method": "loss_weighted", "task": level.task, "members": [choice],
                                 "weights": {choice: 1.0}, "chosen": SE_RULE.format(cfg.train.selection_se),
                                 "fitted": specs[output]}
                served[:, k] = member[choice]
        weights[output] = w
    return specs, weights, weighted, stacked, served


def _served_name(specs: dict[str, dict]) -> str:
    """What a level serves, in words: the ensemble method, or the member the standard-error rule chose."""
    if any(s["method"] == "stacked" for s in specs.values()):
        return "stacked"
    alone = sorted({s["members"][0] for s in specs.values() if s.get("chosen")})
    rule = next((s["chosen"] for s in specs.values() if s.get("chosen")), "")
    return f"{', '.join(alone)} alone ({rule})" if alone else "loss_weighted"


SE_RULE = "{:g}-standard-error rule"  # the "chosen" of a spec the rule picked
SIMPLEST_FIRST = ("account_mean_eb",)  # the members the standard-error rule prefers, before the others


def _simplest_within_se(y: np.ndarray, members: dict[str, np.ndarray], ensemble: np.ndarray, method: str,
                        k: float) -> str:
    """The simplest of the account-mean member, each member alone (best first) and the ensemble whose
    validation MSE is within ``k`` standard errors (of the paired per-row differences) of the best's: the
    one-standard-error rule of model selection (Hastie et al., ESL 7.10) at k = 1.

    Why: the choice is made on the validation rows, which on a sparse real log are few (27–55 rows a regime on
    the Adobe splits thinned to 1–3 posts an account, docs/evaluation.md). There a stacker fit on them beat its
    members on validation by noise and lost to them on later posts; at k = 1 XGBoost or the stacked MLP still
    won a regime on 4 of 8 thinned splits (seeds 1–4 of both files) and lost to the account mean on their test
    posts by up to 7 %; at k = 2 none did (``train.selection_se``). With thousands of rows the standard error
    is small and the better model keeps its place (post level of the 2M world: XGBoost 0.786 vs 0.866)."""
    errors = {n: (y - p) ** 2 for n, p in members.items()}
    errors[method] = (y - ensemble) ** 2
    best = min(errors, key=lambda n: errors[n].mean())
    singles = sorted(members, key=lambda n: (n not in SIMPLEST_FIRST, errors[n].mean()))
    for name in [*singles, method]:
        d = errors[name] - errors[best]
        if len(d) < 2 or d.mean() <= k * d.std(ddof=1) / np.sqrt(len(d)):
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
    data = read_inputs(cfg, level, uri, log)
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
    baselines = baselines_of(data) if level is POST else {}
    if level is POST and not data.streamed:
        result["baselines"] = {k: {"rmse": rmse(y_va[:, 0], v)} for k, v in baselines.items()}

    preds, seconds, families, info = _fit_members(cfg, level, data, features, models_dir, log)
    result.update(info)
    result["models"] = {k: score(v) | ({"seconds": round(seconds[k], 1)} if level is POST else {})
                        for k, v in preds.items()}
    if preds:
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
    if data.account_means is not None:  # post level
        _streamed_post_scores(cfg, data, level_dir, truth_uri, result, log)
        return
    scores, scored = validation.stream_scores(cfg, data.valid_scored, level_dir, fit_preds, edges, truth_uri, log)
    result["validation"] = {"fit_rows": data.valid.num_rows, "scored_rows": scored,
                            "metrics_on": f"scored rows; {AP_FROM_BINS}"}
    result["models"] = {k: v for k, v in scores.items() if not k.startswith("ensemble_") and k != validation.ORACLE}
    if "ensemble" in result:
        result["ensemble"].update(loss_weighted=scores["ensemble_loss_weighted"], stacked=scores["ensemble_stacked"])
    if validation.ORACLE in scores:
        result["oracle"] = scores[validation.ORACLE]


def _streamed_post_scores(cfg: AppConfig, data: LevelInputs, level_dir: str, truth_uri: str | None, result: dict,
                          log: Callable[[str], None]) -> None:
    """``_streamed_scores`` at post level: exact RMSE of members, ensembles, baselines and oracle over the
    scored validation posts."""
    rmse_of, scored = validation.stream_post_scores(cfg, data.valid_scored, level_dir, data.account_means,
                                                    data.global_mean, truth_uri, log)
    result["validation"] = {"fit_rows": data.valid.num_rows, "scored_rows": scored,
                            "metrics_on": "scored rows; RMSE exact from squared-error sums"}
    result["baselines"] = {k: {"rmse": rmse_of[k]} for k in ("global_mean", "account_mean")}
    result["models"] = {k: {"rmse": rmse_of[k], **{n: v for n, v in result["models"][k].items() if n != "rmse"}}
                        for k in result["models"] if k in rmse_of}
    if "ensemble" in result:
        ens = result["ensemble"]
        for method in ("loss_weighted", "stacked"):
            if f"ensemble_{method}" in rmse_of:
                ens[method] = {**ens.get(method, {}), "rmse": rmse_of[f"ensemble_{method}"]}
        if "by_account_regime" in ens:
            ens["by_account_regime"] = {"rmse": rmse_of["ensemble"]}
    if validation.ORACLE in rmse_of:
        result["oracle"] = {"rmse": rmse_of[validation.ORACLE]}


def train_post_level(cfg: AppConfig, posts_uri: str, models_dir: str, truth_uri: str | None = None,
                     log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    return train_level(cfg, POST, posts_uri, models_dir, truth_uri, log)


def train_impression_level(cfg: AppConfig, impressions_uri: str, models_dir: str, truth_uri: str | None = None,
                           log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    return train_level(cfg, IMPRESSION, impressions_uri, models_dir, truth_uri, log)
