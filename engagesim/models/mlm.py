"""Masked-language-model domain adaptation of the SLM's text encoder on post text.

A general-purpose encoder has seen little text shaped like posts (hashtags,
handles, brand names). A few hundred MLM steps on the training split's texts —
never the validation posts — move it towards that domain before the SLM
fine-tunes it on engagement. Runs on Ray Train (DDP) like every other fit; the
held-out MLM loss before and after, on the validation texts with a fixed
masking seed, says whether it helped.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load as from_bytes
from safetensors.torch import save as to_bytes
from torch import nn

from engagesim.embed.text import quiet_transformers
from engagesim.models import distributed


def unshared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the second name of tied tensors (the MLM decoder is the word embedding matrix);
    safetensors refuses shared storage, and loading the first name restores both."""
    seen: set[int] = set()
    out = {}
    for key, value in model.state_dict().items():
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        out[key] = value
    return out


def mlm_model(encoder: nn.Module, location: str | None = None) -> tuple[nn.Module, bool]:
    """(the encoder's architecture with an MLM head, whether that head came pretrained). The encoder's weights
    are copied in; the head is the checkpoint's at ``location`` when it has one (BERT checkpoints do,
    sentence-transformers ones such as all-MiniLM-L6-v2 do not: their head starts fresh)."""
    from transformers import AutoModelForMaskedLM

    mlm = AutoModelForMaskedLM.from_config(encoder.config)
    head_pretrained = False
    if location is not None:
        with quiet_transformers():
            loaded, info = AutoModelForMaskedLM.from_pretrained(location, output_loading_info=True)
        head_pretrained = not any(k.startswith(("cls.", "lm_head.", "vocab_")) for k in info["missing_keys"])
        mlm.load_state_dict(loaded.state_dict(), strict=False)
    missing, _ = mlm.base_model.load_state_dict(encoder.state_dict(), strict=False)
    if missing:
        raise ValueError(f"train.slm.mlm_steps: the encoder's weights do not fit its MLM architecture ({missing[:3]})")
    return mlm, head_pretrained


class MaskedOnlyLoss(nn.Module):
    """MLM loss with the vocabulary projection computed at the masked positions only (~15 % of tokens): on CPU
    that 30k-wide projection of every token is most of a step. BERT-family heads (``cls``); others use the
    model's own loss."""

    def __init__(self, mlm: nn.Module):
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_) -> torch.Tensor:
        head = getattr(self.mlm, "cls", None)
        if head is None:
            return self.mlm(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        hidden = self.mlm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        picked = labels != -100
        return nn.functional.cross_entropy(head(hidden[picked]), labels[picked])


def masked_batch(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """15 % of tokens masked (80/10/10 as BERT), labels -100 elsewhere — transformers' own collator."""
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    enc = tokenizer([t or "" for t in texts], truncation=True, max_length=max_length)
    return collator([{"input_ids": ids} for ids in enc["input_ids"]])


@torch.inference_mode()
def held_out_loss(mlm: nn.Module, tokenizer, texts: list[str], max_length: int, batch_size: int = 32,
                  seed: int = 0) -> float:
    """Mean MLM loss with a fixed masking seed, so before/after compare the same masked tokens."""
    mlm.eval()
    torch.manual_seed(seed)
    total, count = 0.0, 0
    loss = MaskedOnlyLoss(mlm)
    for lo in range(0, len(texts), batch_size):
        batch = masked_batch(tokenizer, texts[lo:lo + batch_size], max_length)
        n = int((batch["labels"] != -100).sum())
        if n:
            total += float(loss(**batch)) * n
            count += n
    return total / max(count, 1)


def _worker_loop(rows: dict, params: dict) -> distributed.WorkerLoop:
    """Each worker: the MLM copy of the encoder from the object store, one masked batch per unit."""
    import ray
    import ray.train
    import ray.train.torch
    from transformers import AutoConfig, AutoModelForMaskedLM

    texts = rows["train"].column("text").to_pylist()
    tokenizer = params["tokenizer"]
    mlm = AutoModelForMaskedLM.from_config(AutoConfig.for_model(**params["encoder_config"]))
    mlm.load_state_dict(from_bytes(ray.get(params["init"])), strict=False)
    device = ray.train.torch.get_device()
    rng = np.random.default_rng(ray.train.get_context().get_world_rank())
    losses: list[float] = []

    def optimizer(_module: nn.Module) -> torch.optim.Optimizer:
        encoder_params = list(mlm.base_model.parameters())
        encoder_ids = {id(p) for p in encoder_params}
        return torch.optim.AdamW([{"params": encoder_params, "lr": params["lr"]},
                                  {"params": [p for p in mlm.parameters() if id(p) not in encoder_ids],
                                   "lr": params["lr"]}], weight_decay=0.01)

    def step(unit: int, t: distributed.Trainables) -> dict:
        model, optim = t.model, t.optimizer
        # A fresh head first learns alone: its random gradients would otherwise scramble the pretrained encoder.
        optim.param_groups[0]["lr"] = 0.0 if unit < params["head_warmup"] else params["lr"]
        model.train()
        picked = [texts[i] for i in rng.integers(0, len(texts), params["batch_size"])]
        loss = model(**{k: v.to(device) for k, v in masked_batch(tokenizer, picked, params["max_length"]).items()})
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        losses.append(float(loss.detach()))
        return {"step": unit + 1, "loss": float(np.mean(losses[-20:]))}

    return distributed.WorkerLoop(module=MaskedOnlyLoss(mlm), saved=mlm, optimizer=optimizer, units=params["steps"],
                                  run=step, every=params["checkpoint_every"], weights=unshared_state, strict=False,
                                  ddp={"find_unused_parameters": True}, unit_name="step")


def adapt(encoder: nn.Module, tokenizer, train_texts: list[str], valid_texts: list[str], steps: int,
          storage_path: str, name: str, resources: distributed.Resources, batch_size: int = 32, lr: float = 1e-4,
          max_length: int = 48, checkpoint_every: int = 50, location: str | None = None) -> dict:
    """MLM-train a copy of ``encoder`` on ``train_texts`` (Ray Train), copy the adapted weights back into
    ``encoder`` and return the held-out losses before and after."""
    import ray

    mlm, head_pretrained = mlm_model(encoder, location)
    probe = list(valid_texts[:256])
    before = held_out_loss(mlm, tokenizer, probe, max_length)
    params = {"encoder_config": encoder.config.to_dict(), "init": ray.put(to_bytes(unshared_state(mlm))),
              "tokenizer": tokenizer, "steps": steps, "batch_size": batch_size, "lr": lr, "max_length": max_length,
              "checkpoint_every": checkpoint_every, "head_warmup": 0 if head_pretrained else steps // 4}
    result = distributed.fit_on_ray(_worker_loop, {"train": pa.table({"text": [t or "" for t in train_texts]})},
                                    params, resources, name, storage_path)
    mlm.load_state_dict(distributed.checkpoint_weights(result), strict=False)
    after = held_out_loss(mlm, tokenizer, probe, max_length)
    encoder.load_state_dict(mlm.base_model.state_dict(), strict=False)
    return {"steps": steps, "train_texts": len(train_texts), "held_out_texts": len(probe),
            "head_pretrained": head_pretrained, "head_only_steps": 0 if head_pretrained else steps // 4,
            "held_out_loss_before": round(before, 4), "held_out_loss_after": round(after, 4)}
