"""File ingest throughput (CSV posts): `engagesim ingest` vs a bare pyarrow CSV read of the same file.

The ingest does what the floor does not: every cell checked exactly (ids as text, ints to int64 without a
float round trip, dates to UTC microseconds with the epoch unit read from the magnitude), media parsed,
rejects written with their raw rows, and an atomic commit. Prints one JSON line per size.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow.csv as pcsv  # noqa: E402
from common import PeakMemory, emit  # noqa: E402

from engagesim.config import load_config  # noqa: E402
from engagesim.loaders.ingest import ingest  # noqa: E402


def write_posts(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["post_id", "author_id", "username", "created_at", "likes", "text", "media"])
        for i in range(rows):
            media = f'[{{"kind": "photo", "uri": "https://img.example/{i}.jpg"}}]' if i % 3 == 0 else ""
            out.writerow([f"p{i}", f"a{i % 5000}", f"u{i % 5000}", f"2024-0{1 + i % 9}-1{i % 9}T1{i % 9}:00:00Z",
                          rng.randint(0, 10**6), "some text of a post " * 3, media])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000])
    args = parser.parse_args()
    cfg = load_config()
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "posts.csv"
            write_posts(src, rows)
            with PeakMemory() as mem:
                start = time.perf_counter()
                summary = ingest([str(src)], "csv", f"{tmp}/out", cfg)
                seconds = time.perf_counter() - start
            start = time.perf_counter()
            pcsv.read_csv(src)
            floor = time.perf_counter() - start
            assert summary.read == rows and summary.rejected == 0
            emit(bench="ingest_files", rows=rows, rows_per_s=round(rows / seconds),
                 pyarrow_csv_floor_rows_per_s=round(rows / floor), ratio_to_pyarrow=round(floor / seconds, 4),
                 peak_rss_mb=mem.peak_mb)


if __name__ == "__main__":
    main()
