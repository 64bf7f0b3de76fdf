"""XGBoost boosters trained with Ray Train's ``XGBoostTrainer`` (the maintained successor of xgboost_ray).

The per-worker function is ordinary xgboost code; Ray adds the collective
between workers, checkpoints every K rounds (not every round: a report costs
~2 s at Ray Train's default 2 s controller poll, ~0.05 s at the embedded Ray's
0.25 s — ``runtime.py``) and restarts from the last checkpoint after a
worker failure. Each worker's rows reach it as an object-store slice
(``distributed.put_shards``) or as its streamed Ray Data shard.

One Ray Train run fits every output of a level (``fit_ray_many``): the workers build the feature matrix once,
with every label beside it, and fit the boosters one after another by swapping the label. Why: one run per
booster paid for the worker group, the collective and the matrix four times per impression level — ~12 s of
Ray Train's fixed cost per booster on a 30k-row world, and at 40M impressions each booster re-read the 15M-row
sample into its matrix (~2,000 s of the XGBoost family's 3,118 s).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import xgboost as xgb

from engagesim.io import pid_alive
from engagesim.models import distributed
from engagesim.models.data import matrix, weights

PRESETS: dict[str, dict[str, Any]] = {
    # Adobe Behaviour Simulation, team 83.
    "adobe": {"max_depth": 8, "subsample": 0.8, "colsample_bytree": 0.6, "eta": 0.05, "min_child_weight": 1},
    # RecSys 2021, LAYER6 (one binary booster per engagement).
    "layer6": {"max_depth": 8, "subsample": 0.8, "colsample_bytree": 0.8, "eta": 0.1, "min_child_weight": 10},
}


def params_for(preset: str, objective: str, overrides: dict[str, Any] | None = None, gpu: bool = False) -> dict:
    params = {**PRESETS[preset], "objective": objective, "tree_method": "hist", "nthread": 1}
    params["eval_metric"] = "rmse" if objective.startswith("reg") else "logloss"
    if gpu:
        params["device"] = "cuda"
    params.update(overrides or {})
    return params


def labels_of(table: pa.Table, label: str | list[str]) -> np.ndarray:
    """One label column (n,), or several side by side (n, k) — a multi-target label that each booster of a
    multi-output fit takes one column of (``set_label``)."""
    names = [label] if isinstance(label, str) else label
    columns = [table.column(name).to_numpy(zero_copy_only=False).astype(np.float32) for name in names]
    return columns[0] if isinstance(label, str) else np.column_stack(columns)


def dmatrix(table: pa.Table, features: list[str], label: str | list[str] | None) -> xgb.DMatrix:
    """Features, label(s) and (where the rows were sampled) their weights."""
    y = None if label is None else labels_of(table, label)
    return xgb.DMatrix(matrix(table, features), label=y, weight=weights(table), feature_names=features,
                       missing=np.nan)


def train_booster(dtrain: xgb.DMatrix, dvalid: xgb.DMatrix | None, params: dict, rounds: int,
                  early_stopping: int | None = None, callbacks: list | None = None,
                  xgb_model: xgb.Booster | None = None) -> xgb.Booster:
    """Plain xgboost.train — what each Ray worker runs, and what the benchmark's baseline runs."""
    evals = [(dtrain, "train")] + ([(dvalid, "valid")] if dvalid is not None else [])
    return xgb.train(params, dtrain, num_boost_round=rounds, evals=evals, verbose_eval=False,
                     early_stopping_rounds=early_stopping if dvalid is not None else None,
                     callbacks=callbacks or [], xgb_model=xgb_model)


