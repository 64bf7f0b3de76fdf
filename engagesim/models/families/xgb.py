"""XGBoost: one booster per output (log1p(likes) at post level; like/reply/retweet/quote at impression level),
a level's boosters fit in one Ray Train run. Files: ``xgb.ubj`` (post) or ``xgb_<engagement>.ubj``, + a JSON sidecar each."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from engagesim import io
from engagesim.config import XGBConfig
from engagesim.models import xgb
from engagesim.models.data import account_prior, matrix
from engagesim.models.family import Family, FitContext, Level, Member, register_family

RESIDUAL = "_residual"  # the post label less its margin ("_": never a feature)


def _file(level: Level, output: str) -> str:
    return "xgb.ubj" if level.name == "post" else f"xgb_{output}.ubj"


class XGBMember(Member):
    name = "xgb"
    takes_arrays = True

    def __init__(self, level: Level, boosters: dict[str, tuple]):
        self.level, self.boosters = level, boosters  # output → (booster, meta with "features")

    def predict(self, table: pa.Table, upstream: dict[str, np.ndarray]) -> np.ndarray:
        matrices: dict[tuple, np.ndarray] = {}  # the boosters share one feature list: convert once
        out = []
        for booster, meta in self.boosters.values():
            key = tuple(meta["features"])
            if key not in matrices:
                matrices[key] = matrix(table, meta["features"])
            p = xgb.predict(booster, matrices[key], meta["features"])
            out.append(p + account_prior(table) if meta.get("margin") == "account_prior" else p)
        return np.column_stack(out)

    def save(self, directory: str) -> None:
        for output, (booster, meta) in self.boosters.items():
            xgb.save(booster, io.join(directory, _file(self.level, output)), meta["features"],
                     {k: v for k, v in meta.items() if k != "features"})


def _residual(table: pa.Table, label: str) -> pa.Table:
    y = table.column(label).to_numpy(zero_copy_only=False).astype(np.float32)
    if RESIDUAL in table.column_names:
        table = table.drop_columns([RESIDUAL])
    return table.append_column(RESIDUAL, pa.array(y - account_prior(table)))


def _with_residual(rows, label: str):
    """``_residual`` of a table, or block by block of a Ray Dataset (the streamed post level)."""
    if rows is None or isinstance(rows, pa.Table):
        return None if rows is None else _residual(rows, label)
    return rows.map_batches(_residual, fn_kwargs={"label": label}, batch_format="pyarrow")


@register_family
class XGBFamily(Family):
    name = "xgb"
    config_class = XGBConfig
    streams = True
    weighted = True

    def fit(self, level: Level, train: pa.Table, valid: pa.Table, features: list[str],
            ctx: FitContext) -> list[Member]:
        c = ctx.settings(self)
        objective = "reg:squarederror" if level.task == "regression" else "binary:logistic"
        params = xgb.params_for(c.preset, objective, {"nthread": c.cpus_per_worker, **c.params}, ctx.use_gpu)
        boosters = {}
        # valid: always a table with the level's columns (train may be a Ray Dataset).
        margin = c.post_margin and level.name == "post" and account_prior(valid) is not None
        meta = {"task": "regression"} if level.name == "post" else {}
        if margin:  # squared error: boosting y − m from 0 is boosting y from the margin m — one label at a time
            meta["margin"] = "account_prior"
            fitted = {}
            for label in level.labels:
                train, valid = _with_residual(train, label), _with_residual(valid, label)
                fitted[label] = xgb.fit_ray(train, valid, features, RESIDUAL, params, c, ctx.ray_dir,
                                            f"{level.name}_xgb", ctx.resources(self))
        else:  # every output in one Ray Train run: one matrix, one worker group (models/xgb.py)
            names = ["post_xgb"] if level.name == "post" else [f"impression_xgb_{o}" for o in level.outputs]
            fitted = xgb.fit_ray_many(train, valid, features, list(level.labels), params, c, ctx.ray_dir,
                                      f"{level.name}_xgb", ctx.resources(self), names=names)
        for label, output in zip(level.labels, level.outputs):
            engagement = {} if level.name == "post" else {"engagement": output}
            boosters[output] = (fitted[label], {"features": features, **meta, **engagement})
        if level.name == "post":
            importance = boosters[level.outputs[0]][0].get_score(importance_type="gain")
            ctx.info["xgb_top_features"] = dict(sorted(importance.items(), key=lambda kv: -kv[1])[:15])
        return [XGBMember(level, boosters)]

    def load(self, directory: str, level: Level, member: str) -> Member | None:
        paths = {output: io.join(directory, _file(level, output)) for output in level.outputs}
        if not all(io.exists(p) for p in paths.values()):
            return None
        return XGBMember(level, {output: xgb.load(p) for output, p in paths.items()})
