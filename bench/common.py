"""Shared helpers for benchmarks: JSON-line output and process-tree memory sampling."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import psutil


def emit(**record) -> None:
    """One benchmark result as a JSON line on stdout."""
    sys.stdout.write(json.dumps(record, default=float) + "\n")
    sys.stdout.flush()


def ray_and_driver_rss() -> int:
    """Resident memory of this driver plus every Ray worker process on the machine (bytes)."""
    total = psutil.Process(os.getpid()).memory_info().rss
    for proc in psutil.process_iter(["name", "memory_info"]):
        try:
            if proc.info["name"] and proc.info["name"].startswith("ray::") and proc.info["memory_info"]:
                total += proc.info["memory_info"].rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class PeakMemory:
    """Samples ``ray_and_driver_rss`` every 0.2 s while the block runs; ``peak_mb`` afterwards."""

    def __enter__(self) -> PeakMemory:
        self.peak = ray_and_driver_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, ray_and_driver_rss())
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)
