"""Generate a synthetic world on Ray Data: users, posts, images, impressions and their ground truth.

Shards are fixed ranges of rows with their own seeded generator, and each
shard writes its own Parquet part (``part-<shard>.parquet``), so the output is
byte-identical for a seed whatever the number of workers, memory stays flat
as the row count grows (a task holds one shard), and a cluster generates a
billion rows by adding nodes.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engagesim import datasets, io
from engagesim.config import RayConfig, StorageConfig, SynthConfig
from engagesim.metrics import average_precision, grouped, rce_from_sums, rmse
from engagesim.schema import ENGAGEMENTS
from engagesim.synth import rows
from engagesim.synth.images import draw_image, png_bytes
from engagesim.synth.world import (
    STREAM_IMAGES,
    STREAM_IMPRESSIONS,
    STREAM_POST_TEXT,
    World,
    build_world,
    rng_for,
)

POSTS_PER_SHARD = 20_000
IMAGES_PER_SHARD = 100
USERS_PER_PART = 500_000
ORACLE_AP_ROWS = 2_000_000  # AP needs every (score, label) pair; it is computed on the first shards up to this

def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def _write(out: str, dataset: str, shard: int, table: pa.Table, kind: str, storage: StorageConfig | None) -> None:
    io.write_named_part(io.join(out, dataset), part_name(shard), table, kind, storage)


def _posts_shard(world: World, shard: int, out: str, storage: StorageConfig | None) -> dict:
    lo = shard * POSTS_PER_SHARD
    hi = min(lo + POSTS_PER_SHARD, world.n_posts)
    posts, truth = rows.posts_tables(world, lo, hi, rng_for(world.cfg.seed, STREAM_POST_TEXT, shard),
                                     media_root(out, storage))
    _write(out, "posts", shard, posts, "posts", storage)
    _write(out, "truth/posts", shard, truth, "truth_posts", storage)
    return {"rows": hi - lo}


def _images_shard(world: World, shard: int, out: str, storage: StorageConfig | None) -> dict:
    drawn = np.flatnonzero(world.drawn)[shard * IMAGES_PER_SHARD:(shard + 1) * IMAGES_PER_SHARD]
    names = rows.post_ids(drawn).to_pylist()
    for post, name in zip(drawn, names):
        pixels = draw_image(world.image_props[post], world.cfg.image_size, rng_for(world.cfg.seed, STREAM_IMAGES, int(post)))
        io.write_bytes(io.join(media_root(out, storage), f"{name}.png"), png_bytes(pixels), storage)
    return {"rows": len(drawn)}


def _impressions_shard(world: World, shard: int, out: str, storage: StorageConfig | None) -> dict:
    per = world.cfg.rows_per_shard
    n = min(per, world.cfg.impressions - shard * per)
    interactions, truth, sums = rows.interactions_tables(world, n, rng_for(world.cfg.seed, STREAM_IMPRESSIONS, shard))
    _write(out, "interactions", shard, interactions, "interactions", storage)
    _write(out, "truth/interactions", shard, truth, "truth_interactions", storage)
    return {"rows": n, "sums": sums}


def media_root(out: str, storage: StorageConfig | None) -> str:
    """Where images go; absolute so the URIs in posts.media resolve from any working directory."""
    if io.is_s3(out):
        return io.join(out, "media")
    _, path = io.filesystem(out, storage)
    return io.join(path, "media")


def _shard_task(batch: dict[str, np.ndarray], fn: Callable, world_ref: Any, out: str,
                storage: StorageConfig | None) -> dict[str, np.ndarray]:
    world = datasets.fetched(world_ref)
    results = [fn(world, int(shard), out, storage) for shard in batch["id"]]
    return {"shard": batch["id"], "result": np.array([json.dumps(r) for r in results], dtype=object)}


def run_shards(fn: Callable, n_shards: int, world_ref: Any, out: str, storage: StorageConfig | None,
               workers: int | None) -> list[dict]:
    """Run ``fn`` on shards 0..n-1 as Ray Data tasks; results come back ordered by shard."""
    import ray

    if n_shards == 0:
        return []
    # One block per shard so each becomes its own task (range() packs small ranges into one block).
    ds = ray.data.from_items([{"id": i} for i in range(n_shards)], override_num_blocks=n_shards)
    ds = ds.map_batches(
        _shard_task,
        batch_size=1,
        fn_kwargs={"fn": fn, "world_ref": world_ref, "out": out, "storage": storage},
        compute=ray.data.TaskPoolStrategy(size=workers) if workers else None,
        num_cpus=1,
    )
    results = sorted(ds.take_all(), key=lambda r: int(r["shard"]))
    return [json.loads(r["result"]) for r in results]


def _commit(out: str, dataset: str, kind: str, shard_rows: list[int], storage: StorageConfig | None,
            extra: dict | None = None) -> str:
    uri = io.join(out, dataset)
    writer = io.DatasetWriter(uri, kind, storage)
    for shard, n in enumerate(shard_rows):
        writer.add_written(part_name(shard), n)
    writer.commit(extra)
    return uri


def oracle_metrics(out: str, storage: StorageConfig | None, shard_sums: list[dict]) -> dict:
    """Scores of the true probabilities / expectations on the generated labels: the best achievable."""
    metrics: dict[str, Any] = {}
    posts = io.read_table(io.join(out, "posts"), storage, columns=["post_id", "likes"])
    truth = io.read_table(io.join(out, "truth/posts"), storage, columns=["post_id", "expected_log1p_likes"])
    metrics["rmse_log1p_likes"] = rmse(np.log1p(posts.column("likes").to_numpy()),
                                       truth.column("expected_log1p_likes").to_numpy())
    if not shard_sums:
        return metrics
    total = {"count": 0, "ce": np.zeros(4), "positives": np.zeros(4), "groups": {}}
    for s in shard_sums:
        total["count"] += s["count"]
        total["ce"] += s["ce"]
        total["positives"] += s["positives"]
        for g, v in s["groups"].items():
            acc = total["groups"].setdefault(g, {"count": 0, "ce": np.zeros(4), "positives": np.zeros(4)})
            acc["count"] += v["count"]
            acc["ce"] += v["ce"]
            acc["positives"] += v["positives"]
    labels, probs, groups = _ap_sample(out, storage)
    for k, e in enumerate(ENGAGEMENTS):
        group_rce = {f"group_{g}": rce_from_sums(v["ce"][k], v["positives"][k], v["count"])
                     for g, v in sorted(total["groups"].items())}
        finite = [v for v in group_rce.values() if not math.isnan(v)]
        metrics[e] = {
            "rate": float(total["positives"][k] / max(total["count"], 1)),
            "rce": rce_from_sums(total["ce"][k], total["positives"][k], total["count"]),
            "ap": average_precision(labels[:, k], probs[:, k]),
            "rce_by_popularity": {**group_rce, "mean": float(np.mean(finite)) if finite else float("nan")},
            "ap_by_popularity": grouped(average_precision, labels[:, k], probs[:, k], groups),
        }
    metrics["ap_rows"] = int(len(labels))
    return metrics


def _ap_sample(out: str, storage: StorageConfig | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    inter_files = io.dataset_files(io.join(out, "interactions"), storage)
    truth_files = io.dataset_files(io.join(out, "truth/interactions"), storage)
    fs, _ = io.filesystem(out, storage)
    import pyarrow.parquet as pq

    labels, probs, groups, n = [], [], [], 0
    for fi, ft in zip(inter_files, truth_files):
        inter = pq.read_table(fi, filesystem=fs, columns=[f"{e}_at" for e in ENGAGEMENTS])
        truth = pq.read_table(ft, filesystem=fs, columns=[f"p_{e}" for e in ENGAGEMENTS] + ["popularity_group"])
        labels.append(np.column_stack([pc.is_valid(inter.column(f"{e}_at")).to_numpy(zero_copy_only=False) for e in ENGAGEMENTS]))
        probs.append(np.column_stack([truth.column(f"p_{e}").to_numpy() for e in ENGAGEMENTS]))
        groups.append(truth.column("popularity_group").to_numpy())
        n += inter.num_rows
        if n >= ORACLE_AP_ROWS:
            break
    return np.concatenate(labels), np.concatenate(probs), np.concatenate(groups)


def generate(
    cfg: SynthConfig,
    out: str,
    storage: StorageConfig | None = None,
    ray_config: RayConfig | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Write users, posts, interactions, media and truth/ under ``out``; return counts and oracle metrics."""
    import ray

    from engagesim.runtime import ensure_ray

    started = time.perf_counter()
    world = build_world(cfg)
    ensure_ray(ray_config)
    world_ref = ray.put(world)
    extra = {"synth": cfg.model_dump(mode="json")}

    users_rows = []
    users_writer = io.DatasetWriter(io.join(out, "users"), "users", storage)
    for part, lo in enumerate(range(0, world.n_users, USERS_PER_PART)):
        table = rows.users_table(world, lo, min(lo + USERS_PER_PART, world.n_users))
        users_writer.write(table, name=part_name(part))
        users_rows.append(table.num_rows)
    users_writer.commit(extra)
    log(f"users: {world.n_users:,}")

    n_post_shards = math.ceil(world.n_posts / POSTS_PER_SHARD)
    post_results = run_shards(_posts_shard, n_post_shards, world_ref, out, storage, cfg.workers)
    post_rows = [r["rows"] for r in post_results]
    _commit(out, "posts", "posts", post_rows, storage, extra)
    _commit(out, "truth/posts", "truth_posts", post_rows, storage, extra)
    log(f"posts: {sum(post_rows):,}")

    n_images = int(world.drawn.sum())
    image_results = run_shards(_images_shard, math.ceil(n_images / IMAGES_PER_SHARD), world_ref, out, storage, cfg.workers)
    log(f"images: {n_images:,}")

    t_imp = time.perf_counter()
    n_imp_shards = math.ceil(cfg.impressions / cfg.rows_per_shard)
    imp_results = run_shards(_impressions_shard, n_imp_shards, world_ref, out, storage, cfg.workers)
    imp_seconds = time.perf_counter() - t_imp
    imp_rows = [r["rows"] for r in imp_results]
    _commit(out, "interactions", "interactions", imp_rows, storage, extra)
    _commit(out, "truth/interactions", "truth_interactions", imp_rows, storage, extra)
    log(f"impressions: {sum(imp_rows):,} in {imp_seconds:.1f}s")

    oracle = oracle_metrics(out, storage, [r["sums"] for r in imp_results])
    datasets = {name: io.join(out, name) for name in ("users", "posts", "interactions", "truth/posts", "truth/interactions")}
    summary = {
        "out": out,
        "rows": {"users": sum(users_rows), "posts": sum(post_rows), "interactions": sum(imp_rows),
                 "images": sum(r["rows"] for r in image_results)},
        "oracle": oracle,
        "seconds": round(time.perf_counter() - started, 2),
        "impressions_per_second": round(sum(imp_rows) / imp_seconds, 1) if imp_seconds > 0 else None,
        "datasets": datasets,
        "media": media_root(out, storage),
        "world": {"intercepts": world.intercepts.tolist(), "popularity_edges": world.popularity_edges.tolist(),
                  "seed": cfg.seed},
    }
    io.write_json(io.join(out, "synth.json"), summary, storage)
    return summary
