"""RecSys log ingest throughput: Ray (one streaming task per file) vs single-process parses.

Writes N lines in the RecSys 2021 format split over several files, then times
- ``ingest_recsys`` on Ray (validation, wordpiece decoding, dedupe, Parquet);
- the same per-line parser in one process (parse + decode + tables, no Ray);
- a bare pyarrow CSV parse of the same files (no validation, no decoding: a floor).
Prints JSON lines with lines/s, ratios, and the Ray run's peak memory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pyarrow.csv as pcsv  # noqa: E402
import ray  # noqa: E402
from common import PeakMemory, emit  # noqa: E402

from engagesim.config import load_config  # noqa: E402
from engagesim.loaders import recsys  # noqa: E402
from engagesim.loaders.recsys_ingest import ingest_recsys  # noqa: E402


def write_logs(directory: Path, lines: int, files: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    per = lines // files
    for k in range(files):
        path = directory / f"part-{k}.tsv"
        with open(path, "w") as f:
            for i in range(k * per, (k + 1) * per):
                tokens = "\t".join(map(str, [101, *rng.integers(1000, 29000, rng.integers(5, 30)), 102]))
                like = str(1612500000 + 60) if rng.random() < 0.4 else ""
                f.write("\x01".join([tokens, "", f"t{i % (lines // 20)}", "Photo" if i % 3 == 0 else "", "", "",
                                     "TopLevel", "L1", "1612500000", f"c{i % 5000}", "100", "10", "false",
                                     "1400000000", f"u{i % 50000}", "5", "50", "false", "1500000000", "false",
                                     "", "", "", like]) + "\n")
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=4)
    args = parser.parse_args()
    cfg = load_config()
    with tempfile.TemporaryDirectory() as tmp:
        # Ray first: the driver's peak memory is then not inflated by the in-process baselines.
        paths = write_logs(Path(tmp), args.lines, args.files)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        with PeakMemory() as mem:
            start = time.perf_counter()
            summary = ingest_recsys(paths, f"{tmp}/out", cfg)
            on_ray = args.lines / (time.perf_counter() - start)
        start = time.perf_counter()
        for p in paths:
            pcsv.read_csv(p, read_options=pcsv.ReadOptions(autogenerate_column_names=True),
                          parse_options=pcsv.ParseOptions(delimiter="\x01", quote_char=False))
        floor = args.lines / (time.perf_counter() - start)
        decode = recsys.make_decoder(cfg.ingest.tokenizer)
        start = time.perf_counter()
        for p in paths:  # the same chunk parser, one process, no Ray
            with open(p) as f:
                chunk = []
                for line in f:
                    chunk.append(line)
                    if len(chunk) == 100_000:
                        recsys.parse_chunk(chunk, decode)
                        chunk = []
                if chunk:
                    recsys.parse_chunk(chunk, decode)
        single = args.lines / (time.perf_counter() - start)
        assert summary["read"] == args.lines and summary["rejected"] == 0
        emit(bench="ingest_recsys", lines=args.lines, files=args.files, ray_lines_per_s=round(on_ray),
             single_process_lines_per_s=round(single), ratio=round(on_ray / single, 3),
             pyarrow_csv_floor_lines_per_s=round(floor), ratio_to_pyarrow=round(on_ray / floor, 3),
             peak_rss_mb=mem.peak_mb)
        ray.shutdown()


if __name__ == "__main__":
    main()
