"""The RecSys 2021 networks (LAYER6 MLP or Synerise residual FFN) on Ray Train; with ``finetune_hours``
Synerise's second stage fine-tunes on the latest training rows in-process. Files: ``nn/``."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc

from engagesim import datasets
from engagesim.config import NNConfig
from engagesim.models.data import label_matrix, matrix, weights
from engagesim.models.distributed import is_dataset
from engagesim.models.families._net import NNMember, load_net
from engagesim.models.family import Family, FitContext, Level, Member, register_family


def _since(batch: pa.Table, column: str, start) -> pa.Table:
    return batch.filter(pc.greater_equal(batch.column(column), pa.scalar(start, batch.schema.field(column).type)))


@register_family
class NNFamily(Family):
    name = "nn"
    config_class = NNConfig
    streams = True
    weighted = True

    def fit(self, level: Level, train: pa.Table, valid: pa.Table, features: list[str],
            ctx: FitContext) -> list[Member]:
        """Stage 1 on Ray Train (DDP / ZeRO-2); stage 2, when configured, on the most recent training rows."""
        from engagesim.models import nn

        c: NNConfig = ctx.settings(self)
        streamed = is_dataset(train)
        x = None if streamed else matrix(train, features)
        mean, std = nn.fit_normaliser_stream(train, features) if streamed else nn.fit_normaliser(x)
        spec = nn.NNSpec(arch=c.arch, n_inputs=len(features), n_outputs=len(level.labels), task=level.task,
                         hidden=list(c.hidden or nn.LAYER6_PRESETS[c.layer6_preset]), dropout=c.dropout, width=c.width,
                         fourier_scales=c.fourier_scales, mean=mean, std=std)
        rows = ctx.train_rows if streamed else train.num_rows
        batch = c.batch_size or nn.default_batch(rows, c.workers)
        model = nn.fit_ray(train, features, list(level.labels), spec, ctx.ray_dir, f"{level.name}_nn", c, batch,
                           ctx.resources(self))
        info = None
        if c.finetune_hours > 0:
            window = int(c.finetune_hours * 3600 * 1e6)
            if streamed:  # only the latest rows come to the driver
                latest = train.max(level.time_column)
                recent_rows = datasets.collect(train.map_batches(_since, batch_format="pyarrow", fn_kwargs={
                    "column": level.time_column, "start": latest - dt.timedelta(microseconds=window)}))
            else:
                times = pc.cast(train.column(level.time_column), pa.int64()).to_numpy(zero_copy_only=False)
                recent_rows = train.filter(pa.array(times >= times.max() - window))
            x_recent, y_recent = matrix(recent_rows, features), label_matrix(recent_rows, level.labels)
            losses = nn.train_epochs(model, x_recent, y_recent, epochs=c.finetune_epochs,
                                     batch_size=min(batch, max(len(x_recent) // 10, 32)),
                                     lr=c.lr * c.finetune_lr_scale, w=weights(recent_rows))
            model.eval()
            info = {"finetune_rows": len(x_recent), "finetune_loss": losses}
        ctx.info["nn_two_stage"] = info
        return [NNMember("nn", model, features)]

    def load(self, directory: str, level: Level, member: str) -> Member | None:
        return load_net(directory, "nn")
