"""The member of a torch ``EngagementNet`` (the NN family's, and SMP's stacked MLP's): ``<name>/`` holds
safetensors weights + a JSON spec and feature list. Its own module so that a family using it does not
register the NN family by importing it (registration order is prediction order)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from engagesim import io
from engagesim.models.data import matrix
from engagesim.models.family import Member


class NNMember(Member):
    takes_arrays = True

    def __init__(self, name: str, model, features: list[str]):
        self.name, self.model, self.features = name, model, features

    def predict(self, table: pa.Table, upstream: dict[str, np.ndarray]) -> np.ndarray:
        return self.model.predict(matrix(table, self.features))

    def save(self, directory: str) -> None:
        from engagesim.models import nn

        nn.save(self.model, io.join(directory, self.name), self.features)


def load_net(directory: str, name: str) -> NNMember | None:
    from engagesim.models import nn

    if not io.exists(io.join(directory, name, "config.json")):
        return None
    return NNMember(name, *nn.load(io.join(directory, name)))
