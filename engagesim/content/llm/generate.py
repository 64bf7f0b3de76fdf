"""Generation from a base model + LoRA adapter (or the base alone)."""

from __future__ import annotations

import torch

from engagesim.content.llm.data import prompt_prefix
from engagesim.content.llm.weights import load_causal_lm


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
