"""What every Ray Train loop shares: trainer settings, a worker's shard, resume and checkpoint.

The XGBoost, NN, SLM, MLM and LoRA loops differ in what a step is, not in how a
worker reads its rows, picks up after a failure or hands a checkpoint back; those
live here once. Checkpoints are safetensors weights + a JSON state (never pickle),
written by rank 0 only — every rank reports, so Ray Train's barrier is met.

DeepSpeed ZeRO-2 (``deepspeed_config``/``zero2_engine``) partitions optimizer state
and gradients across workers; on CPU it runs over gloo inside Ray Train's process
group. A plain torch optimizer is passed in (DeepSpeed's fused Adam needs compiled
ops), hence ``zero_allow_untested_optimizer``. Mixed precision only on GPU.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # torch stays out of the import path of the XGBoost-only users of this module
    import torch

WEIGHTS = "model.safetensors"
STATE = "trainer_state.json"  # the JSON state of a checkpoint (Hugging Face Trainer's name)


@dataclass(frozen=True)
class Resources:
    """One stage's Ray Train resources: ``workers`` × (``cpus`` [, one GPU])."""

    workers: int = 1
    cpus: float = 1
    gpu: bool = False

    @classmethod
    def of(cls, section: Any, gpu: bool = False) -> Resources:
        """From a config section with ``workers`` / ``cpus_per_worker`` (1 each where it has none)."""
        return cls(getattr(section, "workers", 1), getattr(section, "cpus_per_worker", 1), gpu)


def storage_uri(path: str) -> str:
    """Ray Train storage: an s3:// URI as is (Ray Train writes checkpoints there), a local path absolute."""
    return path if "://" in path else str(Path(path).resolve())


def trainer_settings(name: str, storage_path: str, workers: int = 1, cpus_per_worker: float = 1,
                     use_gpu: bool = False, keep: int = 1, max_failures: int = 2) -> dict:
    """``scaling_config`` and ``run_config`` keyword arguments for any Ray Train trainer."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from engagesim.models import progress

    return {"scaling_config": ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                            resources_per_worker={"CPU": cpus_per_worker}),
            "run_config": RunConfig(name=name, storage_path=storage_uri(storage_path),
                                    checkpoint_config=CheckpointConfig(num_to_keep=keep),
                                    failure_config=FailureConfig(max_failures=max_failures),
                                    callbacks=progress.callbacks(name))}


def put_shards(tables: dict[str, pa.Table | None], workers: int, equal: bool = False) -> dict[str, list]:
    """Tables already in the driver's memory → one contiguous slice per worker in the object store.

    For data that is already one Arrow table this is what Ray Data's streaming split would end with,
    without its coordinator and manager actors or the per-batch copies: measured on a 1M-row XGBoost
    fit, ~2.5 s of Ray Train's fixed cost. Workers read their slice zero-copy (``local_shard``).
    ``equal`` drops the last ``rows % workers`` rows so every slice has the same length: DDP ranks
    must run the same number of steps, or the one with an extra batch waits forever in all-reduce.
    """
    import ray

    out = {}
    for name, table in tables.items():
        if table is None or not table.num_rows:
            continue
        rows = table.num_rows - table.num_rows % workers if equal else table.num_rows
        bounds = np.linspace(0, rows, workers + 1).astype(int)
        out[name] = [ray.put(table.slice(lo, hi - lo)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return out


def local_shard(shards: dict[str, list], name: str) -> pa.Table | None:
    """This worker's slice of ``put_shards`` output (None when there is no such table)."""
    import ray
    import ray.train

    if name not in shards:
        return None
    return ray.get(shards[name][ray.train.get_context().get_world_rank()])


STREAMED = "ray.data"  # a shard entry: this table reaches the workers through the trainer's ``datasets=``


def is_dataset(table: Any) -> bool:
    return table is not None and not isinstance(table, pa.Table) and hasattr(table, "iter_batches")


def weight_column(table: Any) -> list[str]:
    """``[WEIGHT]`` where a training table (Arrow or Ray Dataset) carries row weights, else ``[]``."""
    from engagesim.models.data import WEIGHT

    names = table.schema().names if is_dataset(table) else table.column_names
    return [WEIGHT] if WEIGHT in names else []


