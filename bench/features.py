"""Impression feature throughput: the Ray Data pipeline vs the same transforms in one process.

Both sides run the same pure functions (history windows, graph features,
user/post joins — ``engagesim.features.impression.join_impressions``) on the same
synthetic impressions; the baseline does it in this process with polars on
the whole table. Prints JSON lines: rows/s of each, their ratio, and the
peak memory (driver + Ray workers) of the Ray pipeline at two sizes.
"""

from __future__ import annotations

import argparse
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
from engagesim.features import history  # noqa: E402
from engagesim.features.graph import fit_graph  # noqa: E402
from engagesim.features.impression import join_impressions  # noqa: E402
from engagesim.features.state import user_attributes  # noqa: E402
from engagesim.pipeline.features import (  # noqa: E402
    build_impression_features,
    build_post_features,
    post_row_features,
)
from engagesim.synth import generate  # noqa: E402

WORLD = dict(users=20_000, posts=50_000, images=0, rows_per_shard=250_000, days=14)


def single_process(cfg, world: str, post_table: pl.DataFrame) -> float:
    """The baseline: everything in this process, one polars pass over the whole table."""
    f = cfg.features
    start = time.perf_counter()
    inter = io.read_table(io.join(world, "interactions"))
    df = history.with_labels_and_windows(pl.from_arrow(inter), None, f.window_hours)
    topics = (post_table.select("post_id", pl.col("text_cluster").alias("topic"))
              if "text_cluster" in post_table.columns else None)
    if topics is not None:
        df = df.join(topics, on="post_id", how="left", maintain_order="left")
    origin = int(df["t_us"].min())
    cutoff = int(df["t_us"].max()) - int(f.valid_hours * 3600 * 1e6)
    train = df.filter(pl.col("t_us") < cutoff)
    aggregates = history.window_aggregates(train)
    users = user_attributes(pl.from_arrow(io.read_table(io.join(world, "users"))))
    posts = post_table.drop("author_id", "username", "created_at", "likes", "split", "label_log1p_likes")
    ctx = {"train_tables": history.feature_tables(aggregates, f.history_mode),
           "apply_tables": history.feature_tables(aggregates, "apply"),
           "graph": fit_graph(train, f.jaccard_k), "users": users,
           "posts": posts.rename({c: f"post_{c}" for c in posts.columns if c != "post_id"}),
           **({"topics": topics} if topics is not None else {})}
    out = join_impressions(inter, ctx, origin, cutoff, f.window_hours, f.history_mode)
    assert out.num_rows == inter.num_rows
    return inter.num_rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--memory-rows", type=int, nargs=2, default=[2_000_000, 10_000_000])
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = load_config(None, ["embed.text=false", "embed.image=false", "embed.sketch=false", "features.blocks=8"])
    with tempfile.TemporaryDirectory() as tmp:
        sizes = sorted({args.rows, *args.memory_rows})
        peaks = {}
        for n in sizes:
            world = f"{tmp}/world{n}"
            generate(SynthConfig(**WORLD, impressions=n), world)
            rows = post_row_features(io.read_table(io.join(world, "posts")))
            post_table, _, _ = build_post_features(cfg, rows, pl.from_arrow(io.read_table(io.join(world, "users"))))
            with PeakMemory() as mem:
                start = time.perf_counter()
                build_impression_features(cfg, io.join(world, "interactions"), io.join(world, "users"), post_table,
                                          f"{tmp}/features{n}")
                ray_rate = n / (time.perf_counter() - start)
            peaks[n] = mem.peak_mb
            emit(bench="features_peak_memory", rows=n, peak_rss_mb=mem.peak_mb)
            if n == args.rows:
                base = single_process(cfg, world, post_table)
                emit(bench="features_impressions", rows=n, ray_rows_per_s=round(ray_rate),
                     single_process_rows_per_s=round(base), ratio=round(ray_rate / base, 3))
        small, large = args.memory_rows
        emit(bench="features_memory_growth", rows_small=small, rows_large=large, ratio=round(peaks[large] / peaks[small], 3))
    ray.shutdown()


if __name__ == "__main__":
    main()
