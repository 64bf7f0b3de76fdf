"""Synthetic-world generation throughput and memory.

Prints JSON lines:
- impressions rows/s on Ray Data with 1 and 2 workers, each with the ratio to a
  plain single-process loop that generates and writes the same shards in this process;
- peak resident memory (driver + Ray workers) at 1M and 10M impressions, and their ratio
  (flat memory means the ratio stays near 1: a task only ever holds one shard).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
from common import PeakMemory, emit  # noqa: E402

from engagesim.config import SynthConfig  # noqa: E402
from engagesim.synth import generate  # noqa: E402
from engagesim.synth.rows import interactions_tables  # noqa: E402
from engagesim.synth.world import STREAM_IMPRESSIONS, build_world, rng_for  # noqa: E402

WORLD = dict(users=20_000, posts=50_000, images=0, rows_per_shard=250_000)


def baseline_rows_per_s(impressions: int, out: Path) -> float:
    """The same shards generated and written one after another in this process (no Ray)."""
    cfg = SynthConfig(**WORLD, impressions=impressions)
    world = build_world(cfg)
    start = time.perf_counter()
    for shard in range(impressions // cfg.rows_per_shard):
        table, truth, _ = interactions_tables(world, cfg.rows_per_shard, rng_for(cfg.seed, STREAM_IMPRESSIONS, shard))
        pq.write_table(table, out / f"i{shard}.parquet", compression="zstd")
        pq.write_table(truth, out / f"t{shard}.parquet", compression="zstd")
    return impressions / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2_000_000, help="impressions for the throughput runs")
    parser.add_argument("--memory-rows", type=int, nargs=2, default=[1_000_000, 10_000_000])
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        base = baseline_rows_per_s(args.rows, Path(tmp))
        emit(bench="synth_impressions_baseline", rows=args.rows, rows_per_s=round(base))
        for workers in (1, 2):
            summary = generate(SynthConfig(**WORLD, impressions=args.rows, workers=workers), f"{tmp}/w{workers}")
            rate = summary["impressions_per_second"]
            emit(bench="synth_impressions", workers=workers, rows=args.rows, rows_per_s=round(rate),
                 baseline_rows_per_s=round(base), ratio=round(rate / base, 3))
        peaks = {}
        for n in args.memory_rows:
            with PeakMemory() as mem:
                generate(SynthConfig(**WORLD, impressions=n, workers=2), f"{tmp}/m{n}")
            peaks[n] = mem.peak_mb
            emit(bench="synth_peak_memory", rows=n, peak_rss_mb=mem.peak_mb)
        small, large = args.memory_rows
        emit(bench="synth_memory_growth", rows_small=small, rows_large=large,
             ratio=round(peaks[large] / peaks[small], 3))
    ray.shutdown()


if __name__ == "__main__":
    main()
