"""The post feature stage at several sizes: the Ray post plane vs the in-process executor on one frame.

Posts carry a 384-float text embedding (random unit vectors, so no model runs: the bench measures the
plane, not MiniLM), so PCA and the text clusters are fit and the rows are as wide as a real run's. Both
executors get the same rows and the same impression counts (author reach). The plane runs in this driver;
the baseline (``build_post_features``: the whole post table in one process) in a child process of its own.
Prints JSON lines: wall seconds, driver peak RSS, all processes' peak (RSS and PSS), the largest worker,
the baseline's seconds and peak RSS, and the ratios.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
from common import PeakMemory, emit  # noqa: E402

from engagesim import datasets, io  # noqa: E402
from engagesim.config import SynthConfig, load_config  # noqa: E402
from engagesim.features.post import post_row_features  # noqa: E402
from engagesim.pipeline.features import impression_span  # noqa: E402
from engagesim.pipeline.post_plane import build_post_features, run_post_plane  # noqa: E402
from engagesim.synth import generate  # noqa: E402

DIM = 384
OVERRIDES = ["embed.text=false", "embed.image=false", "embed.sketch=false", "features.blocks=8"]


def with_vectors(batch: pa.Table) -> pa.Table:
    """Post rows + a unit text embedding drawn from a seed of the block's first post id (reproducible)."""
    rows = post_row_features(batch)
    rng = np.random.default_rng(zlib.crc32(rows.column("post_id")[0].as_py().encode()))
    x = rng.normal(size=(rows.num_rows, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return rows.append_column("text_emb", pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM))


def baseline(args: tuple) -> dict:
    """The in-process executor in a child process: the whole post table in one polars frame."""
    rows_dir, world, cutoff = args
    cfg = load_config(None, OVERRIDES)
    start = time.perf_counter()
    rows = io.read_table(rows_dir)
    t = pl.scan_parquet(io.dataset_files(io.join(world, "interactions"))).filter(
        pl.col("impression_at").dt.epoch("us") < cutoff).group_by("post_id").agg(pl.len().alias("impressions"))
    table, info, _ = build_post_features(cfg, rows, pl.from_arrow(io.read_table(io.join(world, "users"))),
                                         (t.collect(), cutoff))
    table.write_parquet(f"{rows_dir}.baseline.parquet")
    return {"seconds": round(time.perf_counter() - start, 1), "rows": info["rows"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--posts", type=int, nargs="+", default=[100_000, 400_000])
    parser.add_argument("--baseline-max-posts", type=int, default=2_000_000)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = load_config(None, OVERRIDES)
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(args.posts):
            world = f"{tmp}/world{n}"
            generate(SynthConfig(users=max(2_000, n // 20), posts=n, impressions=2 * n, images=0,
                                 rows_per_shard=250_000, days=14), world)
            rows_dir = f"{tmp}/rows{n}"
            datasets.write_streaming(datasets.read(io.join(world, "posts")).map_batches(
                with_vectors, batch_format="pyarrow", batch_size=20_000), rows_dir, "post_rows")
            cutoff = impression_span(cfg, io.join(world, "interactions"))[2]
            with PeakMemory() as mem:
                start = time.perf_counter()
                info, _ = run_post_plane(cfg, datasets.read(rows_dir), f"{tmp}/scratch{n}", f"{tmp}/out{n}/posts",
                                         f"{tmp}/out{n}/state", pl.from_arrow(io.read_table(io.join(world, "users"))),
                                         datasets.read(io.join(world, "interactions")), cutoff, lambda _: None)
                seconds = time.perf_counter() - start
            plane = {"seconds": round(seconds, 1), "driver_peak_mb": mem.driver_mb, "all_peak_mb": mem.peak_mb,
                     "all_peak_pss_mb": mem.pss_mb, "largest_worker_mb": mem.worker_mb}
            emit(bench="post_plane", posts=n, rows=info["rows"], **plane)
            if n <= args.baseline_max_posts:
                with spawn.Pool(1) as pool:
                    single = pool.apply(baseline, ((rows_dir, world, cutoff),))
                emit(bench="post_plane_vs_in_process", posts=n, in_process_seconds=single["seconds"],
                     in_process_peak_rss_mb=single["peak_rss_mb"],
                     speed_ratio=round(single["seconds"] / plane["seconds"], 3),
                     driver_memory_ratio=round(plane["driver_peak_mb"] / single["peak_rss_mb"], 3))
    ray.shutdown()


if __name__ == "__main__":
    main()