class ReportEveryK(xgb.callback.TrainingCallback):
    """Report to Ray every K rounds and at the end — never every round — shaped like Ray's
    ``RayReportCallback``; one class for Ray Train (``checkpoint=True``: rank 0 adds the booster) and
    Ray Tune (``report=ray.tune.report``, metrics only).

    Ray's own callback reports metrics after *every* round (``frequency`` only thins the checkpoints), and
    each report costs up to a controller poll interval. Metrics are ``<data>-<metric>`` (``valid-rmse``)
    plus ``round``; the end-of-training report repeats the last values. The checkpoint file name matches
    Ray's, so ``RayTrainReportCallback.get_model`` reads it.
    """

    def __init__(self, every: int, checkpoint: bool = True, report: Callable[..., None] | None = None,
                 total: int | None = None, fit: str | None = None, index: int = 0,
                 finished: dict[int, xgb.Booster] | None = None):
        self.every, self.checkpoint, self.report, self.total = every, checkpoint, report, total
        # A multi-output fit: which booster this is (``fit`` names its progress lines, ``index`` its label) and
        # the boosters already fitted, saved into every checkpoint beside the current one (``boosters_from``).
        self.fit, self.index, self.finished = fit, index, finished if finished is not None else {}
        self.last_reported, self.last_metrics = -1, {}
        self.began = time.monotonic()

    def _report(self, model: xgb.Booster, iteration: int, final: bool = False) -> None:
        import tempfile

        import ray.train

        report = self.report or ray.train.report
        metrics = {**self.last_metrics, "round": iteration + 1, "seconds_in": time.monotonic() - self.began}
        if self.total:
            metrics["of"] = self.total
        if self.fit:
            metrics["fit"] = self.fit  # the progress relay's name for this booster's lines
        final = final or bool(self.total and iteration + 1 == self.total)
        if final:
            metrics["final"] = True  # the fit's last report (early stopping ends before ``of``)
        if not self.checkpoint:
            report(metrics)
        else:
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if ray.train.get_context().get_world_rank() == 0:
                    model.save_model(str(Path(d) / "model.ubj"))
                    for index, booster in self.finished.items():
                        booster.save_model(str(Path(d) / f"booster-{index}.ubj"))
                    (Path(d) / "current.json").write_text(json.dumps({"index": self.index, "final": final}))
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                report(metrics, checkpoint=checkpoint)
        self.last_reported = iteration

    def after_iteration(self, model: xgb.Booster, epoch: int, evals_log: dict) -> bool:
        self.last_metrics = {f"{data}-{metric}": float(values[-1]) for data, per in evals_log.items()
                             for metric, values in per.items() if values}
        if (epoch + 1) % self.every == 0:
            self._report(model, epoch)
        return False

    def after_training(self, model: xgb.Booster) -> xgb.Booster:
        rounds = model.num_boosted_rounds()
        if self.last_reported != rounds - 1:
            self._report(model, rounds - 1, final=True)
        return model


class MarkExternalMemory(xgb.callback.TrainingCallback):
    """Records in the model that it trained from external memory (its attribute ``external_memory``)."""

    def before_training(self, model: xgb.Booster) -> xgb.Booster:
        model.set_attr(external_memory="1")
        return model


class ShardBatches(xgb.DataIter):
    """A streamed Ray Train shard as XGBoost's data iterator: ``QuantileDMatrix`` sketches and bins the rows
    batch by batch, so a worker never holds its shard's float matrix — only the binned one (1 byte per value
    at max_bin ≤ 256, vs 4)."""

    def __init__(self, shard, features: list[str], label: str | list[str], batch_size: int = 65536,
                 cache_prefix: str | None = None):
        self.shard, self.features, self.label, self.batch_size = shard, features, label, batch_size
        self._batches = None
        super().__init__(cache_prefix=cache_prefix)

    def reset(self) -> None:
        self._batches = None

    def next(self, input_data) -> bool:
        if self._batches is None:
            self._batches = iter(self.shard.iter_batches(batch_format="pyarrow", batch_size=self.batch_size))
        for batch in self._batches:
            if batch.num_rows:
                input_data(data=matrix(batch, self.features), feature_names=self.features, weight=weights(batch),
                           label=labels_of(batch, self.label))
                return True
        return False


# A worker's streamed shard above this many values (rows × features) trains from external memory under
# external_memory=auto. Why this size: the binned matrix is ~1 byte per value, so 5e8 values is ~0.5 GB of bins
# before XGBoost's own working set, and the 10M-impression job's in-memory trainer worker peaked at 17 GB.
EXTERNAL_MEMORY_VALUES = 5e8