def narrow(table: Any, columns: list[str]) -> Any:
    """The columns a trainer needs (plus row weights where present). An Arrow table is sliced zero-copy; a
    lazy Dataset gets the projection pushed into its read; a materialized one is passed whole — projecting
    it would be one more task per block and one more copy of the split in the object store, per trainer
    (the workers select their columns from each batch anyway)."""
    from ray.data.dataset import MaterializedDataset

    if table is None:
        return None
    columns = columns + weight_column(table)
    if not is_dataset(table):
        return table.select(columns)
    return table if isinstance(table, MaterializedDataset) else table.select_columns(columns)


def route_inputs(tables: dict[str, Any], resources: Resources, equal: bool = False) -> tuple[dict, dict]:
    """(shards, datasets): driver tables become object-store slices (``put_shards``, the fast path for data
    that is already in memory); Ray Datasets go to the trainer's ``datasets=`` and stream to each worker
    (Ray Train splits them, equal-sized for every rank), never through the driver.

    A lazy Dataset needs CPUs for its read and map tasks while the workers train. Where the trainer takes
    every CPU of the cluster (the embedded default: 2 workers × 1 CPU on 2 cores) those tasks would wait
    forever — measured: 0 rows after 150 s — so the Dataset is first executed into the object store
    (``materialize``: blocks spread over the nodes and spilled to disk past its size, still never in the
    driver), and the workers then only fetch blocks."""
    datasets = {name: feedable(t, resources) for name, t in tables.items() if is_dataset(t)}
    shards = put_shards({n: t for n, t in tables.items() if n not in datasets}, resources.workers, equal)
    shards.update({name: STREAMED for name in datasets})
    return shards, datasets


def starves_data(resources: Resources) -> bool:
    """Whether a trainer of these resources leaves the cluster less than one CPU for Ray Data's tasks."""
    import ray

    return float(ray.cluster_resources().get("CPU", 0)) - resources.workers * resources.cpus < 1


def feedable(ds: Any, resources: Resources) -> Any:
    """``ds`` as a trainer of ``resources`` can consume it: materialized first where it would starve."""
    from ray.data.dataset import MaterializedDataset

    return ds.materialize() if not isinstance(ds, MaterializedDataset) and starves_data(resources) else ds


def read_rows(shards: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    """This worker's rows, by table name — the one function every Ray Train worker reads its data through.

    An object-store slice arrives whole; a streamed table (``route_inputs``) is this worker's
    ``get_dataset_shard`` — with ``stream`` the iterator itself (XGBoost builds its matrix batch by batch),
    else gathered into one table in the worker: the worker holds its shard, the driver holds nothing."""
    import ray.train

    out: dict[str, Any] = {}
    for name, entry in shards.items():
        if entry != STREAMED:
            out[name] = local_shard(shards, name)
            continue
        shard = ray.train.get_dataset_shard(name)
        if stream:
            out[name] = shard
        else:
            batches = [b for b in shard.iter_batches(batch_format="pyarrow", batch_size=65536) if b.num_rows]
            out[name] = pa.concat_tables(batches) if batches else None
    return out


# --- checkpoints: safetensors + JSON, never pickle ----------------------------------------------

def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path, name: str = "optimizer") -> None:
    """AdamW moments as safetensors + the param groups and scalar state as JSON (torch.save would pickle)."""
    import torch
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors = {f"{idx}.{key}": value.detach().contiguous().cpu() for idx, per in state["state"].items()
               for key, value in per.items() if torch.is_tensor(value)}
    scalars = {f"{idx}.{key}": value for idx, per in state["state"].items()
               for key, value in per.items() if not torch.is_tensor(value)}
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path, name: str = "optimizer") -> bool:
    """Restore what ``save_optimizer`` wrote (False when the checkpoint has no optimizer state)."""
    from safetensors.torch import load_file

    if not (folder / f"{name}.safetensors").exists():
        return False
    meta = json.loads((folder / f"{name}.json").read_text())
    state: dict[int, dict] = {}
    for key, value in [*load_file(str(folder / f"{name}.safetensors")).items(), *meta.get("scalars", {}).items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return True


def _weights_writer(module: torch.nn.Module, weights: Callable | None) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        from safetensors.torch import save

        tensors = (weights or (lambda m: m.state_dict()))(module)
        (folder / WEIGHTS).write_bytes(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))

    return write


