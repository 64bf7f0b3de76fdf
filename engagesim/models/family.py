"""Model families behind one protocol and one registry (huggingface/peft's ``register_peft_method`` shape).

A *family* (XGBoost, the LAYER6 NN, the kNN, SMP's stacked MLP, the SLM, or one a user registers) fits
on a level's training rows and returns *members*: fitted models that save to and load from the level's
model folder and predict an ``(n, outputs)`` float array. The training stage loops once over
``cfg.train.models``; the bundle loads what a run's ``ensemble.json["families"]`` lists; nothing else
knows which families exist. Adding one = a module with a :class:`Family` subclass + ``register_family``
(+ its config class, read from ``train.<name>`` when TrainConfig has that section, defaults otherwise).

Members see the predictions of the members fit (or loaded) before them — SMP's stacked MLP reads
XGBoost's — so a family lists what it ``requires`` and registration order is prediction order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa

from engagesim.models.distributed import Resources
from engagesim.schema import ENGAGEMENTS

if TYPE_CHECKING:
    from engagesim.config import AppConfig


@dataclass(frozen=True)
class Level:
    """What a training level predicts: its label columns, task, metric and the columns a family may need."""

    name: str  # post | impression
    labels: tuple[str, ...]
    outputs: tuple[str, ...]  # one name per label: what the ensemble file is keyed by
    task: str  # regression | binary
    time_column: str
    text_column: str
    min_rows: tuple[int, int]  # (train, valid) below which the level is skipped
    keys: tuple[str, ...]  # what names one row: hashed to sample rows the same in every pass


POST = Level("post", ("label_log1p_likes",), ("log1p_likes",), "regression", "created_at", "text", (10, 2),
             ("post_id",))
IMPRESSION = Level("impression", tuple(f"y_{e}" for e in ENGAGEMENTS), tuple(ENGAGEMENTS), "binary",
                   "impression_at", "post_text", (100, 10), ("user_id", "post_id", "impression_at"))
LEVELS = {level.name: level for level in (POST, IMPRESSION)}


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class FitContext:
    """Everything a family's ``fit`` may read besides the rows: the run's config, where Ray Train keeps
    checkpoints, whether there is a GPU, a log line sink; ``info`` collects what the fit measured."""

    cfg: AppConfig
    out_dir: str  # <run>/models/<level>
    ray_dir: str  # Ray Train storage (checkpoints)
    use_gpu: bool = False
    log: Callable[[str], None] = lambda _: None
    train_rows: int | None = None  # known without a pass over the rows (training may stream)
    info: dict[str, Any] = field(default_factory=dict)  # what a fit measured, merged into the level's metrics

    def settings(self, family: Family) -> Any:
        """``train.<family>`` when the config has that section, else the family's config defaults."""
        own = getattr(self.cfg.train, family.name, None)
        if own is not None:
            return own
        return family.config_class() if family.config_class else None

    def resources(self, family: Family) -> Resources:
        return Resources.of(self.settings(family), self.use_gpu)


class Member:
    """A fitted model of one level. Subclasses set ``name`` and implement ``predict`` and ``save``."""

    name: str
    # Whether ``predict`` also takes ``data.FeatureArrays`` (name → numpy column) for ``table``: true of a member
    # that reads its inputs through ``data.matrix`` only. Serving then skips building an Arrow table.
    takes_arrays: ClassVar[bool] = False

    def predict(self, table: pa.Table, upstream: dict[str, np.ndarray]) -> np.ndarray:
        """(rows, outputs) float32; ``upstream``: predictions of the members before this one."""
        raise NotImplementedError

    def save(self, directory: str) -> None:
        raise NotImplementedError


class Family:
    """A model family: fits members, loads them back. Register a subclass with ``register_family``."""

    name: ClassVar[str]
    config_class: ClassVar[type | None] = None
    levels: ClassVar[tuple[str, ...]] = ("post", "impression")
    requires: ClassVar[tuple[str, ...]] = ()  # members whose predictions ``fit``/``predict`` read
    streams: ClassVar[bool] = False  # ``fit`` accepts the training split as a Ray Dataset (large levels)
    weighted: ClassVar[bool] = False  # ``fit`` honours row weights (``data.WEIGHT``: train.sample)
    member_names: ClassVar[tuple[str, ...]] = ()  # the members it can make (default: its own name)

    def members(self) -> tuple[str, ...]:
        return self.member_names or (self.name,)

    def fit(self, level: Level, train: pa.Table, valid: pa.Table, features: list[str],
            ctx: FitContext) -> list[Member]:
        """``train``: an Arrow table, or (``streams`` families, above ``train.stream_rows``) a Ray Dataset."""
        raise NotImplementedError

    def load(self, directory: str, level: Level, member: str) -> Member | None:
        """The saved member under ``directory`` (None when its files are not there)."""
        raise NotImplementedError


FAMILIES: dict[str, Family] = {}
BUILTIN_FAMILIES = ("xgb", "stacked_mlp", "knn", "nn", "slm", "account_mean_eb")  # registered by importing models.families


def register_family(family: type[Family]) -> type[Family]:
    """Make a family trainable (``train.models``) and loadable; usable as a class decorator."""
    FAMILIES[family.name] = family()
    return family


def _builtins() -> None:
    import engagesim.models.families  # noqa: F401  (registers the built-in families on import)


def get_family(name: str) -> Family:
    _builtins()
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; registered: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_names() -> list[str]:
    _builtins()
    return list(FAMILIES)


def check_models(cfg: AppConfig) -> None:
    """``train.models`` names registered families only (ConfigError naming the key and the choices)."""
    from engagesim.config import ConfigError

    # The built-ins' names are known without importing them (xgboost, faiss, torch: ~2.6 s on every CLI call).
    unknown = [name for name in cfg.train.models if name not in BUILTIN_FAMILIES and name not in FAMILIES]
    if unknown:
        known = family_names()
        unknown = [name for name in unknown if name not in known]
    if unknown:
        raise ConfigError(f"train.models: unknown model famil{'y' if len(unknown) == 1 else 'ies'} "
                          f"{', '.join(unknown)}; registered: {', '.join(known)}")
    if cfg.train.sample.negatives < 1:
        unweighted = [name for name in cfg.train.models
                      if "impression" in get_family(name).levels and not get_family(name).weighted]
        if unweighted:
            raise ConfigError(f"train.sample.negatives={cfg.train.sample.negatives}: {', '.join(unweighted)} "
                              "cannot weight rows, so its probabilities would be biased; drop it from train.models "
                              "or set train.sample.negatives=1")


def family_of_member(member: str) -> Family | None:
    _builtins()
    return next((f for f in FAMILIES.values() if member in f.members()), None)

