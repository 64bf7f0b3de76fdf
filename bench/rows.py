"""The whole behaviour job at several log sizes: does any process grow with the rows?

Each size runs ``pipeline behaviour`` end to end (synthetic world generated on Ray, EDA, features, post and
impression training, evaluation, report) in a driver process of its own, on the embedded local Ray, with
embeddings off and XGBoost only (for time; the data plane is the same for every family). Prints one JSON
line per size: wall seconds, seconds per stage, the driver's peak RSS (and the steps of the job where it
peaked: the driver's RSS between two of its log lines; every step's RSS peak, end USS and Arrow bytes in
``driver_steps``), the peak of driver + every Ray worker
and the largest single worker, which training path ran, and the served ensemble's like RCE. A last line
gives the growth of the all-process peak between the two largest sizes (the issue's bound: ≤ 1.3× from 10M
to 40M) and the largest driver peak (bound: ≤ 1.5 GB at every size).

    .venv/bin/python bench/rows.py --impressions 2000000 10000000 40000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PeakMemory, emit  # noqa: E402


def world(impressions: int) -> list[str]:
    """A world that grows with the log: 1 user per 100 impressions, 1 post per 40 (bench/features.py's)."""
    return [f"synth.impressions={impressions}", f"synth.users={max(2_000, impressions // 100)}",
            f"synth.posts={max(5_000, impressions // 40)}", "synth.images=0", "synth.rows_per_shard=250000",
            "synth.days=14"]


class DriverSteps:
    """The driver's peak RSS between consecutive log lines of the job: which step of which stage holds the most
    (sampled every 0.1 s; a step is named by the log line that ends it)."""

    def __init__(self, trace: bool = False) -> None:
        import psutil

        self._proc, self._peak, self.steps, self.traced = psutil.Process(), 0, [], []
        self._trace = trace
        if trace:  # Python's own allocations (numpy's included): which lines hold the driver's heap at each step
            import tracemalloc

            tracemalloc.start(4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(0.1)

    def log(self, message: str) -> None:
        import pyarrow as pa

        self._peak = max(self._peak, self._proc.memory_info().rss)
        # Also at the step's end: the driver's own pages (USS: without the object-store pages it mapped, which
        # RSS counts) and what Arrow's pool holds live (the rest of USS is other heaps, or freed and retained).
        uss = self._proc.memory_full_info().uss
        self.steps.append((message.strip()[:90], round(self._peak / 2**20, 1), round(uss / 2**20, 1),
                           round(pa.total_allocated_bytes() / 2**20, 1)))
        if self._trace:
            import tracemalloc

            top = tracemalloc.take_snapshot().statistics("traceback")[:4]
            self.traced.append((message.strip()[:60], round(tracemalloc.get_traced_memory()[0] / 2**20, 1),
                                [(round(s.size / 2**20, 1), " < ".join(f"{f.filename.split('site-packages/')[-1]}:"
                                                                       f"{f.lineno}" for f in s.traceback))
                                 for s in top]))
        self._peak = 0
        print(message, file=sys.stderr, flush=True)

    def top(self, k: int = 6) -> list[tuple]:
        self._stop.set()
        return sorted(self.steps, key=lambda s: -s[1])[:k]


def child(impressions: int, out: str, rounds: int, overrides: list[str], trace: bool = False) -> None:
    """One job in this process; prints one JSON line."""
    from engagesim.config import load_config
    from engagesim.pipeline import behaviour

    cfg = load_config(None, [*world(impressions), f"output_root={out}", "embed.text=false", "embed.image=false",
                             "embed.sketch=false", "train.models=['xgb']", f"train.xgb.rounds={rounds}",
                             f"train.xgb.checkpoint_every={rounds}", *overrides])
    steps = DriverSteps(trace)
    with PeakMemory() as peak:
        started = time.perf_counter()
        job = behaviour.run(cfg, f"rows{impressions}", log=steps.log)
        seconds = time.perf_counter() - started
    manifest = job.manifest
    metrics = manifest["metrics"]
    imp = metrics.get("valid", {}).get("impression_level", {})
    print(json.dumps({
        "seconds": round(seconds, 1), "stages": {k: round(v.get("seconds", 0), 1) for k, v in manifest["stages"].items()},
        "driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "driver_peak_steps_mb": steps.top(),
        # Every step in order: (the log line ending it, peak RSS in it, USS and Arrow's live bytes at its end; MB).
        "driver_steps": steps.steps,
        # With --trace-python: per step, the driver's traced Python heap (MB) and its four largest holders.
        **({"driver_python_heap": steps.traced} if trace else {}),
        "all_peak_mb": peak.peak_mb, "all_peak_pss_mb": peak.pss_mb, "largest_worker_mb": peak.worker_mb,
        "largest_worker_uss_mb": peak.worker_uss_mb,
        "train_input": imp.get("train_input"), "validation": imp.get("validation"),
        "like_rce_served": metrics.get("test", {}).get("impression_level", {}).get("models", {})
        .get("ensemble", {}).get("like", {}).get("rce")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, nargs="+", default=[2_000_000, 10_000_000, 40_000_000])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every size, e.g. --set train.stream_rows=1 (the streamed path "
                             "at any size); repeatable")
    parser.add_argument("--trace-python", action="store_true",
                        help="also trace the driver's Python allocations (tracemalloc; slower): per step, its heap "
                             "and the four lines holding most of it")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out, args.rounds, args.overrides, args.trace_python)
        return
    results = {}
    for n in sorted(args.impressions):
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run([sys.executable, __file__, "--child", str(n), "--out", out, "--rounds",
                                   str(args.rounds), *(f"--set={o}" for o in args.overrides),
                                   *(["--trace-python"] if args.trace_python else [])],
                                  capture_output=True, text=True)
        if done.returncode:
            emit(bench="rows", impressions=n, failed=done.returncode, stderr_tail=done.stderr[-2000:])
            continue
        # The child's own line: Ray may print after it (shutdown), so take the last line that is ours.
        ours = [line[line.index('{"seconds"'):] for line in done.stdout.splitlines() if '{"seconds"' in line]
        if not ours:
            emit(bench="rows", impressions=n, failed="no result line", stdout_tail=done.stdout[-2000:])
            continue
        results[n] = json.loads(ours[-1])
        emit(bench="rows", impressions=n, overrides=args.overrides, **results[n])
    if len(results) >= 2:
        small, large = sorted(results)[-2:]
        emit(bench="rows_growth", sizes=[small, large], rows_ratio=large / small,
             all_peak_ratio=round(results[large]["all_peak_mb"] / results[small]["all_peak_mb"], 3),
             all_peak_pss_ratio=round(results[large]["all_peak_pss_mb"] / results[small]["all_peak_pss_mb"], 3),
             driver_peak_max_mb=max(r["driver_peak_mb"] for r in results.values()))


if __name__ == "__main__":
    main()