def _weights_reader(module: torch.nn.Module, strict: bool) -> Callable[[Path], None]:
    def read(folder: Path) -> None:
        from safetensors.torch import load

        module.load_state_dict(load((folder / WEIGHTS).read_bytes()), strict=strict)

    return read


def resume(read: Callable[[Path], None], optimizer: torch.optim.Optimizer | None = None) -> dict | None:
    """After a failure: ``read`` the last checkpoint's weights (and its optimizer state into ``optimizer``)
    and return its JSON state; None when there is no checkpoint."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as folder:
        read(Path(folder))
        if optimizer is not None:
            load_optimizer(optimizer, Path(folder))
        return json.loads((Path(folder) / STATE).read_text())


def _partition(rank: int) -> str:
    return f"optimizer-rank{rank}"


def report(write: Callable[[Path], None], state: dict, metrics: dict,
           optimizer: torch.optim.Optimizer | None = None, partition: torch.optim.Optimizer | None = None) -> None:
    """Rank 0 checkpoints (``write`` its weights, ``state`` as JSON [, ``optimizer``]); every rank reports
    ``metrics``, so Ray Train's barrier is met. ``partition``: this rank's share of a ZeRO-partitioned
    optimizer — every rank adds its own file, and Ray Train merges the ranks' folders into one checkpoint."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            write(Path(folder))
            (Path(folder) / STATE).write_text(json.dumps(state))
            if optimizer is not None:
                save_optimizer(optimizer, Path(folder))
        if partition is not None:
            save_optimizer(partition, Path(folder), _partition(rank))
        if rank == 0 or partition is not None:
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def _restore_partition(partition: torch.optim.Optimizer) -> bool:
    """This rank's ZeRO optimizer share from the checkpoint being resumed (False: none saved for it)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return False
    with checkpoint.as_directory() as folder:
        return load_optimizer(partition, Path(folder), _partition(ray.train.get_context().get_world_rank()))


def checkpoint_weights(result) -> dict[str, torch.Tensor]:
    """The weights of a finished ``trainer.fit()`` result's last checkpoint."""
    from safetensors.torch import load

    with result.checkpoint.as_directory() as folder:
        return load((Path(folder) / WEIGHTS).read_bytes())


# --- the one torch loop -------------------------------------------------------------------------

