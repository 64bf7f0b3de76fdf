"""A run's trained models, loaded together and applied to feature tables.

The evaluation stage, ``engagesim score``, ``load_run().predict`` and Ray Serve
all predict through these two classes, so there is one scoring code path. Which
members exist is the run's business (``ensemble.json["families"]``), how each
loads is its family's (``models/families``). Everything loads from safe formats:
xgboost UBJSON, safetensors, FAISS index files and JSON (the ensemble's weights
and stacker coefficients).
"""

from __future__ import annotations

import functools
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa

from engagesim import io
from engagesim.models import xgb
from engagesim.models.data import column_of
from engagesim.models.ensemble import logit
from engagesim.models.family import IMPRESSION, POST, Level, Member, family_names, family_of_member, get_family
from engagesim.schema import ENGAGEMENTS

MAX_LOG1P_LIKES = float(np.log1p(1e10))
Members = Literal["all", "served"]  # every member the run kept, or only those its served ensemble reads


# --- ensembles ----------------------------------------------------------------------------------

def ensemble_spec(method: str, weights: dict[str, float], stacker: Any, members: list[str], task: str) -> dict:
    """The JSON form of a fitted ensemble (loss weights + the stacker's coefficients)."""
    return {"method": method, "task": task, "members": members, "weights": weights,
            "stacker": {"coef": np.ravel(stacker.coef_).tolist(), "intercept": float(np.ravel(stacker.intercept_)[0])}}


def apply_ensemble(spec: dict, preds: dict[str, np.ndarray]) -> np.ndarray:
    """Combine member predictions as the run chose: loss-weighted mean or the stacked linear model."""
    if spec["method"] == "loss_weighted":
        return sum(w * preds[k] for k, w in spec["weights"].items())
    binary = spec["task"] == "binary"
    x = np.column_stack([logit(preds[n]) if binary else preds[n] for n in spec["members"]])
    z = x @ np.asarray(spec["stacker"]["coef"]) + spec["stacker"]["intercept"]
    return (1 / (1 + np.exp(-z)) if binary else z).astype(np.float32)


# --- a level's members ---------------------------------------------------------------------------

def _with_requirements(members: set[str]) -> set[str]:
    """``members`` and every member whose predictions they read, transitively (``Family.requires``)."""
    wanted, todo = set(members), list(members)
    while todo:
        family = family_of_member(todo.pop())
        for required in (family.requires if family else ()):
            if required not in wanted:
                wanted.add(required)
                todo.append(required)
    return wanted


class LevelModels:
    """The members a run trained at one level, as its ``ensemble.json["families"]`` lists them (runs
    written before that key: every registered family that finds its files), and their ensemble."""

    def __init__(self, directory: str, level: Level):
        self.level = level
        at = io.join(directory, "ensemble.json")
        self.ensemble = io.read_json(at) if io.exists(at) else None
        listed = (self.ensemble or {}).get("families")
        if listed is None:
            listed = {m: f for f in family_names() if level.name in get_family(f).levels
                      for m in get_family(f).members()}
        # Training order (registration order, then each family's own member order): a member may read the
        # predictions of those before it, and JSON files do not keep key order.
        order = {m: (i, j) for i, f in enumerate(family_names()) for j, m in enumerate(get_family(f).members())}
        self.loaded: dict[str, Member] = {}
        for member, family in sorted(listed.items(), key=lambda kv: order.get(kv[0], (len(order), 0))):
            model = get_family(family).load(directory, level, member)
            if model is not None:
                self.loaded[member] = model

    @property
    def members(self) -> list[str]:
        return list(self.loaded)

    def _ensembles(self) -> list[tuple[str, Any, set[str]]]:
        """(kind, spec, members) of the ensembles this level's ``predict`` may apply, in its order of preference."""
        return []

    @functools.cached_property
    def served(self) -> tuple[str, Any, frozenset[str]]:
        """How the served prediction is made, chosen once for ``predict`` and ``served_members``: the first
        ensemble whose members (and what they read) the run has, else its first member that has what it reads
        — (kind, spec or member name, the members that computes)."""
        loaded = set(self.loaded)
        for kind, spec, members in self._ensembles():
            if (wanted := _with_requirements(members)) <= loaded:
                return kind, spec, frozenset(wanted)
        for name in self.loaded:
            if (wanted := _with_requirements({name})) <= loaded:
                return "member", name, frozenset(wanted)
        return "member", None, frozenset()

    def served_members(self) -> frozenset[str]:
        """The members the served ensemble reads, and those they read in turn."""
        return self.served[2]

    def takes_arrays(self, members: Members = "served") -> bool:
        """Whether every member ``predict(…, members)`` runs takes ``data.FeatureArrays`` for its table."""
        names = self.served_members() if members == "served" else self.loaded
        return all(self.loaded[name].takes_arrays for name in names)

    def _served_prediction(self, out: dict[str, np.ndarray]) -> np.ndarray:
        kind, spec, _ = self.served
        return out[spec] if kind == "member" else apply_ensemble(spec, out)

    def member_predictions(self, table: pa.Table, members: Members = "all") -> dict[str, np.ndarray]:
        """(n, outputs) per member, in training order: each sees the predictions of those before it.

        ``members="served"``: only those the served ensemble reads (``served_members``) — what Serve computes.
        Members a run keeps beside its ensemble (dropped on validation, or not chosen by the evidence rule)
        cost as much as the served ones: on the serve benchmark's run the post level serves XGBoost alone
        while its LAYER6 NN and stacked MLP ran on every request."""
        if members not in get_args(Members):
            raise ValueError(f"members={members!r}: use one of {', '.join(get_args(Members))}")
        only = self.served_members() if members == "served" else None
        out: dict[str, np.ndarray] = {}
        for name, member in self.loaded.items():
            if only is not None and name not in only:
                continue
            family = family_of_member(name)
            if family is None or all(r in out for r in family.requires):
                p = np.asarray(member.predict(table, out), dtype=np.float32)
                out[name] = p[:, None] if p.ndim == 1 else p
        if not out:
            raise ValueError(f"this run has no {self.level.name}-level models (train.models was empty or training "
                             "was skipped)")
        return out


