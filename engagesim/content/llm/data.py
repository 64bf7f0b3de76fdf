"""(prompt → post) examples as token ids with the prompt masked out of the loss, micro-batches, held-out loss."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from engagesim.content.prompts import chat

FALLBACK_TEMPLATE = "{prompt}\n### Tweet:\n"
IGNORE = -100


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