@dataclass
class Trainables:
    """What one unit of training works with: the wrapped model (DDP or the ZeRO engine's module), the
    optimizer, the DeepSpeed engine (None under DDP: the unit steps the optimizer itself) and the
    learning-rate schedule (stepped once per unit; DeepSpeed steps it inside ``engine.step``)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    engine: Any = None
    scheduler: Any = None


@dataclass
class WorkerLoop:
    """What a family's network brings to the shared Ray Train loop; the loop owns the rest.

    ``units`` epochs or steps; ``run(unit, trainables)`` does one and returns its metrics. ``state``
    travels in every checkpoint and comes back on resume (e.g. a loss measured before training)."""

    module: torch.nn.Module
    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
    units: int
    run: Callable[[int, Trainables], dict]
    every: int = 1  # checkpoint every K units (and after the last)
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    weights: Callable[[torch.nn.Module], dict] | None = None  # what to checkpoint (default: the state dict)
    strict: bool = True
    ddp: dict = field(default_factory=dict)  # parallel_strategy_kwargs of prepare_model
    saved: torch.nn.Module | None = None  # the part of ``module`` checkpointed and resumed (default: all)
    write: Callable[[Path], None] | None = None  # own checkpoint files instead of ``weights`` (PEFT adapters)
    read: Callable[[Path], None] | None = None
    state: dict = field(default_factory=dict)
    unit_name: str = "epoch"  # what a unit is, in progress lines ("step" for the step-counted loops)


class LoopCallback:
    """Hooks into the shared loop (tests pass fault injection in this way; production passes none)."""

    def on_resume(self, done: int) -> None:
        """A restarted worker picked up after ``done`` units."""

    def after_unit(self, done: int) -> None:
        """``done`` units finished on this worker (its report, if due, already sent)."""


def _torch_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    context = ray.train.get_context()
    # Initial weights from a fixed seed, not from whatever the worker process drew before (imports, Ray):
    # without it a refactor that only moves code changes every network's starting point.
    torch.manual_seed(int(config["params"].get("seed", 0)))
    loop: WorkerLoop = config["build"](read_rows(config["shards"]), config["params"])
    saved = loop.saved if loop.saved is not None else loop.module
    write = loop.write or _weights_writer(saved, loop.weights)
    optimizer = loop.optimizer(loop.module)
    state = resume(loop.read or _weights_reader(saved, loop.strict), optimizer)
    start = state.pop("units") if state else 0
    saved_world = state.pop("world_size", None) if state else None
    loop.state.update(state or {})
    scheduler = loop.scheduler(optimizer) if loop.scheduler else None
    for _ in range(start if scheduler is not None else 0):  # one schedule step per unit done
        scheduler.step()
    if state is not None:
        for callback in config["callbacks"]:
            callback.on_resume(start)
    engine = None
    if config["deepspeed"]:
        device = ray.train.torch.get_device()
        engine, optimizer, scheduler = zero2_engine(loop.module.to(device), optimizer,
                                                    deepspeed_config(device=device, **config["deepspeed"]), scheduler)
        model = engine.module
        # Each rank's AdamW moments cover its own flat partition: restorable only onto the same world size.
        restored = state is not None and saved_world == context.get_world_size() and _restore_partition(
            engine.optimizer.optimizer)
    else:
        model = ray.train.torch.prepare_model(loop.module, parallel_strategy_kwargs=loop.ddp or None)
        restored = state is not None and any(optimizer.state.values())
    trainables = Trainables(model, optimizer, engine, scheduler)
    began = time.monotonic()
    for unit in range(start, loop.units):
        metrics = loop.run(unit, trainables)
        done = unit + 1
        if done % loop.every == 0 or done == loop.units:
            metrics = {**metrics, "workers": context.get_world_size(), "resumed_optimizer": restored,
                       "unit": done, "of": loop.units, "unit_name": loop.unit_name,
                       "seconds_in": time.monotonic() - began,
                       "zero_stage": engine.zero_optimization_stage() if engine is not None else 0}
            report(write, {**loop.state, "units": done, "world_size": context.get_world_size()}, metrics,
                   optimizer if engine is None else None, engine.optimizer.optimizer if engine is not None else None)
        for callback in config["callbacks"]:
            callback.after_unit(done)


def fit_on_ray(build: Callable[[dict[str, pa.Table], dict], WorkerLoop], tables: dict[str, pa.Table | None],
               params: dict, resources: Resources, name: str, storage_path: str, deepspeed: dict | None = None,
               callbacks: list[LoopCallback] | None = None, max_failures: int = 2, keep: int = 1):
    """Run ``build``'s network on Ray Train's ``TorchTrainer``: DDP (or DeepSpeed ZeRO-2 with ``deepspeed``:
    ``deepspeed_config`` arguments, e.g. ``{"batch_size": 64}``), resume from the last checkpoint after a
    failure, rank-0 checkpoints of weights + optimizer state. ``build(rows, params)`` runs on every worker
    with its rows (``read_rows``). Returns Ray's Result (``checkpoint_weights(result)``: trained weights)."""
    from ray.train.torch import TorchTrainer

    shards, datasets = route_inputs(tables, resources, equal=True)
    trainer = TorchTrainer(
        _torch_worker,
        train_loop_config={"build": build, "params": params, "deepspeed": deepspeed,
                           "callbacks": list(callbacks or []), "shards": shards},
        datasets=datasets or None,
        **trainer_settings(name, storage_path, resources.workers, resources.cpus, resources.gpu, keep=keep,
                           max_failures=max_failures),
    )
    return trainer.fit()


def deepspeed_config(batch_size: int, device: torch.device, grad_accum: int = 1, precision: str = "auto") -> dict:
    import torch

    gpu = device.type == "cuda"
    bf16 = gpu and precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": gpu and not bf16 and precision in ("auto", "fp16")},
        "steps_per_print": 10**9,
    }


def zero2_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict, scheduler=None):
    """(engine, optimizer, scheduler) from ``deepspeed.initialize``; the engine replaces the DDP wrapper."""
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=config)
    return engine, optimizer, scheduler
