"""LAYER6's SLM: a transformer text encoder and the tabular features feeding one MLP head, trained end to end.

The encoder (all-MiniLM-L6-v2's real weights by default, any HF encoder by folder
or hub id, ``tiny:bert`` for tests) mean-pools the post text; the pooled vector
is concatenated with the standardised tabular features (the NN's input
transform) and an MLP maps both to the outputs (4 engagement logits, or
log1p(likes)). The encoder trains with its own, lower learning rate so
fine-tuning does not wash out what pre-training put there.

Text enters as token ids tokenised once in the driver (``token_ids``), so Ray
Train workers need no tokenizer; the initial weights reach the workers through
the object store, so they need no model files either. Identical texts in a
batch (impressions of one post) are encoded once.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load as from_bytes
from safetensors.torch import save as to_bytes
from torch import nn

from engagesim.models import distributed
from engagesim.models.nn import InputTransform, loss_fn, minibatch_epochs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@dataclass
class SLMSpec:
    encoder: str  # the configured encoder (provenance; weights travel in the state dict)
    encoder_config: dict  # the encoder's HF config: rebuilds the architecture on load
    text_column: str = "text"
    max_length: int = 48
    pad_id: int = 0
    n_tabular: int = 0
    n_outputs: int = 4
    task: str = "binary"  # binary (sigmoid + BCE) | regression (identity + MSE)
    hidden: list[int] = field(default_factory=lambda: [256, 64])
    dropout: float = 0.1
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    random_weights: bool = False  # tiny:* encoders (tests): never reported as a real model


def build_encoder(encoder_config: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(**encoder_config)
    try:  # BERT-family: no pooler (unused by mean pooling; DDP would wait for its gradients)
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(config)


class SLMNet(nn.Module):
    """Encoder (mean pooling) ⊕ standardised tabular features → MLP head → logits / values."""

    def __init__(self, spec: SLMSpec, encoder: nn.Module | None = None):
        super().__init__()
        self.spec = spec
        self.encoder = encoder if encoder is not None else build_encoder(spec.encoder_config)
        self.transform = InputTransform(spec.mean, spec.std)
        layers: list[nn.Module] = []
        width = int(self.encoder.config.hidden_size) + spec.n_tabular
        for h in spec.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(spec.dropout)]
            width = h
        self.head = nn.Sequential(*layers, nn.Linear(width, spec.n_outputs))

    def pooled(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder output; each distinct text of the batch is encoded once, padding trimmed."""
        mask = input_ids != self.spec.pad_id
        input_ids = input_ids[:, : max(int(mask.sum(1).max()), 1)]
        unique, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
        unique_mask = (unique != self.spec.pad_id).long()
        hidden = self.encoder(input_ids=unique, attention_mask=unique_mask).last_hidden_state
        weights = unique_mask.unsqueeze(-1).to(hidden.dtype)
        return ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0))[inverse]

    def forward(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.pooled(input_ids), self.transform(x)], dim=1))

    @torch.inference_mode()
    def logits(self, ids: np.ndarray, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Raw outputs for many rows: distinct texts encoded once for the whole table, then the head."""
        self.eval()
        if len(ids) == 0:
            return np.zeros((0, self.spec.n_outputs), np.float32)
        unique, inverse = np.unique(ids, axis=0, return_inverse=True)
        pooled = torch.cat([self.pooled(torch.from_numpy(unique[lo:lo + batch_size]).long())
                            for lo in range(0, len(unique), batch_size)])
        features = torch.cat([pooled[torch.from_numpy(inverse.reshape(-1))],
                              self.transform(torch.from_numpy(np.ascontiguousarray(x)))], dim=1)
        return torch.cat([self.head(features[lo:lo + 8192]) for lo in range(0, len(features), 8192)]).numpy()

    def predict(self, ids: np.ndarray, x: np.ndarray) -> np.ndarray:
        out = self.logits(ids, x)
        return 1.0 / (1.0 + np.exp(-out)) if self.spec.task == "binary" else out


def init_output_bias(model: SLMNet, y: np.ndarray) -> None:
    """Start the output at the training mean (regression) or base-rate logit (binary): the head then learns
    the deviations, and a short CPU fine-tune is not spent walking the bias from 0 to log1p(likes) ≈ 4."""
    mean = np.nanmean(y, axis=0).astype(np.float64)
    if model.spec.task == "binary":
        mean = np.log(np.clip(mean, 1e-4, 1 - 1e-4) / (1 - np.clip(mean, 1e-4, 1 - 1e-4)))
    with torch.no_grad():
        model.head[-1].bias.copy_(torch.from_numpy(mean.astype(np.float32)))


def token_ids(tokenizer, texts: list[str | None], max_length: int) -> np.ndarray:
    """(n, max_length) int32 token ids, padded; each distinct text is tokenised once."""
    index: dict[str, int] = {}
    codes = [index.setdefault(t or "", len(index)) for t in texts]
    if not index:
        return np.zeros((0, max_length), np.int32)
    enc = tokenizer(list(index), padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return enc["input_ids"].astype(np.int32)[np.asarray(codes)]


def ids_column(ids: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1), pa.int32()), ids.shape[1])


def ids_matrix(column) -> np.ndarray:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size).astype(np.int64)


def optimizer_for(model: nn.Module, lr: float, encoder_lr: float) -> torch.optim.Optimizer:
    """AdamW with two parameter groups: the encoder at ``encoder_lr``, the head and transform at ``lr``."""
    inner = model.module if hasattr(model, "module") else model
    encoder = list(inner.encoder.parameters())
    encoder_ids = {id(p) for p in encoder}
    rest = [p for p in inner.parameters() if id(p) not in encoder_ids]
    return torch.optim.AdamW([{"params": encoder, "lr": encoder_lr}, {"params": rest, "lr": lr}], weight_decay=1e-5)


def distillation_loss(task: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Soft targets: the teacher's probabilities (binary) or values (regression)."""
    if task == "binary":
        return nn.functional.binary_cross_entropy_with_logits(student, torch.sigmoid(teacher))
    return nn.functional.mse_loss(student, teacher)


def train_epochs(model: nn.Module, ids: np.ndarray, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int,
                 optimizer: torch.optim.Optimizer, seed: int = 0, teacher: np.ndarray | None = None,
                 alpha: float = 0.5) -> list[float]:
    """Mini-batch training; returns the mean loss per epoch. With ``teacher`` (its logits per row) the loss is
    alpha × label loss + (1 − alpha) × distillation loss."""
    torch.manual_seed(seed)
    task = (model.module if hasattr(model, "module") else model).spec.task
    criterion = loss_fn(task)
    device = next(model.parameters()).device  # on GPU workers prepare_model moved the model there

    def batch(a: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a[idx]).to(device)

    def step(idx: np.ndarray) -> float:
        out = model(batch(ids, idx).long(), batch(x, idx))
        loss = criterion(out, batch(y, idx))
        if teacher is not None:
            loss = alpha * loss + (1 - alpha) * distillation_loss(task, out, batch(teacher, idx))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    return minibatch_epochs(model, len(ids), epochs, batch_size, seed, step)


# --- Ray Train ----------------------------------------------------------------------------------

def _worker_loop(rows: dict, params: dict) -> distributed.WorkerLoop:
    """Each worker: its rows, the initial weights from the object store, one epoch per unit."""
    import ray
    import ray.train

    from engagesim.models.data import label_matrix, matrix

    table = rows["train"]
    ids = ids_matrix(table.column("_input_ids"))
    x, y = matrix(table, params["features"]), label_matrix(table, params["labels"])
    teacher = label_matrix(table, params["teacher_columns"]) if params["teacher_columns"] else None
    module = SLMNet(SLMSpec(**params["spec"]))
    module.load_state_dict(from_bytes(ray.get(params["init"])))
    rank = ray.train.get_context().get_world_rank()

    def epoch(unit: int, t: distributed.Trainables) -> dict:
        losses = train_epochs(t.model, ids, x, y, 1, params["batch_size"], t.optimizer, seed=unit + 1000 * rank,
                              teacher=teacher, alpha=params["alpha"])
        return {"epoch": unit, "loss": losses[-1], "rows": len(ids)}

    return distributed.WorkerLoop(module=module, units=params["epochs"], run=epoch,
                                  optimizer=lambda m: optimizer_for(m, params["lr"], params["encoder_lr"]),
                                  ddp={"find_unused_parameters": True})


def fit_ray(model: SLMNet, ids: np.ndarray, table: pa.Table, features: list[str], label_columns: list[str],
            storage_path: str, name: str, settings, resources: distributed.Resources | None = None,
            epochs: int | None = None, teacher: np.ndarray | None = None, alpha: float = 0.5) -> SLMNet:
    """Fine-tune ``model`` (encoder + head) data-parallel on Ray Train with the ``train.slm`` ``settings``
    (``epochs`` overrides its epochs: the student's); returns the trained model with the last training
    metrics in ``model.train_metrics``."""
    import ray

    data = table.select(features + label_columns).append_column("_input_ids", ids_column(ids))
    teacher_columns = []
    if teacher is not None:
        teacher_columns = [f"_teacher_{k}" for k in range(teacher.shape[1])]
        for k, column in enumerate(teacher_columns):
            data = data.append_column(column, pa.array(teacher[:, k], pa.float32()))
    params = {"spec": asdict(model.spec), "init": ray.put(to_bytes(model.state_dict())), "features": features,
              "labels": label_columns, "teacher_columns": teacher_columns, "alpha": alpha,
              "epochs": epochs or settings.epochs, "batch_size": settings.batch_size, "lr": settings.lr,
              "encoder_lr": settings.encoder_lr}
    result = distributed.fit_on_ray(_worker_loop, {"train": data}, params,
                                    resources or distributed.Resources.of(settings), name, storage_path)
    trained = SLMNet(model.spec)
    trained.load_state_dict(distributed.checkpoint_weights(result))
    trained.train_metrics = dict(result.metrics)
    return trained.eval()


# --- distillation -------------------------------------------------------------------------------

LAYER_KEY = re.compile(r"(\.layers?\.)(\d+)\.")


def kept_layers(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced teacher layers, always including the last one (DistilBERT-style initialisation)."""
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"train.slm.distill_layers must be between 1 and the teacher's {n_teacher} layers")
    return sorted({round(i * (n_teacher - 1) / max(n_student - 1, 1)) for i in range(n_student)}
                  if n_student > 1 else {n_teacher - 1})


def student_from(teacher: SLMNet, layers: int) -> SLMNet:
    """A shallower copy of ``teacher``: the same embeddings, head and transform, every k-th encoder layer."""
    config = dict(teacher.spec.encoder_config)
    if "num_hidden_layers" not in config:
        raise ValueError("train.slm.distill_layers: the encoder's config has no num_hidden_layers to shrink")
    keep = kept_layers(int(config["num_hidden_layers"]), layers)
    config["num_hidden_layers"] = len(keep)
    spec = replace(teacher.spec, encoder_config=config, encoder=f"{teacher.spec.encoder} → {len(keep)} layers")
    student = SLMNet(spec)
    renumber = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        match = LAYER_KEY.search(key) if key.startswith("encoder.") else None
        if match is None:
            state[key] = value
        elif int(match.group(2)) in renumber:
            state[key[:match.start(2)] + str(renumber[int(match.group(2))]) + key[match.end(2):]] = value
    student.load_state_dict(state)
    return student


def parameter_count(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# --- save / load --------------------------------------------------------------------------------

def save(model: SLMNet, tokenizer, directory: str, features: list[str]) -> None:
    """One safetensors file (encoder + head), the spec as JSON and the tokenizer's files; local or s3://."""
    from engagesim import io

    io.write_bytes(io.join(directory, "model.safetensors"), to_bytes(model.state_dict()))
    io.write_json(io.join(directory, "config.json"), {"spec": asdict(model.spec), "features": features})
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        for path in Path(d).iterdir():
            if path.name in TOKENIZER_FILES:
                io.write_bytes(io.join(directory, "tokenizer", path.name), path.read_bytes())


def load(directory: str) -> tuple[SLMNet, object, list[str]]:
    from transformers import AutoTokenizer

    from engagesim import io

    meta = io.read_json(io.join(directory, "config.json"))
    model = SLMNet(SLMSpec(**meta["spec"]))
    model.load_state_dict(from_bytes(io.read_bytes(io.join(directory, "model.safetensors"))))
    with tempfile.TemporaryDirectory() as d:
        for name in TOKENIZER_FILES:
            uri = io.join(directory, "tokenizer", name)
            if io.exists(uri):
                (Path(d) / name).write_bytes(io.read_bytes(uri))
        tokenizer = AutoTokenizer.from_pretrained(d)
    return model.eval(), tokenizer, meta["features"]


def predict_table(model: SLMNet, tokenizer, features: list[str], table: pa.Table) -> np.ndarray:
    """The SLM's predictions for a feature table (it needs the text column the model was trained on)."""
    from engagesim.models.data import matrix

    column = model.spec.text_column
    if column not in table.column_names:
        raise ValueError(f"the SLM needs the {column!r} column in the feature table (rebuild features with this "
                         "version of engagesim)")
    ids = token_ids(tokenizer, table.column(column).to_pylist(), model.spec.max_length)
    return model.predict(ids, matrix(table, features))