# --- post level ---------------------------------------------------------------------------------

class PostModels(LevelModels):
    """log1p(likes) regressors of a run + their ensemble."""

    def __init__(self, directory: str):
        super().__init__(directory, POST)

    @property
    def xgb(self) -> tuple | None:
        """(booster, meta) of the XGBoost member (SHAP contributions, importance plots)."""
        member = self.loaded.get("xgb")
        return member.boosters[POST.outputs[0]] if member else None

    @property
    def knn_column(self) -> str | None:
        member = self.loaded.get("knn")
        return member.column if member else None

    def _ensembles(self) -> list[tuple[str, Any, set[str]]]:
        spec = self.ensemble or {}
        regimes = spec.get("regimes")
        return ([("regimes", regimes, {m for s in regimes.values() for m in s["members"]})] if regimes else []) + (
            [("ensemble", spec, set(spec["members"]))] if spec.get("members") else [])

    def predict(self, table: pa.Table, members: Members = "all") -> dict[str, np.ndarray]:
        """Every member's prediction of log1p(likes) (``members="served"``: the served ensemble's) and ``ensemble``
        (the served one)."""
        out = {k: v[:, 0] for k, v in self.member_predictions(table, members).items()}
        kind, regimes, _ = self.served
        if kind == "regimes":
            # Each post by its account regime (pipeline/train.py::_regime_ensembles): seen = labelled posts
            # behind the account's encoding in the snapshot this run serves.
            seen = np.nan_to_num(column_of(table, "te_author_id_n")) > 0
            out["ensemble"] = np.where(seen, apply_ensemble(regimes["seen"], out), apply_ensemble(regimes["new"], out))
        else:
            out["ensemble"] = self._served_prediction(out)
        # log1p(likes) within [0, log1p(1e10)]: a count, and never an overflow downstream.
        return {k: np.clip(np.asarray(v, dtype=np.float32), 0.0, MAX_LOG1P_LIKES) for k, v in out.items()}

    def interval(self, ensemble: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """An 80 % interval on likes from the validation residual quantiles of the ensemble."""
        q = (self.ensemble or {}).get("residual_quantiles", {"q10": 0.0, "q90": 0.0})
        low = np.clip(ensemble + q["q10"], 0, MAX_LOG1P_LIKES)
        high = np.clip(ensemble + q["q90"], 0, MAX_LOG1P_LIKES)
        return np.expm1(low), np.expm1(high)

    def contributions(self, table: pa.Table, top: int = 5) -> list[list[dict]]:
        """Per row, the XGBoost features that pushed the prediction most (SHAP values, xgboost's own)."""
        if not self.xgb:
            return [[] for _ in range(table.num_rows)]
        booster, meta = self.xgb
        names = meta["features"]
        contrib = booster.predict(xgb.dmatrix(table, names, None), pred_contribs=True)[:, :-1]
        out = []
        for row in contrib:
            order = np.argsort(-np.abs(row))[:top]
            out.append([{"feature": names[j], "contribution": round(float(row[j]), 4)} for j in order])
        return out


# --- impression level ---------------------------------------------------------------------------

class ImpressionModels(LevelModels):
    """P(like/reply/retweet/quote) models of a run + their per-engagement ensembles."""

    def __init__(self, directory: str):
        super().__init__(directory, IMPRESSION)

    def _ensembles(self) -> list[tuple[str, Any, set[str]]]:
        specs = (self.ensemble or {}).get("engagements")
        return [("engagements", specs, {m for s in specs.values() for m in s["members"]})] if specs else []

    @property
    def xgb(self) -> dict[str, tuple]:
        """engagement → (booster, meta) of the XGBoost member ({} without one)."""
        member = self.loaded.get("xgb")
        return dict(member.boosters) if member else {}

    def predict(self, table: pa.Table, members: Members = "all") -> dict[str, np.ndarray]:
        """(n, 4) probabilities per member (``members="served"``: the served ensemble's) and ``ensemble``; columns
        in ENGAGEMENTS order."""
        out = self.member_predictions(table, members)
        kind, specs, _ = self.served
        if kind == "engagements":
            out["ensemble"] = np.column_stack([
                apply_ensemble(specs[e], {k: v[:, i] for k, v in out.items()}) for i, e in enumerate(ENGAGEMENTS)])
        else:
            out["ensemble"] = self._served_prediction(out)
        return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}
