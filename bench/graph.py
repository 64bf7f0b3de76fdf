"""The graph fit alone — CF matrices, Jaccard-similar creators, Leiden — and its peak memory, phase by phase.

The graph is the one global fit of the impression features: one Ray task holds every engaged or followed
(user, creator) pair. Each setting runs ``fit_graph_from_pairs`` in a child process of its own and prints one
JSON line: wall seconds, the peak RSS of each phase (sampled every 0.05 s; the peak since the phase before) and
of the whole fit, and the like graph's communities. The baseline is Leiden on every edge (no cap), measured in
the same run beside ``features.leiden_max_edges``; the last line gives the ratio of the two peaks.

    .venv/bin/python bench/graph.py --pairs 2000000 --cap 500000     # a synthetic power-law log's pairs
    .venv/bin/python bench/graph.py --edges <dir of Parquet parts>    # a run's edges (the history fit writes
                                                                      # them under features/*_history_train/_edges)

On the 40M-impression world's 17.9M edges: whole fit 7.70 GB before the Jaccard blocks and the cap, 5.4 GB
after (2026-12-05); 3.03 GB with the per-pair table on integer codes, summed per part (2026-12-06), where
Leiden on the like edges is now the peak (README, "How it scales").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit  # noqa: E402

RATES = {"like": 0.7, "reply": 0.05, "retweet": 0.17, "quote": 0.02}  # share of pairs with each engagement
FOLLOWS = 0.3


def synthetic_pairs(n: int, seed: int = 0) -> pl.DataFrame:
    """``n`` distinct (user, creator) pairs shaped like the synthetic world's at 40M impressions (17.9M pairs:
    ~45 per user, ~370 per creator, creators' popularity heavy-tailed), with engagement counts and follows."""
    from engagesim.schema import ENGAGEMENTS

    rng = np.random.default_rng(seed)
    users, creators = max(n // 45, 10), max(n // 370, 10)
    u = rng.integers(0, users, int(n * 1.1))
    c = np.minimum((creators * rng.random(len(u)) ** 2.5).astype(np.int64), creators - 1)  # popular first
    pairs = np.unique(np.column_stack([u, c]), axis=0)[:n]
    rng.shuffle(pairs)
    frame = {"user_id": [f"u{x}" for x in pairs[:, 0]], "creator_id": [f"c{x}" for x in pairs[:, 1]]}
    frame.update({f"c_{e}": (rng.random(len(pairs)) < RATES[e]).astype(np.float64) for e in ENGAGEMENTS})
    frame["follows"] = (rng.random(len(pairs)) < FOLLOWS).astype(np.int8)
    return pl.DataFrame(frame)


def child(source: str, cap: int | None) -> None:
    """One fit in this process; prints one JSON line."""
    from engagesim.features.graph_fit import fit_graph_from_pairs

    proc, peak, phases = psutil.Process(), [0], {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()

    def mark(phase: str) -> None:
        phases[phase] = round(max(peak[0], proc.memory_info().rss) / 2**20)
        peak[0] = 0

    rows = [0]

    def parts():  # one part at a time, as the pipeline's graph task reads them
        for path in sorted(Path(source).glob("*.parquet")):
            part = pl.read_parquet(path)
            rows[0] += part.height
            yield part

    model = fit_graph_from_pairs(parts(), 20, 0, cap, mark=mark)
    seconds = time.perf_counter() - start
    done.set()
    like = model.communities["like"]
    print(json.dumps({"cap": cap, "pairs": rows[0], "seconds": round(seconds, 1), "phases_peak_mb": phases,
                      "peak_mb": max(phases.values()), "like_labelled": int((like >= 0).sum()),
                      "like_communities": len(np.unique(like[like >= 0]))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", help="a directory of Parquet parts (user_id, creator_id, c_<engagement>, follows)")
    parser.add_argument("--pairs", type=int, default=2_000_000, help="synthetic pairs, when --edges is not given")
    parser.add_argument("--cap", type=int, default=None, help="features.leiden_max_edges (default: its default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from engagesim.config import LEIDEN_MAX_EDGES

    if args.child:
        child(args.child, None if args.cap is None or args.cap < 0 else args.cap)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        source = args.edges
        if source is None:
            source = work
            pairs = synthetic_pairs(args.pairs).with_columns(part=pl.col("user_id").hash() % 40)
            for i, part in enumerate(pairs.partition_by("part", include_key=False)):  # by user, as the history fit
                part.write_parquet(f"{work}/part-{i:05d}.parquet")
            del pairs
        results = {}
        for name, cap in (("uncapped", -1), ("capped", args.cap or LEIDEN_MAX_EDGES)):
            done = subprocess.run([sys.executable, __file__, "--child", source, "--cap", str(cap)],
                                  capture_output=True, text=True)
            if done.returncode:
                emit(bench="graph", setting=name, failed=done.returncode, stderr_tail=done.stderr[-2000:])
                return
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            emit(bench="graph", setting=name, **results[name])
    emit(bench="graph_cap", peak_ratio=round(results["capped"]["peak_mb"] / results["uncapped"]["peak_mb"], 3),
         leiden_like_ratio=round(results["capped"]["phases_peak_mb"]["leiden like"]
                                 / results["uncapped"]["phases_peak_mb"]["leiden like"], 3))


if __name__ == "__main__":
    main()
