"""The SLM family of the training stage: [MLM adaptation →] end-to-end fine-tuning [→ distillation].

Called by the post-level stage (text column ``text``, log1p(likes)) and the
impression-level stage (``post_text``, the four engagements). Each step runs on
Ray Train; what it measured (held-out MLM loss, parameters and scoring speed of
teacher and student) goes into the run's metrics.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engagesim import io
from engagesim.config import AppConfig
from engagesim.embed.text import load_encoder
from engagesim.models import mlm, nn, slm
from engagesim.models.data import matrix


def latest_rows(table: pa.Table, time_column: str, max_rows: int | None) -> pa.Table:
    """The most recent ``max_rows`` rows (all when None): the rows closest to what will be predicted."""
    if max_rows is None or table.num_rows <= max_rows:
        return table
    order = pc.sort_indices(table, sort_keys=[(time_column, "descending")])[:max_rows]
    return table.take(order)


def _rows_per_second(model: slm.SLMNet, ids: np.ndarray, x: np.ndarray) -> float:
    """Scoring throughput on distinct texts (the encoder dominates)."""
    _, first = np.unique(ids, axis=0, return_index=True)
    sample = first[:512]
    started = time.perf_counter()
    model.logits(ids[sample], x[sample])
    return round(len(sample) / max(time.perf_counter() - started, 1e-9), 1)


def fit_slm_family(cfg: AppConfig, train: pa.Table, valid: pa.Table, features: list[str], labels: list[str],
                   task: str, text_column: str, time_column: str, out_dir: str, ray_dir: str, level: str,
                   use_gpu: bool = False, log: Callable[[str], None] = lambda _: None
                   ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Validation predictions of ``slm`` (and ``slm_distilled``) and what was measured; models saved under
    ``out_dir/slm`` and ``out_dir/slm_distilled``."""
    c = cfg.train.slm
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
                                f"{level}_slm_mlm", c.mlm_batch_size, c.mlm_lr, c.max_length, c.workers,
                                c.cpus_per_worker, use_gpu, location=None if ref.kind == "tiny" else ref.location)
        info["mlm"]["seconds"] = round(time.perf_counter() - started, 1)
        log(f"{level} slm: MLM adaptation, held-out loss {info['mlm']['held_out_loss_before']:.3f} → "
            f"{info['mlm']['held_out_loss_after']:.3f}")
    mean, std = nn.fit_normaliser(x_tr)
    spec = slm.SLMSpec(encoder=c.encoder, encoder_config=encoder.config.to_dict(), text_column=text_column,
                       max_length=c.max_length, pad_id=int(tokenizer.pad_token_id or 0), n_tabular=len(features),
                       n_outputs=len(labels), task=task, hidden=list(c.hidden), dropout=c.dropout, mean=mean, std=std,
                       random_weights=ref.random_weights)
    fit = {"epochs": c.epochs, "batch_size": c.batch_size, "lr": c.lr, "encoder_lr": c.encoder_lr,
           "workers": c.workers, "cpus_per_worker": c.cpus_per_worker, "use_gpu": use_gpu}
    model = slm.SLMNet(spec, encoder)
    slm.init_output_bias(model, np.column_stack([rows.column(col).to_numpy(zero_copy_only=False) for col in labels]))
    started = time.perf_counter()
    teacher = slm.fit_ray(model, ids_tr, rows, features, labels, ray_dir, f"{level}_slm", **fit)
    info["seconds"] = round(time.perf_counter() - started, 1)
    info["train_loss"] = teacher.train_metrics.get("loss")
    slm.save(teacher, tokenizer, io.join(out_dir, "slm"), features)
    preds = {"slm": teacher.predict(ids_va, x_va)}
    if c.distill_layers:
        student = slm.student_from(teacher, c.distill_layers)
        started = time.perf_counter()
        student = slm.fit_ray(student, ids_tr, rows, features, labels, ray_dir, f"{level}_slm_distilled",
                              **{**fit, "epochs": c.distill_epochs}, teacher=teacher.logits(ids_tr, x_tr),
                              alpha=c.distill_alpha)
        slm.save(student, tokenizer, io.join(out_dir, "slm_distilled"), features)
        preds["slm_distilled"] = student.predict(ids_va, x_va)
        info["distilled"] = {
            "layers": student.spec.encoder_config["num_hidden_layers"],
            "teacher_layers": teacher.spec.encoder_config["num_hidden_layers"],
            "parameters": slm.parameter_count(student), "teacher_parameters": slm.parameter_count(teacher),
            "rows_per_s": _rows_per_second(student, ids_va, x_va),
            "teacher_rows_per_s": _rows_per_second(teacher, ids_va, x_va),
            "seconds": round(time.perf_counter() - started, 1)}
        log(f"{level} slm: distilled {info['distilled']['teacher_layers']} → {info['distilled']['layers']} layers")
    return preds, info