def uses_external_memory(setting: str, rows_per_worker: float, features: int) -> bool:
    return setting == "on" or (setting == "auto" and rows_per_worker * features > EXTERNAL_MEMORY_VALUES)


def _matrix_for(rows, features: list[str], label: str | list[str], params: dict, ref=None,
                cache_dir: str | None = None) -> xgb.DMatrix:
    """The in-memory table as a DMatrix; a streamed shard binned batch by batch (QuantileDMatrix), or with
    ``cache_dir`` into pages on local disk that training fetches per batch (ExtMemQuantileDMatrix; the same
    quantile cuts and trees — the predictions equal, tested)."""
    if isinstance(rows, pa.Table):
        return dmatrix(rows, features, label)
    bins = int(params.get("max_bin", 256))
    if cache_dir is not None:
        batches = ShardBatches(rows, features, label, cache_prefix=os.path.join(cache_dir, "train"))
        return xgb.ExtMemQuantileDMatrix(batches, missing=np.nan, ref=ref, max_bin=bins)
    return xgb.QuantileDMatrix(ShardBatches(rows, features, label), missing=np.nan, ref=ref, max_bin=bins)


PAGES_PREFIX = "engagesim-xgb-pages-"  # + the owning worker's pid + "-": a killed worker's pages are found by it


