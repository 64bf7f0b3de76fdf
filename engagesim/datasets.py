"""Ray Data helpers every stage shares: read a committed dataset, write one as blocks stream by (then
commit it atomically), and fetch broadcast objects once per worker process.

Kept apart from the stages so that the features, scoring and synth stages do not import one another
for plumbing.
"""

from __future__ import annotations

import functools
from typing import Any

import pyarrow as pa

from engagesim import io
from engagesim.config import StorageConfig


def read(uri: str, storage: StorageConfig | None = None, blocks: int | None = None):
    """A committed dataset (local or s3://) as a Ray Dataset, over its manifest's files only."""
    import ray

    fs, _ = io.filesystem(uri, storage)
    files = io.dataset_files(uri, storage)
    kwargs = {"override_num_blocks": max(blocks, 1)} if blocks else {}
    return ray.data.read_parquet(files, filesystem=fs, **kwargs)


def epoch_us(moment: Any) -> int:
    """A timestamp as a Parquet footer or Arrow scalar gives it (datetime, pandas or numpy) → µs since the epoch."""
    import polars as pl

    return int(pl.Series([moment]).dt.epoch("us")[0])


def frame(batch: pa.Table):
    """A block as a polars frame. A sliced fixed-size list with nulls (what a shuffle's groups are) trips
    polars ("validity mask length must be equal..."), so such blocks are copied unsliced first."""
    import numpy as np
    import polars as pl

    if any(pa.types.is_fixed_size_list(f.type) for f in batch.schema) and batch.num_rows:
        batch = batch.take(pa.array(np.arange(batch.num_rows)))
    return pl.from_arrow(batch)


def collect(ds) -> pa.Table:
    """Materialise a (small, narrow) dataset in the driver as one Arrow table."""
    import ray

    tables = [ray.get(ref) for ref in ds.to_arrow_refs()]
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


def write_streaming(ds, out_uri: str, kind: str, storage: StorageConfig | None = None,
                    extra: dict | None = None) -> int:
    """Ray Data writes the parts in parallel as blocks stream by; then one manifest commits them."""
    writer = io.DatasetWriter(out_uri, kind, storage)
    ds.write_parquet(writer.path, filesystem=writer.fs, filename_provider=_names(writer.token))
    writer.adopt_parts(f"part-{writer.token}")
    writer.commit(extra)
    return writer.rows


def _names(token: str):
    """Ray Data file names that carry the writer's token, so the commit can tell ours from stale ones."""
    from ray.data.datasource import FilenameProvider

    class Names(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{token}-{write_uuid}-{task_index:05d}.parquet"

    return Names(file_format="parquet")


_FETCHED: dict[tuple, Any] = {}


def in_task(fn, *args: Any) -> Any:
    """``fn(*args)`` in a Ray task; returns the ref. What it returns (a table to broadcast to the join workers)
    lives in the object store and never passes through the driver, which only hands the ref on."""
    return _task_remote().remote(fn, *args)


@functools.cache
def _task_remote():
    import ray

    @ray.remote(max_retries=2)
    def call(fn, *args):
        return fn(*args)

    return call


def fetched(refs: Any) -> Any:
    """``ray.get`` of an object ref (or a dict of them), once per worker process, not once per batch.

    Holds only the latest set: a worker that moves on to another stage's broadcast drops the previous one.
    """
    import ray

    key = tuple(sorted((k, v.hex()) for k, v in refs.items())) if isinstance(refs, dict) else (refs.hex(),)
    if key not in _FETCHED:
        _FETCHED.clear()
        _FETCHED[key] = {k: ray.get(v) for k, v in refs.items()} if isinstance(refs, dict) else ray.get(refs)
    return _FETCHED[key]


def resolved(objects: list) -> list:
    """Shallow copies of ``objects`` (feature ops, as a map's task holds them) whose object-ref attributes are
    fetched, once per worker (``fetched``): the driver hands over ops that name their broadcast tables by ref."""
    import copy

    import ray

    refs = {f"{i}.{k}": v for i, o in enumerate(objects) for k, v in vars(o).items() if isinstance(v, ray.ObjectRef)}
    values = fetched(refs) if refs else {}
    out = []
    for i, o in enumerate(objects):
        o = copy.copy(o)
        for k in list(vars(o)):
            if f"{i}.{k}" in values:
                setattr(o, k, values[f"{i}.{k}"])
        out.append(o)
    return out
