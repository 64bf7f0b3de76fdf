"""One storage API for local paths and s3:// URIs, with atomic datasets.

A dataset is a directory of Parquet parts plus a ``_SUCCESS`` manifest that
lists them. Readers only trust parts named in the manifest, and the manifest
is written last in one step (a rename locally, a single PUT on S3), so a
writer killed midway leaves nothing a reader accepts, and a rewrite replaces
the old data in one step. S3 has no rename; listing-by-manifest is what makes
this work the same on both.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engagesim.config import StorageConfig
from engagesim.errors import UserError
from engagesim.schema import METADATA_KIND_KEY, METADATA_VERSION_KEY, SCHEMA_VERSION, SCHEMAS, schema_for, with_metadata

SUCCESS = "_SUCCESS"
REJECTS_DIR = "_rejects"
LOCKS_DIR = "_locks"


class DatasetNotCommitted(UserError, FileNotFoundError):
    """The dataset has no _SUCCESS manifest: it was never finished, or never written."""


class OutputBusy(UserError):
    """Another writer holds the output's lock."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _s3_filesystem(storage: StorageConfig | None) -> pafs.S3FileSystem:
    endpoint = (storage.s3_endpoint if storage else None) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL"
    )
    region = (storage.s3_region if storage else None) or os.environ.get("AWS_REGION") or os.environ.get(
        "AWS_DEFAULT_REGION", "us-east-1"
    )
    kwargs: dict[str, Any] = {"region": region}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    # Credentials: pyarrow reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / profiles / instance roles.
    return pafs.S3FileSystem(**kwargs)


_S3_CACHE: dict[tuple, pafs.FileSystem] = {}


def filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for a URI and the path inside it."""
    if is_s3(uri):
        key = (
            storage.s3_endpoint if storage else None,
            storage.s3_region if storage else None,
            os.environ.get("AWS_ENDPOINT_URL_S3"),
            os.environ.get("AWS_ENDPOINT_URL"),
            os.environ.get("AWS_ACCESS_KEY_ID"),
        )
        if key not in _S3_CACHE:
            _S3_CACHE[key] = _s3_filesystem(storage)
        return _S3_CACHE[key], uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, storage)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(uri, storage)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write a whole object; locally through a temp file and rename so readers never see half of it."""
    fs, path = filesystem(uri, storage)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def read_json(uri: str, storage: StorageConfig | None = None) -> Any:
    return json.loads(read_bytes(uri, storage))


def write_json(uri: str, obj: Any, storage: StorageConfig | None = None) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), storage)


def list_files(uri: str, storage: StorageConfig | None = None) -> list[str]:
    fs, path = filesystem(uri, storage)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def remove_tree(uri: str, storage: StorageConfig | None = None) -> None:
    """Delete a directory (or prefix on S3) and everything under it; a missing one is fine."""
    fs, path = filesystem(uri, storage)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        try:
            fs.delete_dir(path)
        except FileNotFoundError:  # S3: a prefix that listed a moment ago may be gone (or only a marker)
            pass


def pid_alive(pid: Any) -> bool:
    """Whether a process of this host runs with that pid (signal 0: existence only); unsure → True."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def _alive(lock: dict[str, Any]) -> bool:
    """A lock's holder still runs — known only on its own host; elsewhere it is assumed alive."""
    return lock.get("host") != socket.gethostname() or pid_alive(lock.get("pid", -1))


def _live_locks(fs: pafs.FileSystem, folder: str, mine: str) -> list[tuple[str, dict[str, Any]]]:
    """The other writers' locks in ``folder``; a lock whose process is gone (same host) is cleared."""
    live = []
    for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
        if info.base_name == mine or not info.base_name.endswith(".json"):
            continue
        try:
            with fs.open_input_stream(info.path) as f:
                other = json.loads(f.read())
        except (OSError, ValueError):
            continue  # released while we looked
        if _alive(other):
            live.append((info.base_name, other))
        else:
            fs.delete_file(info.path)
    return live


