"""SMP 2019's stacked MLP: [XGBoost's prediction, image PCA + the five high-level image features] → MLP.
Post level only; reads the xgb member's predictions. Files: ``stacked_mlp/``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from engagesim.models.data import matrix
from engagesim.models.families._net import NNMember, load_net
from engagesim.models.family import Family, FitContext, Level, Member, register_family

IMAGE_STACK_COLUMNS = ("clarity_contrast", "hue_count", "brightness_contrast", "colour_entropy", "composition_offset",
                       "has_image")

def stack_image_columns(features: list[str]) -> list[str]:
    """SMP's stacked MLP input besides the XGBoost prediction: image PCA + the high-level image features."""
    return [c for c in features if c.startswith("image_pca_") or c in IMAGE_STACK_COLUMNS]

def _inputs(xgb_prediction: np.ndarray, table: pa.Table, image_cols: list[str]) -> np.ndarray:
    x = np.column_stack([xgb_prediction, matrix(table, image_cols)]) if image_cols else xgb_prediction[:, None]
    return x.astype(np.float32)

class StackedMember(NNMember):
    def predict(self, table: pa.Table, upstream: dict[str, np.ndarray]) -> np.ndarray:
        return self.model.predict(_inputs(upstream["xgb"][:, 0], table, self.features[1:]))

@register_family
class StackedMLPFamily(Family):
    name = "stacked_mlp"
    levels = ("post",)
    requires = ("xgb",)

    def fit(self, level: Level, train: pa.Table, valid: pa.Table, features: list[str],
            ctx: FitContext) -> list[Member]:
        """The XGBoost input of the training rows is out-of-fold (3 time-ordered folds, in-process boosters),
        so the MLP never learns from predictions made on rows the booster was fit on."""
        from engagesim.models import nn, xgb

        c = ctx.cfg.train.xgb  # the out-of-fold boosters are the xgb member's, in-process
        label = level.labels[0]
        image_cols = stack_image_columns(features)
        params = xgb.params_for(c.preset, "reg:squarederror", {"nthread": c.cpus_per_worker, **c.params})
        folds = np.arange(train.num_rows) * 3 // max(train.num_rows, 1)
        oof = np.zeros(train.num_rows, dtype=np.float32)
        for k in range(3):
            fit_idx, out_idx = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
            fit_t, out_t = train.take(pa.array(fit_idx)), train.take(pa.array(out_idx))
            booster = xgb.train_booster(xgb.dmatrix(fit_t, features, label), None, params, min(c.rounds, 150))
            oof[out_idx] = xgb.predict(booster, out_t, features)
        x_tr = _inputs(oof, train, image_cols)
        mean, std = nn.fit_normaliser(x_tr)
        spec = nn.NNSpec(arch="layer6_mlp", n_inputs=x_tr.shape[1], n_outputs=1, task="regression",
                         hidden=[64, 32], dropout=0.1, mean=mean, std=std)
        model = nn.EngagementNet(spec)
        y = train.column(label).to_numpy(zero_copy_only=False)
        nn.train_epochs(model, x_tr, y.reshape(-1, 1).astype(np.float32), epochs=30, batch_size=256, lr=1e-3)
        return [StackedMember("stacked_mlp", model.eval(), ["xgb_prediction", *image_cols])]

    def load(self, directory: str, level: Level, member: str) -> Member | None:
        net = load_net(directory, "stacked_mlp")
        return StackedMember(net.name, net.model, net.features) if net else None
