"""A run's trained models, loaded together and applied to feature tables.

The evaluation stage, ``engagesim score``, ``load_run().predict`` and Ray Serve
all predict through these two classes, so there is one scoring code path.
Everything loads from safe formats: xgboost UBJSON, safetensors, FAISS index
files and JSON (the ensemble's weights and stacker coefficients).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from engagesim import io
from engagesim.features.state import fixed_list_matrix
from engagesim.models import knn, nn, slm, xgb
from engagesim.models.data import matrix
from engagesim.models.ensemble import logit
from engagesim.schema import ENGAGEMENTS

MAX_LOG1P_LIKES = float(np.log1p(1e10))
SLM_MEMBERS = ("slm", "slm_distilled")
IMAGE_STACK_COLUMNS = ("clarity_contrast", "hue_count", "brightness_contrast", "colour_entropy", "composition_offset",
                       "has_image")


def stack_image_columns(features: list[str]) -> list[str]:
    """SMP's stacked MLP input besides the XGBoost prediction: image PCA + the high-level image features."""
    return [c for c in features if c.startswith("image_pca_") or c in IMAGE_STACK_COLUMNS]


def embedding_matrix(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-size-list column → (float32 matrix with zeros for nulls, mask of present rows)."""
    col = table.column(column).combine_chunks()
    return fixed_list_matrix(col), col.is_valid().to_numpy(zero_copy_only=False)


def knn_predict(model: knn.KNNRegressor, table: pa.Table, column: str) -> np.ndarray:
    """Neighbour vote for rows with a vector; the training mean for rows without one."""
    vectors, ok = embedding_matrix(table, column)
    out = np.full(table.num_rows, model.prior, dtype=np.float32)
    if ok.any():
        out[ok] = model.predict(vectors[ok])
    return out


def load_slms(directory: str) -> dict[str, tuple]:
    """The fine-tuned SLM and its distilled student, where the run trained them."""
    return {name: slm.load(io.join(directory, name)) for name in SLM_MEMBERS
            if io.exists(io.join(directory, name, "config.json"))}


def predict_slms(models: dict[str, tuple], table: pa.Table) -> dict[str, np.ndarray]:
    return {name: slm.predict_table(model, tokenizer, features, table)
            for name, (model, tokenizer, features) in models.items()}


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


# --- post level ---------------------------------------------------------------------------------

class PostModels:
    """log1p(likes) regressors of a run + their ensemble."""

    def __init__(self, directory: str):
        def at(*parts: str) -> str:
            return io.join(directory, *parts)

        self.xgb = xgb.load(at("xgb.ubj")) if io.exists(at("xgb.ubj")) else None
        self.nn = nn.load(at("nn")) if io.exists(at("nn", "config.json")) else None
        self.stacked = nn.load(at("stacked_mlp")) if io.exists(at("stacked_mlp", "config.json")) else None
        self.knn = knn.KNNRegressor.load(at("knn")) if io.exists(at("knn", "config.json")) else None
        self.knn_column = io.read_json(at("knn", "column.json"))["column"] if self.knn else None
        self.slms = load_slms(directory)
        self.ensemble = io.read_json(at("ensemble.json")) if io.exists(at("ensemble.json")) else None

    @property
    def members(self) -> list[str]:
        return [n for n, m in (("xgb", self.xgb), ("stacked_mlp", self.stacked), ("knn", self.knn), ("nn", self.nn))
                if m is not None] + list(self.slms)

    def predict(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Every member's prediction of log1p(likes) and ``ensemble`` (the served one)."""
        out: dict[str, np.ndarray] = {}
        if self.xgb:
            booster, meta = self.xgb
            out["xgb"] = xgb.predict(booster, table, meta["features"])
        if self.stacked and "xgb" in out:
            model, columns = self.stacked
            x = np.column_stack([out["xgb"], matrix(table, columns[1:])]) if len(columns) > 1 else out["xgb"][:, None]
            out["stacked_mlp"] = model.predict(x.astype(np.float32))[:, 0]
        if self.knn and self.knn_column in table.column_names:
            out["knn"] = knn_predict(self.knn, table, self.knn_column)
        if self.nn:
            model, features = self.nn
            out["nn"] = model.predict(matrix(table, features))[:, 0]
        out.update({name: p[:, 0] for name, p in predict_slms(self.slms, table).items()})
        if not out:
            raise ValueError("this run has no post-level models (train.models was empty or training was skipped)")
        if self.ensemble and all(m in out for m in self.ensemble["members"]):
            out["ensemble"] = apply_ensemble(self.ensemble, out)
        else:
            out["ensemble"] = out[next(iter(out))]
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

class ImpressionModels:
    """P(like/reply/retweet/quote) models of a run + their per-engagement ensembles."""

    def __init__(self, directory: str):
        def at(*parts: str) -> str:
            return io.join(directory, *parts)

        self.xgb = {e: xgb.load(at(f"xgb_{e}.ubj")) for e in ENGAGEMENTS if io.exists(at(f"xgb_{e}.ubj"))}
        self.nn = nn.load(at("nn")) if io.exists(at("nn", "config.json")) else None
        self.slms = load_slms(directory)
        self.ensemble = io.read_json(at("ensemble.json")) if io.exists(at("ensemble.json")) else None

    def predict(self, table: pa.Table) -> dict[str, np.ndarray]:
        """(n, 4) probabilities per member and ``ensemble``; columns in ENGAGEMENTS order."""
        out: dict[str, np.ndarray] = {}
        if len(self.xgb) == len(ENGAGEMENTS):
            matrices: dict[tuple, np.ndarray] = {}  # the four boosters share one feature list: convert once
            for _, meta in self.xgb.values():
                key = tuple(meta["features"])
                if key not in matrices:
                    matrices[key] = matrix(table, meta["features"])
            out["xgb"] = np.column_stack([xgb.predict(b, matrices[tuple(meta["features"])], meta["features"])
                                          for b, meta in self.xgb.values()])
        if self.nn:
            model, features = self.nn
            out["nn"] = model.predict(matrix(table, features))
        out.update(predict_slms(self.slms, table))
        if not out:
            raise ValueError("this run has no impression-level models")
        if self.ensemble:
            out["ensemble"] = np.column_stack([
                apply_ensemble(self.ensemble["engagements"][e], {k: v[:, i] for k, v in out.items()})
                for i, e in enumerate(ENGAGEMENTS)])
        else:
            out["ensemble"] = out[next(iter(out))]
        return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}