@contextmanager
def output_lock(uri: str, storage: StorageConfig | None = None, what: str = "a writer") -> Iterator[None]:
    """Hold ``<uri>/_locks/`` for one run, so two runs never write (and clean up) one output at once.

    Works the same on a local disk and on S3 (which has no exclusive create in pyarrow): each writer puts its
    own lock object, then lists the others. Any live other lock → take ours back; if that lock is still there
    after a short random wait it is a real holder → refuse; if it went (the other backed off too), try again.
    Two writers never both proceed; two that start in the same instant almost always end with one."""
    import random

    fs, path = filesystem(uri, storage)
    folder = f"{path}/{LOCKS_DIR}"
    mine = f"{uuid.uuid4().hex}.json"
    record = {"what": what, "host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for attempt in range(4):
        for tries in range(3):
            try:
                write_json(join(uri, LOCKS_DIR, mine), record, storage)
                break
            except FileNotFoundError:  # a writer that just finished removed the empty folder under our write
                if tries == 2:
                    raise
        others = _live_locks(fs, folder, mine)
        if not others:
            break
        fs.delete_file(f"{folder}/{mine}")
        time.sleep(random.uniform(0.05, 0.3))
        still = [o for o in _live_locks(fs, folder, mine) if o[0] in {n for n, _ in others}]
        if still or attempt == 3:
            name, other = (still or others)[0]
            raise OutputBusy(
                f"{uri} is being written by {other.get('what', 'another run')} (pid {other.get('pid')} on "
                f"{other.get('host')}, since {other.get('started')}); wait for it to finish — or, if it died, "
                f"delete {join(uri, LOCKS_DIR, name)}")
    try:
        yield
    finally:
        try:
            fs.delete_file(f"{folder}/{mine}")
            if isinstance(fs, pafs.LocalFileSystem) and not os.listdir(folder):
                os.rmdir(folder)
        except OSError:
            pass


@dataclass
class DatasetWriter:
    """Streams Parquet parts into a dataset directory and commits them atomically.

    Parts carry a per-writer token so a concurrent or crashed writer's files
    never collide with ours; ``commit`` publishes exactly the parts written
    here and then removes stale parts left by earlier attempts.
    """

    uri: str
    kind: str
    storage: StorageConfig | None = None
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    files: list[str] = field(default_factory=list)
    rows: int = 0

    def __post_init__(self) -> None:
        # Contract kinds are cast to their schema; other kinds (feature tables) keep their own.
        self.schema = with_metadata(schema_for(self.kind), self.kind) if self.kind in SCHEMAS else None
        self.fs, self.path = filesystem(self.uri, self.storage)
        self.fs.create_dir(self.path, recursive=True)

    def part_name(self, index: int) -> str:
        return f"part-{self.token}-{index:05d}.parquet"

    def write(self, table: pa.Table, name: str | None = None) -> str:
        """Write one part; ``name`` lets parallel tasks choose deterministic part names."""
        table = tagged(table, self.kind)
        name = name or self.part_name(len(self.files))
        write_part(self.fs, f"{self.path}/{name}", table)
        self.files.append(name)
        self.rows += table.num_rows
        return name

    def add_written(self, name: str, rows: int) -> None:
        """Register a part written elsewhere (a Ray task) under this dataset."""
        self.files.append(name)
        self.rows += rows

    def adopt_parts(self, prefix: str) -> None:
        """Register every ``prefix*.parquet`` part that other processes (Ray tasks, actors) wrote here."""
        for info in self.fs.get_file_info(pafs.FileSelector(self.path)):
            if info.base_name.startswith(prefix) and info.base_name.endswith(".parquet"):
                self.add_written(info.base_name, pq.ParquetFile(self.fs.open_input_file(info.path)).metadata.num_rows)

    def commit(self, extra: dict[str, Any] | None = None, *, owner: str | None = None,
               keep_stale: bool = False) -> dict[str, Any]:
        """Publish the parts written here. ``owner`` (another dataset's URI) makes this manifest valid only
        while that dataset's manifest carries the same run token — see ``commit_group``."""
        if not self.files and self.schema is not None:
            self.write(self.schema.empty_table())
        manifest = {
            "kind": self.kind,
            "schema_version": SCHEMA_VERSION,
            "files": sorted(self.files),
            "rows": self.rows,
            "run": self.token,
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({"owner": _relative(join(owner, SUCCESS), self.uri)} if owner else {}),
            **(extra or {}),
        }
        write_bytes(join(self.uri, SUCCESS), json.dumps(manifest, indent=2).encode(), self.storage)
        if not keep_stale:
            self._remove_stale(set(manifest["files"]))
        return manifest

    def discard(self) -> None:
        """A failed run: delete the parts this writer made (best effort); the committed manifest is untouched."""
        for name in self.files:
            try:
                self.fs.delete_file(f"{self.path}/{name}")
            except OSError:
                pass
        self.files, self.rows = [], 0

    def _remove_stale(self, keep: set[str]) -> None:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        for info in infos:
            name = info.base_name
            if info.type == pafs.FileType.File and name.startswith("part-") and name not in keep:
                self.fs.delete_file(info.path)


def _split_scheme(uri: str) -> tuple[str, str]:
    return ("s3://", uri[5:]) if is_s3(uri) else ("", os.path.abspath(uri.removeprefix("file://")))


def _relative(target: str, start: str) -> str:
    """``target`` relative to the directory ``start`` (so a copied run directory stays consistent)."""
    return posixpath.relpath(_split_scheme(target)[1], _split_scheme(start)[1])


def _resolve(start: str, relative: str) -> str:
    scheme, path = _split_scheme(start)
    return scheme + posixpath.normpath(posixpath.join(path, relative))


def commit_group(primary: DatasetWriter, others: list[DatasetWriter], extra: dict[str, Any] | None = None,
                 extras: dict[str, dict[str, Any]] | None = None) -> None:
    """Commit several datasets of one run so that a crash at any point leaves the old run or the new one.

    S3 cannot publish two manifests in one step, so the others commit first, each naming ``primary`` as its
    owner and carrying the run token; ``read_manifest`` accepts such a manifest only while the owner's manifest
    carries the same token. The primary's manifest is the run's single commit point; only after it are the
    stale parts of earlier runs removed."""
    extras = extras or {}
    for writer in others:
        writer.token = primary.token
        writer.commit({**(extra or {}), **extras.get(writer.uri, {})}, owner=primary.uri, keep_stale=True)
    primary.commit({**(extra or {}), **extras.get(primary.uri, {})})
    for writer in others:
        writer._remove_stale(set(writer.files))


def remove_parts(uri: str, prefix: str, storage: StorageConfig | None = None) -> int:
    """Delete a failed run's ``prefix*`` parts of one dataset (never a manifest); how many went."""
    fs, path = filesystem(uri, storage)
    gone = 0
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type == pafs.FileType.File and info.base_name.startswith(prefix):
            fs.delete_file(info.path)
            gone += 1
    return gone


def write_named_part(uri: str, name: str, table: pa.Table, kind: str, storage: StorageConfig | None = None) -> int:
    """Write one part of a dataset from any process (a Ray task); the driver commits it later.

    Contract kinds are cast to their schema; every part carries the kind and version tags.
    """
    fs, path = filesystem(uri, storage)
    fs.create_dir(path, recursive=True)
    table = tagged(table, kind)
    write_part(fs, f"{path}/{name}", table)
    return table.num_rows


def tagged(table: pa.Table, kind: str) -> pa.Table:
    """A part as written: contract kinds cast to their schema, every kind tagged with kind and version."""
    if kind in SCHEMAS:
        return table.cast(with_metadata(schema_for(kind), kind))
    return table.replace_schema_metadata(
        {**(table.schema.metadata or {}), METADATA_KIND_KEY: kind.encode(), METADATA_VERSION_KEY: SCHEMA_VERSION.encode()})


def write_part(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    with fs.open_output_stream(path) as sink:
        pq.write_table(table, sink, compression="zstd")


def read_manifest(uri: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    try:
        manifest = read_json(join(uri, SUCCESS), storage)
    except (FileNotFoundError, OSError) as exc:
        if exists(join(uri, SUCCESS), storage):
            raise
        fs, path = filesystem(uri, storage)
        if fs.get_file_info(path).type == pafs.FileType.File:
            raise DatasetNotCommitted(f"{uri} is a file, not a dataset: ingest it first "
                                      f"(`engagesim ingest {uri} --out data/NAME`) and give data/NAME") from exc
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise DatasetNotCommitted(f"{uri}: no such dataset (check the path)") from exc
        raise DatasetNotCommitted(f"{uri} is not a committed dataset (no {SUCCESS}); was its writer interrupted?") from exc
    owner = manifest.get("owner")
    if owner:
        owner_uri = _resolve(uri, owner)
        try:
            owner_run = read_json(owner_uri, storage).get("run")
        except (FileNotFoundError, OSError):
            owner_run = None
        if owner_run != manifest.get("run"):
            raise DatasetNotCommitted(f"{uri} belongs to a run that did not commit ({owner} has another run); "
                                      "re-run the command that wrote it")
    return manifest


def dataset_files(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """Full paths (inside the filesystem) of a committed dataset's parts, for pyarrow or Ray Data."""
    manifest = read_manifest(uri, storage)
    _, path = filesystem(uri, storage)
    return [f"{path}/{name}" for name in manifest["files"]]


def column_range(uri: str, column: str, storage: StorageConfig | None = None) -> tuple[int, Any, Any] | None:
    """(rows, min, max) of one column of a committed dataset from its Parquet footers alone — no pass over
    the rows (1M impressions: 0.1 s instead of 18 s of Ray Data aggregations). None where a row group has
    no statistics (the caller then scans)."""
    fs, _ = filesystem(uri, storage)
    rows, lo, hi = 0, None, None
    for path in dataset_files(uri, storage):
        meta = pq.read_metadata(path, filesystem=fs)
        index = meta.schema.to_arrow_schema().get_field_index(column)
        if index < 0:
            return None
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            rows += group.num_rows
            if not group.num_rows:
                continue
            stats = group.column(index).statistics
            if stats is None or not stats.has_min_max:
                return None
            lo = stats.min if lo is None else min(lo, stats.min)
            hi = stats.max if hi is None else max(hi, stats.max)
    return rows, lo, hi


def count_rows(uri: str, storage: StorageConfig | None = None, where: pc.Expression | None = None) -> int:
    """Rows of a committed dataset (matching ``where``), counted part by part from the columns ``where`` names
    only — 1M posts' test split in milliseconds, without holding them."""
    import pyarrow.dataset as pads

    fs, _ = filesystem(uri, storage)
    return pads.dataset(dataset_files(uri, storage), filesystem=fs, format="parquet").count_rows(filter=where)


def dataset_schema(uri: str, storage: StorageConfig | None = None) -> pa.Schema:
    """A committed dataset's schema, from its first part's footer (no rows read)."""
    fs, _ = filesystem(uri, storage)
    files = dataset_files(uri, storage)
    return pq.read_schema(files[0], filesystem=fs) if files else pa.schema([])


def read_table(uri: str, storage: StorageConfig | None = None, columns: list[str] | None = None,
               filters: list | pc.Expression | None = None) -> pa.Table:
    """Read a committed dataset; refuses directories without a manifest and foreign schema versions.

    ``filters`` (pyarrow's DNF, e.g. ``[("split", "==", "valid")]``, or an expression) are applied part by part
    while reading, so only the matching rows are ever held together."""
    schema = _read_schema(uri, storage, columns)
    tables = list(_parts(uri, storage, columns, filters, schema))
    if schema is None:
        return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_parts(uri: str, storage: StorageConfig | None = None, columns: list[str] | None = None,
               filters: list | pc.Expression | None = None) -> Iterator[pa.Table]:
    """``read_table`` one part at a time (each cast to the dataset's schema): a caller that reduces each part
    holds one part's rows, not the dataset's."""
    yield from _parts(uri, storage, columns, filters, _read_schema(uri, storage, columns))


def _parts(uri: str, storage: StorageConfig | None, columns: list[str] | None, filters: Any,
           schema: pa.Schema | None) -> Iterator[pa.Table]:
    import pyarrow.dataset as pads

    fs, _ = filesystem(uri, storage)
    where = pq.filters_to_expression(filters) if isinstance(filters, list) else filters
    for f in dataset_files(uri, storage):
        # A scanner filters batch by batch as it reads: a part's matching rows are held, never the whole part
        # (pq.read_table decoded every row group of a part first: a 600k-row part of the 2M-impression feature
        # table is ~0.7 GB, its test rows a seventh of that).
        table = pads.dataset(f, filesystem=fs, format="parquet").scanner(
            columns=columns, filter=where, batch_readahead=2, fragment_readahead=1).to_table()
        yield table if schema is None else table.cast(schema)


def _read_schema(uri: str, storage: StorageConfig | None, columns: list[str] | None) -> pa.Schema | None:
    """The schema a committed dataset's parts are read as (None for kinds without a fixed schema); refuses
    directories without a manifest and foreign schema versions."""
    manifest = read_manifest(uri, storage)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{uri}: schema version {manifest.get('schema_version')} != supported {SCHEMA_VERSION}")
    kind = manifest["kind"]
    if kind not in SCHEMAS:
        return None
    schema = with_metadata(schema_for(kind), kind)
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)
    return schema


def file_schema_version(uri: str, storage: StorageConfig | None = None) -> dict[str, str]:
    """The contract tags a part carries in its Parquet metadata (first part)."""
    fs, _ = filesystem(uri, storage)
    first = dataset_files(uri, storage)[0]
    meta = pq.read_schema(fs.open_input_file(first)).metadata or {}
    return {"schema_version": meta.get(METADATA_VERSION_KEY, b"").decode(), "kind": meta.get(METADATA_KIND_KEY, b"").decode()}


# --- small artefacts of fitted states: Parquet frames and safetensors arrays, local or s3:// ---------

def frame_bytes(frame) -> bytes:
    """A polars frame as Arrow IPC stream bytes: how partial fits cross Ray Data (no pickle)."""
    table = frame.to_arrow()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def frame_of_bytes(payload: bytes):
    import polars as pl

    return pl.from_arrow(pa.ipc.open_stream(payload).read_all())


def safe_bytes(arrays: dict[str, Any]) -> bytes:
    """safetensors bytes; arrays made C-contiguous first (safetensors writes the raw buffer, so an
    F-ordered array such as sklearn's PCA components would come back transposed)."""
    import numpy as np
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in arrays.items()})


def write_parquet(uri: str, frame, storage=None) -> None:
    """One polars frame → one Parquet object (a fitted state's table, not a dataset)."""
    sink = pa.BufferOutputStream()
    pq.write_table(frame.to_arrow(), sink)
    write_bytes(uri, sink.getvalue().to_pybytes(), storage)


def read_parquet(uri: str, storage=None):
    """One Parquet object → a polars frame."""
    import polars as pl

    return pl.from_arrow(pq.read_table(pa.BufferReader(read_bytes(uri, storage))))


def expand_paths(paths: list[str]) -> list[str]:
    """Local globs expanded (sorted); s3:// URIs and plain paths as given."""
    import glob

    out: list[str] = []
    for p in paths:
        out.extend(sorted(glob.glob(p)) if not p.startswith("s3://") and any(c in p for c in "*?[") else [p])
    return out
