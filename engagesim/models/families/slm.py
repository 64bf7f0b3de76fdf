"""LAYER6's SLM family: [MLM adaptation →] end-to-end fine-tuning [→ distillation], each step on Ray Train.

Members ``slm`` and (with ``train.slm.distill_layers``) ``slm_distilled``; the text column is the level's
(``text`` for posts, ``post_text`` for impressions). What it measured (held-out MLM loss, parameters and
scoring speed of teacher and student) goes into the level's metrics as ``slm``. Files: ``slm/``,
``slm_distilled/`` (safetensors + spec JSON + tokenizer files).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engagesim import io
from engagesim.config import SLMConfig
from engagesim.models.data import label_matrix, matrix
from engagesim.models.distributed import Resources
from engagesim.models.family import Family, FitContext, Level, Member, register_family


class SLMMember(Member):
    def __init__(self, name: str, model, tokenizer, features: list[str]):
        self.name, self.model, self.tokenizer, self.features = name, model, tokenizer, features

    def predict(self, table: pa.Table, upstream: dict[str, np.ndarray]) -> np.ndarray:
        from engagesim.models import slm

        return slm.predict_table(self.model, self.tokenizer, self.features, table)

    def save(self, directory: str) -> None:
        from engagesim.models import slm

        slm.save(self.model, self.tokenizer, io.join(directory, self.name), self.features)


@register_family
class SLMFamily(Family):
    name = "slm"
    config_class = SLMConfig
    member_names = ("slm", "slm_distilled")

    def fit(self, level: Level, train: pa.Table, valid: pa.Table, features: list[str],
            ctx: FitContext) -> list[Member]:
        members, ctx.info["slm"] = fit_slm(ctx.settings(self), level, train, valid, features, ctx)
        return members

    def load(self, directory: str, level: Level, member: str) -> Member | None:
        from engagesim.models import slm

        if not io.exists(io.join(directory, member, "config.json")):
            return None
        return SLMMember(member, *slm.load(io.join(directory, member)))


def latest_rows(table: pa.Table, time_column: str, max_rows: int | None) -> pa.Table:
    """The most recent ``max_rows`` rows (all when None): the rows closest to what will be predicted."""
    if max_rows is None or table.num_rows <= max_rows:
        return table
    order = pc.sort_indices(table, sort_keys=[(time_column, "descending")])[:max_rows]
    return table.take(order)


def _rows_per_second(model, ids: np.ndarray, x: np.ndarray) -> float:
    """Scoring throughput on distinct texts (the encoder dominates)."""
    _, first = np.unique(ids, axis=0, return_index=True)
    sample = first[:512]
    started = time.perf_counter()
    model.logits(ids[sample], x[sample])
    return round(len(sample) / max(time.perf_counter() - started, 1e-9), 1)


def fit_slm(c, level: Level, train: pa.Table, valid: pa.Table, features: list[str], ctx: FitContext
            ) -> tuple[list[SLMMember], dict[str, Any]]:
    """The fine-tuned ``slm`` (and ``slm_distilled``) members and what was measured (``c``: train.slm)."""
    from engagesim.embed.text import load_encoder
    from engagesim.models import mlm, nn, slm

    labels, task, text_column, time_column = list(level.labels), level.task, level.text_column, level.time_column
    ray_dir, log, resources = ctx.ray_dir, ctx.log, Resources.of(c, ctx.use_gpu)
    for table, split in ((train, "training"), (valid, "validation")):
        if text_column not in table.column_names:
            raise ValueError(f"train.models has 'slm' but the {split} feature table has no {text_column!r} column "
                             "(rebuild the features with this version of engagesim)")
    ref, tokenizer, encoder = load_encoder(c.encoder, "train.slm.encoder", add_pooling_layer=False)
    rows = latest_rows(train, time_column, c.max_rows)
    ids_tr = slm.token_ids(tokenizer, rows.column(text_column).to_pylist(), c.max_length)
    ids_va = slm.token_ids(tokenizer, valid.column(text_column).to_pylist(), c.max_length)
    x_tr, x_va = matrix(rows, features), matrix(valid, features)
    info: dict[str, Any] = {"encoder": c.encoder, "random_weights": ref.random_weights, "rows": rows.num_rows,
                            "distinct_texts": int(len(np.unique(ids_tr, axis=0)))}
    if c.mlm_steps:
        started = time.perf_counter()
        info["mlm"] = mlm.adapt(encoder, tokenizer, sorted(set(rows.column(text_column).to_pylist())),
                                sorted(set(valid.column(text_column).to_pylist())), c.mlm_steps, ray_dir,
                                f"{level.name}_slm_mlm", resources, c.mlm_batch_size, c.mlm_lr, c.max_length,
                                location=None if ref.kind == "tiny" else ref.location)
        info["mlm"]["seconds"] = round(time.perf_counter() - started, 1)
        log(f"{level.name} slm: MLM adaptation, held-out loss {info['mlm']['held_out_loss_before']:.3f} → "
            f"{info['mlm']['held_out_loss_after']:.3f}")
    mean, std = nn.fit_normaliser(x_tr)
    spec = slm.SLMSpec(encoder=c.encoder, encoder_config=encoder.config.to_dict(), text_column=text_column,
                       max_length=c.max_length, pad_id=int(tokenizer.pad_token_id or 0), n_tabular=len(features),
                       n_outputs=len(labels), task=task, hidden=list(c.hidden), dropout=c.dropout, mean=mean, std=std,
                       random_weights=ref.random_weights)
    model = slm.SLMNet(spec, encoder)
    slm.init_output_bias(model, label_matrix(rows, labels))
    started = time.perf_counter()
    teacher = slm.fit_ray(model, ids_tr, rows, features, labels, ray_dir, f"{level.name}_slm", c, resources)
    info["seconds"] = round(time.perf_counter() - started, 1)
    info["train_loss"] = teacher.train_metrics.get("loss")
    members = [SLMMember("slm", teacher, tokenizer, features)]
    if c.distill_layers:
        student = slm.student_from(teacher, c.distill_layers)
        started = time.perf_counter()
        student = slm.fit_ray(student, ids_tr, rows, features, labels, ray_dir, f"{level.name}_slm_distilled", c,
                              resources, epochs=c.distill_epochs, teacher=teacher.logits(ids_tr, x_tr),
                              alpha=c.distill_alpha)
        members.append(SLMMember("slm_distilled", student, tokenizer, features))
        info["distilled"] = {
            "layers": student.spec.encoder_config["num_hidden_layers"],
            "teacher_layers": teacher.spec.encoder_config["num_hidden_layers"],
            "parameters": slm.parameter_count(student), "teacher_parameters": slm.parameter_count(teacher),
            "rows_per_s": _rows_per_second(student, ids_va, x_va),
            "teacher_rows_per_s": _rows_per_second(teacher, ids_va, x_va),
            "seconds": round(time.perf_counter() - started, 1)}
        log(f"{level.name} slm: distilled {info['distilled']['teacher_layers']} → {info['distilled']['layers']} layers")
    return members, info
