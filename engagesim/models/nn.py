"""Neural classifiers of the RecSys 2021 winners, trained with Ray Train's ``TorchTrainer``.

- ``layer6_mlp``: LAYER6's 5 ReLU blocks (presets [400,800,500,250,100], [500,900,600,250,100],
  [512,1024,500,250,100]) with dropout, a sigmoid head per engagement, BCE, and a
  sign·log1p input transform.
- ``synerise_ffn``: Synerise's 3-layer residual feed-forward net (width 1500, leaky ReLU,
  batch norm) on Fourier-encoded numerics.

The model, its input normaliser and the training step are plain torch (a test
calls ``train_epochs`` directly); ``fit_ray`` wraps them for data-parallel DDP
(or DeepSpeed ZeRO-2 when configured) across Ray workers.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from engagesim.models import distributed

LAYER6_PRESETS = [[400, 800, 500, 250, 100], [500, 900, 600, 250, 100], [512, 1024, 500, 250, 100]]


@dataclass
class NNSpec:
    arch: str = "layer6_mlp"  # layer6_mlp | synerise_ffn
    n_inputs: int = 0
    n_outputs: int = 4
    task: str = "binary"  # binary (sigmoid + BCE) | regression (identity + MSE)
    hidden: list[int] = field(default_factory=lambda: list(LAYER6_PRESETS[0]))
    dropout: float = 0.1
    width: int = 1500
    fourier_scales: int = 8
    mean: list[float] = field(default_factory=list)  # input normaliser, fit on training rows
    std: list[float] = field(default_factory=list)


class InputTransform(nn.Module):
    """NaN → 0, sign·log1p(|x|) (LAYER6), then standardise with training statistics, clipped to ±10 so a
    value far outside the training range (a near-constant feature seen with a new value at serving time)
    cannot blow up the output."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    @staticmethod
    def raw(x: torch.Tensor) -> torch.Tensor:
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        return torch.sign(x) * torch.log1p(torch.abs(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.raw(x) - self.mean) / self.std).clamp(-10.0, 10.0)