def sweep_stale_pages(root: str | None = None) -> list[str]:
    """Delete the page directories of workers that no longer run (killed before their ``finally``: a node
    lost mid-fit, or a user's Ctrl-C); the 40M fits left 6–9 GB each in /tmp. Another live fit's are kept."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{PAGES_PREFIX}*"):
        owner = path.name[len(PAGES_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and not pid_alive(owner):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def _train_fn_per_worker(config: dict) -> None:
    cache_dir = None
    if config.get("external_memory"):
        sweep_stale_pages()
        cache_dir = tempfile.mkdtemp(prefix=f"{PAGES_PREFIX}{os.getpid()}-")
    try:
        _train(config, cache_dir)
    finally:
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)


def boosters_from(directory: str | Path) -> tuple[dict[int, xgb.Booster], int, bool]:
    """A checkpoint's boosters by label index, the index its ``model.ubj`` belongs to and whether that one was
    final. Checkpoints of single-output fits (``model.ubj`` only) read as index 0."""
    directory = Path(directory)
    state = json.loads((directory / "current.json").read_text()) if (directory / "current.json").exists() else {}
    boosters = {}
    for path in directory.glob("booster-*.ubj"):
        boosters[int(path.stem.split("-", 1)[1])] = xgb.Booster(model_file=str(path))
    current = int(state.get("index", 0))
    if (directory / "model.ubj").exists():
        boosters[current] = xgb.Booster(model_file=str(directory / "model.ubj"))
    return boosters, current, bool(state.get("final", False))


def _train(config: dict, cache_dir: str | None) -> None:
    import ray.train

    labels, names = config["labels"], config["names"]
    rows = distributed.read_rows(config["shards"], stream=True)
    dtrain = _matrix_for(rows["train"], config["features"], labels, config["params"], cache_dir=cache_dir)
    dvalid = (_matrix_for(rows["valid"], config["features"], labels, config["params"], ref=dtrain)
              if rows.get("valid") is not None else None)
    # Every label was read with the rows (one pass of the data); each booster takes its column.
    y_train, y_valid = dtrain.get_label(), dvalid.get_label() if dvalid is not None else None
    finished: dict[int, xgb.Booster] = {}
    partial = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resumed after a failure: the finished boosters, and the current one from its last round
        with checkpoint.as_directory() as d:
            saved, current, final = boosters_from(d)
        partial = saved.pop(current) if not final else None
        finished.update(saved)
    for index in range(len(labels)):
        if index in finished:
            continue
        if len(labels) > 1:
            dtrain.set_label(y_train[:, index])
            if dvalid is not None:
                dvalid.set_label(y_valid[:, index])
        start_model, rounds = partial, config["rounds"]
        partial = None
        if start_model is not None:
            rounds -= start_model.num_boosted_rounds()
            for callback in config["callbacks"]:
                if hasattr(callback, "on_resume"):
                    callback.on_resume(start_model.num_boosted_rounds())
        callbacks = [ReportEveryK(config["checkpoint_every"], total=config["rounds"], fit=names[index],
                                  index=index, finished=finished), *config["callbacks"]]
        if cache_dir is not None:
            callbacks.append(MarkExternalMemory())
        finished[index] = train_booster(dtrain, dvalid, config["params"], max(rounds, 0),
                                        config.get("early_stopping"), callbacks=callbacks, xgb_model=start_model)


def fit_ray_many(train: pa.Table, valid: pa.Table | None, features: list[str], labels: list[str], params: dict,
                 settings, storage_path: str, name: str, resources: distributed.Resources | None = None,
                 max_failures: int = 2, callbacks: list | None = None,
                 names: list[str] | None = None) -> dict[str, xgb.Booster]:
    """Fit one booster per label in one Ray Train run with the ``train.xgb`` ``settings`` (rounds,
    checkpoint_every, early_stopping, workers, cpus_per_worker); returns label → final model (from the last
    checkpoint). ``names``: each booster's name in the progress lines (default ``<name>_<label>``).

    The boosters are those that one fit per label gives (the same matrix, label and seed: equal, tested); a
    worker lost mid-run resumes the booster it was on from its last checkpoint, and keeps those it had finished.
    ``callbacks``: more xgboost callbacks for the workers (the chaos tests pass a worker-killer here).
    """
    from ray.train.xgboost import XGBoostTrainer

    resources = resources or distributed.Resources.of(settings)
    columns = features + [label for label in labels if label not in features]
    shards, datasets = distributed.route_inputs({"train": distributed.narrow(train, columns),
                                                 "valid": distributed.narrow(valid, columns)}, resources)
    # Rows are counted only where the choice needs them: a lazy Dataset's count() runs its pipeline.
    mode = settings.external_memory
    external = "train" in datasets and (mode == "on" or (mode == "auto" and uses_external_memory(
        mode, datasets["train"].count() / resources.workers, len(features))))
    trainer = XGBoostTrainer(
        _train_fn_per_worker,
        train_loop_config={"features": features, "labels": list(labels), "params": params,
                           "names": names or [f"{name}_{label}" for label in labels], "rounds": settings.rounds,
                           "checkpoint_every": settings.checkpoint_every,
                           "early_stopping": settings.early_stopping, "callbacks": list(callbacks or []), "shards": shards,
                           "external_memory": external},
        datasets=datasets or None,
        **distributed.trainer_settings(name, storage_path, resources.workers, resources.cpus, resources.gpu, keep=2,
                                       max_failures=max_failures),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        boosters, _, _ = boosters_from(d)
    return {label: boosters[index] for index, label in enumerate(labels)}


def fit_ray(train: pa.Table, valid: pa.Table | None, features: list[str], label: str, params: dict,
            settings, storage_path: str, name: str, resources: distributed.Resources | None = None,
            max_failures: int = 2, callbacks: list | None = None) -> xgb.Booster:
    """One booster (``fit_ray_many`` with one label, its progress lines named ``name``)."""
    return fit_ray_many(train, valid, features, [label], params, settings, storage_path, name, resources,
                        max_failures, callbacks, names=[name])[label]


def save(booster: xgb.Booster, path: str, features: list[str], meta: dict | None = None) -> None:
    """xgboost's own UBJSON format (never pickle) + a JSON sidecar with the feature order; local or s3://."""
    from engagesim import io

    io.write_bytes(path, bytes(booster.save_raw("ubj")))
    io.write_json(path + ".json", {"features": features, **(meta or {})})


def load(path: str) -> tuple[xgb.Booster, dict]:
    from engagesim import io

    booster = xgb.Booster()
    booster.load_model(bytearray(io.read_bytes(path)))
    return booster, io.read_json(path + ".json")


