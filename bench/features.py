"""Impression feature stage at several sizes: the Ray executor's two history planes vs one process.

Both sides run the same pure functions (history windows, graph features, user/post joins —
``engagesim.features.impression``) on the same synthetic impressions. ``broadcast``: every history table is
broadcast to the join tasks; ``partitioned``: every group is joined partition against partition
(``pipeline/partitioned.py``). The baseline (``features_in_process``) runs in a child process on the whole
table. The world's users and posts grow with the log (keys grow with rows, as in real logs). Prints JSON
lines: wall time, rows/s, peak RSS of all processes, of the driver and of the largest Ray worker, and each
plane's throughput over the baseline's. The baseline is watched and stopped once it holds more than
``--baseline-cap-gb`` (it does not fit this machine at 40M rows; its line then says so, with its peak).

    .venv/bin/python bench/features.py --rows 10000000 --planes default
    .venv/bin/python bench/features.py --rows 40000000 --planes --baseline-max-rows 40000000
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import polars as pl  # noqa: E402
import ray  # noqa: E402
from common import PeakMemory, emit  # noqa: E402

from engagesim import io  # noqa: E402
from engagesim.config import SynthConfig, load_config  # noqa: E402
from engagesim.features.impression import features_in_process  # noqa: E402
from engagesim.pipeline.features import (  # noqa: E402
    build_impression_features,
    build_post_features,
    post_row_features,
)
from engagesim.synth import generate  # noqa: E402

WORLD = dict(images=0, rows_per_shard=250_000, days=14)


def single_process(features, world: str, post_path: str, answer) -> None:
    """The baseline, in a child process of its own (so its memory is its own): the in-process executor on
    the whole table — one polars frame, every table fit in this process. Puts its rows/s on ``answer``."""
    start = time.perf_counter()
    inter = io.read_table(io.join(world, "interactions"))
    out = features_in_process(inter, pl.read_parquet(post_path), pl.from_arrow(io.read_table(io.join(world, "users"))),
                              features.valid_hours, features.window_hours, features.history_mode, features.jaccard_k,
                              features.seed, test_share=features.test_share,
                              leiden_max_edges=features.leiden_max_edges, community_folds=features.community_folds)
    assert out.num_rows == inter.num_rows
    answer.put(inter.num_rows / (time.perf_counter() - start))


def baseline(features, world: str, post_path: str, cap_gb: float) -> dict:
    """Run ``single_process`` watched: its peak RSS sampled every 0.2 s, and stopped (SIGKILL) once it holds more
    than ``cap_gb`` — the machine's other processes survive a baseline that does not fit (40M rows here)."""
    import psutil

    spawn = multiprocessing.get_context("spawn")
    answer = spawn.Queue()
    child = spawn.Process(target=single_process, args=(features, world, post_path, answer))
    started = time.perf_counter()
    child.start()
    watched, peak, stopped = psutil.Process(child.pid), 0, False
    while child.is_alive():
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if peak > cap_gb * 2**30:
            child.kill()
            stopped = True
            break
        time.sleep(0.2)
    child.join()
    out = {"single_process_peak_rss_mb": round(peak / 2**20, 1), "single_process_seconds": round(time.perf_counter() - started, 1)}
    if stopped or child.exitcode:
        return {**out, "single_process_failed": f"stopped over {cap_gb} GB RSS" if stopped else f"exit {child.exitcode}"}
    return {**out, "single_process_rows_per_s": round(answer.get(timeout=60))}


# "default": the shipped config (history tables over features.broadcast_max_rows rows partitioned);
# "broadcast": every table broadcast (the plane before partitioning); "partitioned": nothing broadcast.
PLANES = {"default": [], "broadcast": ["features.broadcast_max_rows=1000000000"],
          "partitioned": ["features.broadcast_max_rows=0"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000_000, 10_000_000])
    parser.add_argument("--planes", nargs="*", default=["default", "broadcast"], choices=list(PLANES),
                        help="the Ray planes to run (none: the baseline only, e.g. its memory at 40M)")
    parser.add_argument("--broadcast-max-rows", type=int, default=4_000_000,
                        help="run the all-broadcast plane only up to this size (its join tasks hold every table)")
    parser.add_argument("--baseline-max-rows", type=int, default=10_000_000,
                        help="skip the single-process baseline above this size")
    parser.add_argument("--baseline-cap-gb", type=float, default=18.0,
                        help="stop the single-process baseline once it holds more than this (it may not fit)")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    base = ["embed.text=false", "embed.image=false", "embed.sketch=false", "features.blocks=8"]
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(args.rows):
            world = f"{tmp}/world{n}"
            generate(SynthConfig(**WORLD, users=max(2_000, n // 100), posts=max(5_000, n // 40), impressions=n), world)
            cfg = load_config(None, base)
            rows = post_row_features(io.read_table(io.join(world, "posts")))
            post_table, _, _ = build_post_features(cfg, rows, pl.from_arrow(io.read_table(io.join(world, "users"))))
            post_path = f"{tmp}/posts{n}.parquet"
            post_table.write_parquet(post_path)
            rates = {}
            for plane in args.planes:
                if plane == "broadcast" and n > args.broadcast_max_rows:
                    continue
                cfg = load_config(None, [*base, *PLANES[plane]])
                with PeakMemory() as mem:
                    start = time.perf_counter()
                    info, _ = build_impression_features(cfg, io.join(world, "interactions"), io.join(world, "users"),
                                                        post_table, f"{tmp}/f{n}{plane}/impressions",
                                                        f"{tmp}/f{n}{plane}/state")
                    seconds = time.perf_counter() - start
                rates[plane] = n / seconds
                emit(bench="features_plane", rows=n, plane=plane, seconds=round(seconds, 1),
                     rows_per_s=round(rates[plane]), peak_rss_mb=mem.peak_mb, driver_peak_mb=mem.driver_mb,
                     largest_worker_mb=mem.worker_mb, partitions=info["history"]["partitions"],
                     partitioned=info["history"]["partitioned"], history_train_rows=info["history"]["train_rows"],
                     graph_edges=info["history"]["graph_edges"], phases=info.get("seconds"))
            if n <= args.baseline_max_rows:
                single = baseline(cfg.features, world, post_path, args.baseline_cap_gb)
                rate = single.get("single_process_rows_per_s")
                emit(bench="features_vs_single_process", rows=n, **single,
                     **{f"{plane}_ratio": round(r / rate, 3) if rate else None for plane, r in rates.items()})
    ray.shutdown()


if __name__ == "__main__":
    main()
