"""A training level's rows: read into the driver below ``train.stream_rows``, a Ray Dataset above it.

``read_inputs`` is the one place that decides. In memory, the table is read once (posts without a label
dropped part by part) and split. Streamed, the training split stays a Ray Dataset (negatives sampled block by
block at impression level), the validation split is cut by a hash of the level's keys into the fit rows
(gathered, bounded by ``train.valid_fit_rows``) and the scored rows (``pipeline/validation.py``), and at post
level the per-account training means — the account-mean baseline — come from a Ray Data groupby instead of
the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from engagesim import datasets, io
from engagesim.config import AppConfig
from engagesim.metrics import rmse
from engagesim.models import distributed
from engagesim.models.data import rows_of_split, sample_negatives
from engagesim.models.distributed import Resources
from engagesim.models.family import IMPRESSION, POST, Level, get_family
from engagesim.pipeline import validation
from engagesim.runtime import ensure_ray


def _split(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(train, valid); the test rows stay for the evaluation stage."""
    return rows_of_split(table, "train"), rows_of_split(table, "valid")


def post_baseline_predictions(train: pa.Table, valid: pa.Table) -> dict[str, np.ndarray]:
    """The training mean, and each account's training mean (the global one for a new account), per row."""
    y_tr = train.column("label_log1p_likes").to_numpy()
    acct = pl.DataFrame({"a": train.column("author_id").to_pylist(), "y": y_tr}).group_by("a").agg(pl.col("y").mean())
    return account_baselines(acct, float(y_tr.mean()), valid)


def account_baselines(acct: pl.DataFrame, prior: float, valid: pa.Table) -> dict[str, np.ndarray]:
    """``post_baseline_predictions`` from the account means ([a, y]) and the global mean ``prior``."""
    per = pl.DataFrame({"a": valid.column("author_id").to_pylist()}).join(acct, on="a", how="left", maintain_order="left")
    return {"global_mean": np.full(valid.num_rows, prior), "account_mean": per["y"].fill_null(prior).to_numpy()}


def post_baselines(train: pa.Table, valid: pa.Table) -> dict[str, dict]:
    """RMSE of each of ``post_baseline_predictions`` on ``valid``."""
    y_va = valid.column("label_log1p_likes").to_numpy()
    return {k: {"rmse": rmse(y_va, v)} for k, v in post_baseline_predictions(train, valid).items()}


@dataclass
class LevelInputs:
    """A level's rows: in memory below ``train.stream_rows``; above it the training split stays a Ray
    Dataset that families which can stream read shard by shard on their workers (the others gather it
    into the driver), and ``valid`` holds only the validation fit rows: the rest (``valid_scored``) is
    scored on Ray Data (``pipeline/validation.py``). Both levels: at 40M impressions the million posts
    (56 columns) held in the driver took it from 0.23 to 1.30 GB."""

    rows: int
    valid: pa.Table
    train_table: pa.Table | None = None
    train_stream: Any = None
    schema: pa.Schema | None = None
    valid_scored: Any = None
    valid_rows: int = 0
    account_means: Any = None  # post level, streamed: Ray Dataset [author_id, account_mean] of the training posts
    global_mean: float = 0.0

    @property
    def streamed(self) -> bool:
        return self.train_stream is not None

    def train_for(self, family, log: Callable[[str], None]) -> Any:
        if self.streamed and family.streams:
            return self.train_stream
        if self.train_table is None:
            log(f"{family.name} cannot stream: gathering the training split into the driver")
            self.train_table = datasets.collect(self.train_stream)
        return self.train_table


# Automatic train.stream_rows: in-memory tables up to 320 MiB of 8-byte values, so the driver stays under 1.5 GB.
# The in-memory path costs the driver about twice that estimate on top of the ~0.76 GB it holds before training
# (the table, its split copies, the workers' slices it writes to the object store, the members' predictions):
# bench/rows.py at 400k impressions peaked at 1.58 GB in memory (0.76 GB before training) and 0.87 GB streamed
# (like RCE 30.09 / 29.95); at 1M in memory, 3.33 GB. The old 1 GiB let 1M rows in.
DRIVER_TABLE_BYTES = 320 << 20
# Automatic train.valid_fit_rows: the validation fit rows' 8-byte values. At 256 MiB (262k rows of 128 columns)
# the driver went from 1.13 to 1.66 GB while XGBoost fit at 4M impressions (bench/rows.py, its steps): the rows,
# their copy in the object store and the members' prediction matrices. Half of that keeps it under 1.5 GB.
VALID_FIT_BYTES = 1 << 27