class FourierEncoding(nn.Module):
    """Synerise: [sin(x / 2^s), cos(x / 2^s)] for s = 0..scales-1, concatenated with x."""

    def __init__(self, scales: int):
        super().__init__()
        self.register_buffer("div", 2.0 ** torch.arange(scales, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.unsqueeze(-1) / self.div
        return torch.cat([x, torch.sin(z).flatten(1), torch.cos(z).flatten(1)], dim=1)


class Layer6MLP(nn.Module):
    def __init__(self, spec: NNSpec):
        super().__init__()
        layers, width = [], spec.n_inputs
        for h in spec.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(spec.dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, spec.n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ResidualBlock(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.LeakyReLU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class SyneriseFFN(nn.Module):
    def __init__(self, spec: NNSpec):
        super().__init__()
        self.fourier = FourierEncoding(spec.fourier_scales)
        n_in = spec.n_inputs * (1 + 2 * spec.fourier_scales)
        self.input = nn.Sequential(nn.Linear(n_in, spec.width), nn.BatchNorm1d(spec.width), nn.LeakyReLU())
        self.blocks = nn.Sequential(*[ResidualBlock(spec.width, spec.dropout) for _ in range(3)])
        self.head = nn.Linear(spec.width, spec.n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.input(self.fourier(x))))


class EngagementNet(nn.Module):
    """Input transform + body; ``forward`` returns logits (binary) or values (regression)."""

    def __init__(self, spec: NNSpec):
        super().__init__()
        self.spec = spec
        self.transform = InputTransform(spec.mean, spec.std)
        self.body = Layer6MLP(spec) if spec.arch == "layer6_mlp" else SyneriseFFN(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.transform(x))

    @torch.inference_mode()
    def predict(self, x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        if self.training:  # eval() walks every module (~0.25 ms a call): once, not per request
            self.eval()
        traced = self._traced(x) if 0 < len(x) <= TRACE_MAX_ROWS else None
        forward = self if traced is None else traced
        outs = []
        with threads_for(len(x)):
            for lo in range(0, len(x), batch_size):
                out = forward(torch.from_numpy(np.ascontiguousarray(x[lo:lo + batch_size])))
                outs.append(torch.sigmoid(out) if self.spec.task == "binary" else out)
        if len(outs) == 1:
            return outs[0].numpy()
        return torch.cat(outs).numpy() if outs else np.zeros((0, self.spec.n_outputs), np.float32)

    def _traced(self, x: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """This net as a TorchScript trace, made on the first few-row call and kept beside the net (not on it: the
        net stays picklable and its state dict its own). Not frozen: it reads the net's own parameters, so a
        later training step is seen. None where tracing fails (TorchScript is in maintenance upstream): eager."""
        traced = _TRACES.get(self)
        if traced is None:
            with _TRACE_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = _TRACES.get(self)
                if traced is None:
                    try:
                        traced = torch.jit.trace(self, torch.from_numpy(np.ascontiguousarray(x[:1], dtype=np.float32)),
                                                 check_trace=False)
                    except Exception:  # noqa: BLE001 - any failure to trace leaves the eager module, never an error
                        traced = False
                    _TRACES[self] = traced
        return None if traced is False else traced


# Up to this many rows a forward pass runs as a TorchScript trace of the net. A module call's Python dispatch is
# most of a one-row pass: a served request's three nets took 164–260 µs each in eager mode, 71–128 µs traced
# (one thread; the same kernels, so the same outputs: tests/test_models.py holds them equal).
TRACE_MAX_ROWS = 64
_TRACE_LOCK = threading.Lock()
_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# Below this many rows a forward pass runs on one thread. Waking torch's other intra-op threads costs more than a
# few rows' matmul: one 200 → 256 Linear on one row took 250 µs with 2 threads and 12 µs with 1 on this 2-core
# machine (740 vs 48 µs while another job held the cores), and a served request (post + viewer, three nets) went
# from 116 to 33 ms p50 under that load. Batches keep every thread.
ONE_THREAD_MAX_ROWS = 2048
_DEFAULT_THREADS = torch.get_num_threads()


@contextlib.contextmanager
def threads_for(rows: int):
    """One intra-op thread for a small batch, the process's default for a large one. The setting is process-wide:
    a large batch that overlaps a small one in another thread may run a layer on one thread (slower, never
    wrong), and every exit restores the default, so no interleaving leaves it lowered."""
    if rows > ONE_THREAD_MAX_ROWS or _DEFAULT_THREADS == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(_DEFAULT_THREADS)


def fit_normaliser(x: np.ndarray) -> tuple[list[float], list[float]]:
    raw = InputTransform.raw(torch.from_numpy(x)).numpy()
    mean, std = raw.mean(axis=0), raw.std(axis=0)
    return mean.tolist(), np.where(std < 1e-6, 1.0, std).tolist()


def _moment_part(batch, features: list[str]):
    """One block's partial fit of the normaliser: n, Σx, Σx² of the transformed inputs (float64)."""
    import pyarrow as pa

    from engagesim.models.data import matrix

    raw = InputTransform.raw(torch.from_numpy(matrix(batch, features))).numpy().astype(np.float64)
    return pa.table({"n": [len(raw)], "sum": [raw.sum(axis=0).tolist()], "sq": [(raw ** 2).sum(axis=0).tolist()]})


def fit_normaliser_stream(ds, features: list[str]) -> tuple[list[float], list[float]]:
    """``fit_normaliser`` over a Ray Dataset: partial sums per block, combined in the driver (a few numbers
    per block, never the rows). Equal to the in-memory fit up to float rounding."""
    from engagesim import datasets

    parts = datasets.collect(ds.map_batches(_moment_part, fn_kwargs={"features": features}, batch_format="pyarrow",
                                            batch_size=65536))
    n = float(np.sum(parts.column("n").to_numpy()))
    total = np.sum(np.asarray(parts.column("sum").to_pylist(), dtype=np.float64), axis=0)
    squares = np.sum(np.asarray(parts.column("sq").to_pylist(), dtype=np.float64), axis=0)
    mean = total / max(n, 1.0)
    std = np.sqrt(np.maximum(squares / max(n, 1.0) - mean ** 2, 0.0))
    return mean.tolist(), np.where(std < 1e-6, 1.0, std).tolist()


def loss_fn(task: str):
    return nn.BCEWithLogitsLoss() if task == "binary" else nn.MSELoss()


def minibatch_epochs(model: nn.Module, rows: int, epochs: int, batch_size: int, seed: int,
                     step: Callable[[np.ndarray], float]) -> list[float]:
    """Shuffled mini-batches of row indices, ``step(idx)`` → that batch's loss; the mean loss per epoch.

    A last batch of one row is skipped (batch norm cannot train on it).
    """
    rng = np.random.default_rng(seed)
    history = []
    for _ in range(epochs):
        model.train()
        order = rng.permutation(rows)
        total, count = 0.0, 0
        for lo in range(0, rows, batch_size):
            idx = order[lo:lo + batch_size]
            if len(idx) < 2:
                continue
            total += step(idx) * len(idx)
            count += len(idx)
        history.append(total / max(count, 1))
    return history


def train_epochs(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int, lr: float,
                 seed: int = 0, optimizer: torch.optim.Optimizer | None = None, engine=None,
                 w: np.ndarray | None = None) -> list[float]:
    """Plain mini-batch training; returns the mean loss per epoch. ``engine``: a DeepSpeed engine wrapping
    ``model`` (it owns backward and the optimizer step). ``w``: row weights (negative downsampling)."""
    torch.manual_seed(seed)
    spec = model.module.spec if hasattr(model, "module") else model.spec
    criterion = loss_fn(spec.task)
    per_row = type(criterion)(reduction="none")
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    device = next(model.parameters()).device  # on GPU workers prepare_model moved the model there

    def loss_of(out: torch.Tensor, yb: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        if w is None:
            return criterion(out, yb)
        wb = torch.from_numpy(w[idx]).to(device)[:, None]
        return (per_row(out, yb) * wb).sum() / (wb.sum() * yb.shape[1])

    def step(idx: np.ndarray) -> float:
        xb, yb = torch.from_numpy(x[idx]).to(device), torch.from_numpy(y[idx]).to(device)
        if engine is not None:
            loss = loss_of(engine(xb), yb, idx)
            engine.backward(loss)
            engine.step()
        else:
            optimizer.zero_grad()
            loss = loss_of(model(xb), yb, idx)
            loss.backward()
            optimizer.step()
        return float(loss.detach())

    return minibatch_epochs(model, len(x), epochs, batch_size, seed, step)


def _worker_loop(rows: dict, params: dict) -> distributed.WorkerLoop:
    """Each Ray worker: its rows, the network, one epoch per unit (a checkpoint after each)."""
    from engagesim.models.data import label_matrix, matrix, weights

    table = rows["train"]
    x, y, w = matrix(table, params["features"]), label_matrix(table, params["labels"]), weights(table)

    def epoch(unit: int, t: distributed.Trainables) -> dict:
        losses = train_epochs(t.model, x, y, 1, params["batch_size"], params["lr"],
                              seed=1000 * params.get("seed", 0) + unit, optimizer=t.optimizer,
                              engine=t.engine, w=w)
        return {"epoch": unit, "loss": losses[-1]}

    return distributed.WorkerLoop(
        module=EngagementNet(NNSpec(**params["spec"])), units=params["epochs"], run=epoch,
        optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=params["lr"], weight_decay=1e-5))


def fit_ray(train, features: list[str], label_columns: list[str], spec: NNSpec, storage_path: str, name: str,
            settings, batch_size: int, resources: distributed.Resources | None = None,
            callbacks: list | None = None) -> EngagementNet:
    """Data-parallel training on Ray (DDP over gloo on CPU, NCCL on GPU, or DeepSpeed ZeRO-2 with
    ``settings.deepspeed``); ``settings`` is the ``train.nn`` section. Returns the trained model; the last
    training metrics are in ``model.train_metrics``."""
    params = {"spec": asdict(spec), "features": features, "labels": label_columns, "epochs": settings.epochs,
              "batch_size": batch_size, "lr": settings.lr, "seed": settings.seed}
    result = distributed.fit_on_ray(_worker_loop, {"train": distributed.narrow(train, features + label_columns)}, params,
                                    resources or distributed.Resources(settings.workers), name, storage_path,
                                    deepspeed={"batch_size": batch_size} if settings.deepspeed else None,
                                    callbacks=callbacks)
    model = EngagementNet(spec)
    model.load_state_dict(distributed.checkpoint_weights(result))
    model.train_metrics = dict(result.metrics)
    return model.eval()


def save(model: EngagementNet, directory: str, features: list[str]) -> None:
    """safetensors weights + a JSON spec (no pickle); local or s3://."""
    from safetensors.torch import save as to_bytes

    from engagesim import io

    io.write_bytes(io.join(directory, "model.safetensors"), to_bytes(model.state_dict()))
    io.write_json(io.join(directory, "config.json"), {"spec": asdict(model.spec), "features": features})


def load(directory: str) -> tuple[EngagementNet, list[str]]:
    from safetensors.torch import load as from_bytes

    from engagesim import io

    meta = io.read_json(io.join(directory, "config.json"))
    model = EngagementNet(NNSpec(**meta["spec"]))
    model.load_state_dict(from_bytes(io.read_bytes(io.join(directory, "model.safetensors"))))
    return model.eval(), meta["features"]


def default_batch(n_rows: int, workers: int) -> int:
    """Large batches (LAYER6 used large ones) but at least ~50 steps per epoch per worker."""
    return int(max(256, min(8192, 2 ** math.floor(math.log2(max(n_rows // (50 * workers), 1))))))
