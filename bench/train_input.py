"""Impression-level training: the training split streamed from Ray Data vs read into the driver.

The same feature table (a synthetic world, embeddings off) trains XGBoost at impression level twice, each
in its own driver process: once in memory (the table read and sliced to the workers) and once above
``train.stream_rows`` (workers read their Ray Data shard; XGBoost bins it batch by batch). Prints JSON
lines per size: wall seconds, the driver's peak RSS and the peak of driver + Ray workers for both, and the
streamed/in-memory ratios. The baseline is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PeakMemory, emit  # noqa: E402

WORLD = dict(users=20_000, posts=50_000, images=0, rows_per_shard=250_000, days=10)


def child(features: str, stream: bool, rounds: int) -> None:
    """One training run in this process; prints one JSON line."""
    from engagesim.config import load_config
    from engagesim.pipeline.train import train_impression_level
    from engagesim.runtime import ensure_ray

    cfg = load_config(None, ["embed.text=false", "embed.image=false", "train.models=['xgb']",
                             f"train.xgb.rounds={rounds}", f"train.xgb.checkpoint_every={rounds}",
                             f"train.stream_rows={1 if stream else 10**12}"])
    ensure_ray(cfg.ray)
    with tempfile.TemporaryDirectory() as models, PeakMemory() as peak:
        started = time.perf_counter()
        result = train_impression_level(cfg, features, models)
        seconds = time.perf_counter() - started
    print(json.dumps({"seconds": round(seconds, 1), "driver_peak_mb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024, "all_peak_mb": peak.peak_mb, "train_input": result["train_input"],
        "rce_like": result["models"]["xgb"]["like"]["rce"], "rows": result["rows"]}))


def build(impressions: int, out: str) -> str:
    from engagesim import io
    from engagesim.config import SynthConfig, load_config
    from engagesim.pipeline.features import run_features
    from engagesim.runtime import ensure_ray
    from engagesim.synth import generate

    cfg = load_config(None, ["embed.text=false", "embed.image=false"])
    ensure_ray(cfg.ray)
    world = os.path.join(out, "world")
    generate(SynthConfig(impressions=impressions, **WORLD), world)
    run_features(cfg, io.join(world, "posts"), os.path.join(out, "features"), io.join(world, "users"),
                 io.join(world, "interactions"))
    return os.path.join(out, "features", "impressions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, nargs="+", default=[500_000, 2_000_000])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--child", nargs=2, metavar=("FEATURES", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--build", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1] == "stream", args.rounds)
        return
    if args.build:
        build(args.impressions[0], args.build)
        return
    for n in args.impressions:
        with tempfile.TemporaryDirectory() as out:
            # Each step in its own process: the world and features builders' memory is not the trainers'.
            subprocess.run([sys.executable, __file__, "--impressions", str(n), "--build", out], check=True)
            features = os.path.join(out, "features", "impressions")
            runs = {}
            for mode in ("memory", "stream"):
                done = subprocess.run([sys.executable, __file__, "--rounds", str(args.rounds), "--child", features,
                                       mode], check=True, capture_output=True, text=True)
                runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            emit(bench="train_input", impressions=n, rows=runs["stream"]["rows"], in_memory=runs["memory"],
                 streamed=runs["stream"],
                 driver_peak_ratio=round(runs["stream"]["driver_peak_mb"] / runs["memory"]["driver_peak_mb"], 3),
                 seconds_ratio=round(runs["stream"]["seconds"] / runs["memory"]["seconds"], 3))


if __name__ == "__main__":
    main()