def streams_split(cfg: AppConfig, uri: str, split: str) -> bool:
    """Whether a split of a feature table is too large for the driver (the evaluation stage holds the test
    split alone: at 40M impressions the 100k test posts of a 1M-post table score in 3.8 s in memory, 141 s
    streamed, so the decision is on the split's rows, not the table's)."""
    rows = io.count_rows(uri, cfg.storage, pc.field("split") == split)
    return rows >= stream_threshold(cfg, len(io.dataset_schema(uri, cfg.storage).names))


def stream_threshold(cfg: AppConfig, columns: int) -> int:
    """``train.stream_rows``, or where unset the rows whose 8-byte values fill ``DRIVER_TABLE_BYTES``."""
    return cfg.train.stream_rows or max(DRIVER_TABLE_BYTES // (8 * max(columns, 1)), 1)


def read_inputs(cfg: AppConfig, level: Level, uri: str, log: Callable[[str], None]) -> LevelInputs:
    rows = io.read_manifest(uri, cfg.storage).get("rows", 0)
    schema = io.dataset_schema(uri, cfg.storage)
    if rows < stream_threshold(cfg, len(schema.names)):
        # Posts without a label (NaN) are dropped part by part while reading: filtering the table read whole kept
        # two copies at once (1M posts, 347 MB of Arrow: the driver went from 0.23 to 1.19 GB, 0.67 GB this way).
        labelled = pc.invert(pc.is_nan(pc.field("label_log1p_likes"))) if level is POST else None
        table = io.read_table(uri, cfg.storage, filters=labelled)
        train, valid = _split(table)
        if level is IMPRESSION:
            train = sample_negatives(train, cfg.train.sample.negatives, cfg.train.sample.seed)
        return LevelInputs(train.num_rows, valid, train_table=train, schema=table.schema)
    ensure_ray(cfg.ray)
    ds = datasets.read(uri, cfg.storage, cfg.features.blocks)
    if level is POST:
        ds = ds.map_batches(validation.labelled, batch_format="pyarrow")
    fit_rows = cfg.train.valid_fit_rows or max(VALID_FIT_BYTES // (8 * len(schema.names)), 10)
    valid, scored, valid_rows = validation.split_valid(ds, fit_rows, cfg.train.sample.seed, level.keys)
    train = ds.map_batches(validation.rows_of, fn_kwargs={"split": "train"}, batch_format="pyarrow")
    sample = cfg.train.sample
    if level is IMPRESSION and sample.negatives < 1:
        train = train.map_batches(sample_negatives, batch_format="pyarrow",
                                  fn_kwargs={"rate": sample.negatives, "seed": sample.seed})
    streaming = [get_family(name) for name in cfg.train.models if get_family(name).streams]
    if any(distributed.starves_data(Resources.of(getattr(cfg.train, f.name, None))) for f in streaming):
        # Every trainer would take the whole cluster and starve the read tasks (distributed.route_inputs):
        # execute the split once into the object store, shared by every family's fits and passes.
        log(f"{level.name}: trainers take every CPU; materializing the training split in the object store")
        train = train.materialize()
    sampled = level is IMPRESSION and sample.negatives < 1
    kept = train.count() if sampled else validation.count_splits(ds)["train"]
    data = LevelInputs(kept, valid, train_stream=train, schema=schema, valid_scored=scored, valid_rows=valid_rows)
    if level is POST:
        data.account_means, data.global_mean = validation.account_means(train)
    return data


def baselines_of(data: LevelInputs) -> dict[str, np.ndarray]:
    """The baselines' predictions of the (fit) validation rows, from the rows in memory or the account means."""
    if data.train_table is not None and not data.streamed:
        return post_baseline_predictions(data.train_table, data.valid)
    authors = data.valid.column("author_id").cast(pa.string()).to_pylist()
    return account_baselines(validation.account_means_of(data.account_means, authors), data.global_mean, data.valid)
