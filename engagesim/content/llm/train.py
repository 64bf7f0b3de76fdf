"""LoRA fine-tuning of a causal LLM on (prompt → post text), on the shared Ray Train loop.

The unit of the loop is one optimizer step: ``grad_accum`` micro-batches of ``batch_size`` rows, then
(under DDP) gradient clipping, AdamW and the warm-up/decay schedule; DeepSpeed ZeRO-2 replaces DDP and
steps both itself when ``deepspeed`` is on. Checkpoints hold only what LoRA trains (PEFT's adapter
safetensors + adapter_config.json, so a checkpoint folder is a loadable adapter), the optimizer moments
(safetensors, DDP mode) and the step counter with the held-out loss before training (JSON) — no pickle —
and a restarted worker resumes mid-epoch from the latest one with the same batch order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from engagesim.config import LLMConfig, LoraSettings
from engagesim.content.llm.data import collate, mean_loss
from engagesim.content.llm.weights import load_causal_lm
from engagesim.models import distributed

ADAPTER = "adapter_model.safetensors"


def lora_model(model, lora: LoraSettings):
    from peft import get_peft_model

    return get_peft_model(model, lora.to_peft())


@dataclass
class Schedule:
    """Optimizer steps: micro-batches of ``batch_size`` accumulated ``grad_accum`` times, linear warm-up/decay."""

    rows_per_worker: int
    batch_size: int
    grad_accum: int
    epochs: int
    max_steps: int | None = None

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.rows_per_worker / self.batch_size) // self.grad_accum)

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _autocast(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "fp32":
        return torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()) \
        else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _adapter_io(model) -> tuple:
    """(write, read) of a checkpoint folder that is also a loadable PEFT adapter."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def write(folder: Path) -> None:
        weights = {k: v.detach().float().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
        save_file(weights, str(folder / ADAPTER))
        model.peft_config["default"].save_pretrained(str(folder))

    def read(folder: Path) -> None:
        set_peft_model_state_dict(model, load_file(str(folder / ADAPTER)))

    return write, read


def _worker_loop(rows: dict, params: dict) -> distributed.WorkerLoop:
    import ray.train
    import ray.train.torch

    cfg = LLMConfig.model_validate(params["llm"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)
    base, tokenizer, _ = load_causal_lm(cfg.model, cfg.cache_dir)
    model = lora_model(base, cfg.lora).to(device)
    ids, labels = rows["train"].column("input_ids").to_pylist(), rows["train"].column("labels").to_pylist()
    valid: pa.Table | None = params["valid"]
    schedule = Schedule(len(ids), cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.max_steps)
    total, per_epoch, accum = schedule.total_steps, schedule.steps_per_epoch, cfg.grad_accum
    trainable = [p for p in model.parameters() if p.requires_grad]
    state: dict = {}
    losses: list[float] = []
    started = time.perf_counter()

    def micro_batches(epoch: int) -> list[np.ndarray]:
        """Whole optimizer steps of one epoch, in an order that depends on (seed, rank, epoch) only — a
        resumed worker sees the batches it would have seen."""
        order = np.random.default_rng((cfg.seed, rank, epoch)).permutation(len(ids))
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        return batches[:len(batches) // accum * accum]

    def step(unit: int, t: distributed.Trainables) -> dict:
        if valid is not None and rank == 0 and "valid_loss_before" not in state:
            state["valid_loss_before"] = mean_loss(model, valid, tokenizer.pad_token_id, device=str(device))
        epoch, within = divmod(unit, per_epoch)
        t.model.train()
        for picked in micro_batches(epoch)[within * accum:(within + 1) * accum]:
            batch = {k: v.to(device) for k, v in collate([ids[i] for i in picked], [labels[i] for i in picked],
                                                          tokenizer.pad_token_id).items()}
            if t.engine is not None:
                loss = t.engine(**batch).loss
                t.engine.backward(loss)
                t.engine.step()  # DeepSpeed steps the optimizer and schedule at the accumulation boundary
                losses.append(float(loss.detach()))
            else:
                with _autocast(device, cfg.precision):
                    loss = t.model(**batch).loss / accum
                loss.backward()
                losses.append(float(loss.detach()) * accum)
        if t.engine is None:
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            t.optimizer.step()
            t.scheduler.step()
            t.optimizer.zero_grad(set_to_none=True)
        metrics = {"step": unit + 1, "train_loss": float(np.mean(losses[-accum * 10:] or [0.0])),
                   "lr": float(t.scheduler.get_last_lr()[0]), "epoch": epoch,
                   "seconds": time.perf_counter() - started}
        if unit + 1 == total and valid is not None and rank == 0:
            metrics["valid_loss_before"] = state["valid_loss_before"]
            metrics["valid_loss_after"] = mean_loss(model, valid, tokenizer.pad_token_id, device=str(device))
        return metrics

    write, read = _adapter_io(model)
    return distributed.WorkerLoop(
        module=model, units=total, run=step, every=cfg.checkpoint_every, write=write, read=read, state=state,
        optimizer=lambda _m: torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, total)),
        unit_name="step")


def fit_ray(train: pa.Table, valid: pa.Table | None, cfg: LLMConfig, storage_path: str, name: str,
            callbacks: list | None = None, max_failures: int = 1):
    """LoRA-tune ``cfg.model`` with the ``content.llm`` settings ``cfg`` (workers, DeepSpeed, schedule) on Ray
    Train; returns Ray's Result (metrics + the final checkpoint, itself a PEFT adapter folder).

    ``callbacks``: hooks into the loop (the chaos test passes a worker-killer)."""
    cfg = cfg.model_copy(update={"cache_dir": str(Path(cfg.cache_dir).resolve())})
    params = {"llm": cfg.model_dump(), "valid": valid if valid is not None and valid.num_rows else None}
    deepspeed = ({"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "precision": cfg.precision}
                 if cfg.deepspeed else None)
    return distributed.fit_on_ray(_worker_loop, {"train": train}, params,
                                  distributed.Resources(cfg.workers, cfg.cpus_per_worker, cfg.use_gpu), name,
                                  storage_path, deepspeed=deepspeed, callbacks=callbacks, max_failures=max_failures,
                                  keep=2)