# Below this many rows a prediction runs on one thread. Why: in a process that also runs torch (a Serve replica,
# load_run), XGBoost's OpenMP team meets torch's still-spinning threads; one row then took 2.58 ms per booster on
# 2 cores, 0.49 ms with nthread=1 (5.5 calls per single request), while a large batch still wants every core.
ONE_THREAD_ROWS = 2048
# Up to this many rows treelite's GTIL walks the trees instead (a served request). Why: ``inplace_predict`` costs
# 0.14–0.28 ms per call for one row whatever the model (its call path, not the trees), GTIL 0.03–0.04 ms on the
# same boosters — a single request calls five. Past a few dozen rows XGBoost is faster (5,000 rows on one thread:
# 8–19 ms vs 23–65 ms), so batches stay on it. GTIL sums in another order: |diff| ≤ 4e-7 on these boosters
# (a test holds it to 1e-6).
FEW_ROWS = 16
_THREADS_LOCK = threading.Lock()


class _Gtil:
    """One booster's trees (up to the best iteration) as a treelite model, called through GTIL's C entry point.

    Why not ``gtil.predict``: each call builds and parses a JSON config and asks the model for its types and
    output shape (83 µs a row on an impression booster of the bench run); with those made once here the call is
    34 µs, the same numbers (a request calls five boosters)."""

    def __init__(self, booster: xgb.Booster, best: int | None):
        import ctypes

        import treelite
        from treelite.gtil.gtil import GTILConfig
        from treelite.util import typestr_to_ctypes_type, typestr_to_numpy_type

        self.model = treelite.frontend.from_xgboost(booster if best is None else booster[: best + 1])
        self.config = GTILConfig(nthread=1, predict_type="default")
        self.input_name, output = self.model.input_type, self.model.output_type
        self.input_type, self.output_type = typestr_to_numpy_type(self.input_name), typestr_to_numpy_type(output)
        self.input_ptr = ctypes.POINTER(typestr_to_ctypes_type(self.input_name))
        self.output_ptr = ctypes.POINTER(typestr_to_ctypes_type(output))
        self.features = self.model.num_feature
        self.shape = tuple(np.shape(treelite.gtil.predict(self.model, np.zeros((1, self.features), self.input_type),
                                                          nthread=1))[1:])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import ctypes

        from treelite.core import _LIB, _check_call

        x = np.ascontiguousarray(x, dtype=self.input_type)
        if x.shape[1] != self.features:  # gtil.predict pads missing trailing features with NaN
            x = np.pad(x, ((0, 0), (0, self.features - x.shape[1])), constant_values=np.nan)
        out = np.zeros((x.shape[0], *self.shape), dtype=self.output_type)
        _check_call(_LIB.TreeliteGTILPredict(self.model.handle, x.ctypes.data_as(self.input_ptr),
                                             self.input_name.encode(), ctypes.c_uint64(x.shape[0]),
                                             out.ctypes.data_as(self.output_ptr), self.config.handle))
        return out


def _treelite(booster: xgb.Booster, best: int | None) -> _Gtil:
    """The booster's GTIL caller, built once per booster (serving)."""
    model = getattr(booster, "_engagesim_treelite", None)
    if model is None:
        with _THREADS_LOCK:
            model = booster._engagesim_treelite = _Gtil(booster, best)
    return model


def predict(booster: xgb.Booster, table: pa.Table | np.ndarray, features: list[str]) -> np.ndarray:
    """Predictions up to the best iteration; ``inplace_predict`` on a float32 matrix (no DMatrix), or treelite's
    GTIL on a few rows."""
    x = table if isinstance(table, np.ndarray) else matrix(table, features)
    best = getattr(booster, "best_iteration", None)
    if 0 < x.shape[0] <= FEW_ROWS:
        out = np.asarray(_treelite(booster, best)(x), dtype=np.float32).reshape(len(x), -1)
        return out[:, 0] if out.shape[1] == 1 else out  # XGBoost's shapes: (n,) for one output, else (n, k)
    kwargs = {"iteration_range": (0, best + 1)} if best is not None else {}
    threads = 1 if x.shape[0] < ONE_THREAD_ROWS else 0
    with _THREADS_LOCK:  # set_param is no thread-safe read; the lock keeps a concurrent caller's count its own
        if getattr(booster, "_engagesim_threads", None) != threads:
            booster.set_param({"nthread": threads})
            booster._engagesim_threads = threads
        return np.asarray(booster.inplace_predict(x, missing=np.nan, **kwargs), dtype=np.float32)
