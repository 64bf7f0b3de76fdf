"""The RecSys 2021 networks (LAYER6 MLP or Synerise residual FFN) on Ray Train; with ``finetune_hours``
Synerise's second stage fine-tunes on the latest training rows in-process. Files: ``nn/``."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from engagesim.config import NNConfig
from engagesim.models.data import label_matrix, matrix
from engagesim.models.families._net import NNMember, load_net
from engagesim.models.family import Family, FitContext, Level, Member, register_family


@register_family
class NNFamily(Family):
    name = "nn"
    config_class = NNConfig

    def fit(self, level: Level, train: pa.Table, valid: pa.Table, features: list[str],
            ctx: FitContext) -> list[Member]:
        """Stage 1 on Ray Train (DDP / ZeRO-2); stage 2, when configured, on the most recent training rows."""
        from engagesim.models import nn

        c: NNConfig = ctx.settings(self)
        x = matrix(train, features)
        mean, std = nn.fit_normaliser(x)
        spec = nn.NNSpec(arch=c.arch, n_inputs=x.shape[1], n_outputs=len(level.labels), task=level.task,
                         hidden=list(nn.LAYER6_PRESETS[c.layer6_preset]), dropout=c.dropout, width=c.width,
                         fourier_scales=c.fourier_scales, mean=mean, std=std)
        batch = c.batch_size or nn.default_batch(train.num_rows, c.workers)
        model = nn.fit_ray(train, features, list(level.labels), spec, ctx.ray_dir, f"{level.name}_nn", c, batch,
                           ctx.resources(self))
        info = None
        if c.finetune_hours > 0:
            times = pc.cast(train.column(level.time_column), pa.int64()).to_numpy(zero_copy_only=False)
            recent = times >= times.max() - int(c.finetune_hours * 3600 * 1e6)
            y = label_matrix(train, level.labels)
            losses = nn.train_epochs(model, x[recent], y[recent], epochs=c.finetune_epochs,
                                     batch_size=min(batch, max(int(recent.sum()) // 10, 32)),
                                     lr=c.lr * c.finetune_lr_scale)
            model.eval()
            info = {"finetune_rows": int(recent.sum()), "finetune_loss": losses}
        ctx.info["nn_two_stage"] = info
        return [NNMember("nn", model, features)]

    def load(self, directory: str, level: Level, member: str) -> Member | None:
        return load_net(directory, "nn")
