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


def _pss_uss(proc: psutil.Process) -> tuple[int, int]:
    """(PSS, USS). PSS: shared pages (Ray's object store, mapped by every reader) divided among the processes
    that map them, so the sum over processes counts each page once. USS: the pages only this process holds —
    a worker's own memory, without the object-store pages it has read. RSS for both where unreadable."""
    try:
        full = proc.memory_full_info()
        return full.pss, full.uss
    except (psutil.AccessDenied, AttributeError):
        rss = proc.memory_info().rss
        return rss, rss


def process_rss() -> tuple[int, int, int, int, int]:
    """(driver + every Ray worker process of its cluster, the driver alone, the largest worker, the same
    total as PSS, the largest worker's USS), in bytes. The RSS total counts an object-store page once per
    process that maps it.

    Workers are the ``ray::`` processes descended from this driver (the local Ray it started: raylet →
    workers), so another job's or a test run's Ray on the same machine does not count; where it joined a
    cluster started elsewhere (no such descendants), every ``ray::`` process on the machine."""
    me = psutil.Process(os.getpid())
    driver = me.memory_info().rss
    total, largest, pss, largest_uss = driver, 0, _pss_uss(me)[0], 0
    try:
        ours = [p for p in me.children(recursive=True) if p.name().startswith("ray::")]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        ours = []
    for proc in ours or psutil.process_iter():
        try:
            name, info = proc.name(), proc.memory_info()
            if name.startswith("ray::"):
                total += info.rss
                largest = max(largest, info.rss)
                proc_pss, proc_uss = _pss_uss(proc)
                pss += proc_pss
                largest_uss = max(largest_uss, proc_uss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total, driver, largest, pss, largest_uss


def ray_and_driver_rss() -> int:
    """Resident memory of this driver plus every Ray worker process of its cluster (bytes)."""
    return process_rss()[0]


class PeakMemory:
    """Samples ``process_rss`` every 0.2 s while the block runs; ``peak_mb`` (all processes' RSS), ``pss_mb``
    (their PSS), ``driver_mb`` and ``worker_mb`` (the largest single Ray worker) afterwards."""

    def __enter__(self) -> PeakMemory:
        self.peaks = list(process_rss())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peaks = [max(a, b) for a, b in zip(self.peaks, process_rss())]
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return self.peaks[0]

    @property
    def peak_mb(self) -> float:
        return round(self.peaks[0] / 2**20, 1)

    @property
    def driver_mb(self) -> float:
        return round(self.peaks[1] / 2**20, 1)

    @property
    def pss_mb(self) -> float:
        """All processes' peak proportional set size (object-store pages counted once)."""
        return round(self.peaks[3] / 2**20, 1)

    @property
    def worker_mb(self) -> float:
        return round(self.peaks[2] / 2**20, 1)

    @property
    def worker_uss_mb(self) -> float:
        """The largest worker's own memory (USS), without the object-store pages it mapped."""
        return round(self.peaks[4] / 2**20, 1)
