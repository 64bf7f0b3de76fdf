"""Training progress in the driver's log while ``trainer.fit()`` blocks it.

Ray Train calls a ``UserCallback`` on its controller actor after every ``ray.train.report`` (XGBoost every
``checkpoint_every`` rounds, the torch loop every ``every`` units). ``ReportRelay`` forwards rank 0's metrics
to a ``ray.util.queue.Queue``; a thread in the driver reads it and logs a line per report, at most one a
minute per fit (the last always):

    impression xgb_like: round 100/200, valid-logloss 0.4123 (41 s, about 41 s left)

Reports carry where they are (``round`` or ``unit``) and out of how many (``of``); the ETA is the elapsed
time scaled by what is left. Nothing here can fail a fit: a full or lost queue drops lines, not training.
Active only inside ``training_progress(log)`` (the behaviour job's training stages); elsewhere
``callbacks()`` is empty and trainers run as before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ray.train import UserCallback

_ACTIVE: dict[str, Any] = {}
# Between two lines of one fit (its last line always comes): a job log should show a long fit is alive, not
# every checkpoint — the demo's stderr budget is 40 lines for the whole job.
MIN_INTERVAL_S = 60.0


class ReportRelay(UserCallback):
    """On the Ray Train controller: each report's rank-0 metrics → the driver's queue, tagged with the fit."""

    def __init__(self, queue: Any, name: str):
        self.queue, self.name = queue, name

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        try:
            self.queue.put_nowait({"fit": self.name, **(metrics[0] if metrics else {})})
        except Exception:  # noqa: BLE001 - progress must never fail training
            pass


def callbacks(name: str) -> list[UserCallback]:
    """What ``distributed.trainer_settings`` adds to a trainer's ``RunConfig``: a relay inside
    ``training_progress``, nothing outside it."""
    queue = _ACTIVE.get("queue")
    return [ReportRelay(queue, name)] if queue is not None else []


def position(report: dict[str, Any]) -> tuple[str, Any, Any]:
    """(what a unit is, units done, out of how many): ``round`` for XGBoost, else ``unit`` named by
    ``unit_name``."""
    if "round" in report:
        return "round", report["round"], report.get("of")
    return report.get("unit_name", "epoch"), report.get("unit"), report.get("of")


def line(report: dict[str, Any], started: float, now: float) -> str:
    """One progress line of a report: ``fit``, where it is, its validation metrics (else its training
    ``loss``) and the time."""
    name, done, total = position(report)
    where = f"{name} {done}/{total}" if total else f"{name} {done}"
    floats = {k: v for k, v in report.items() if isinstance(v, float) and k not in ("seconds_in",)}
    shown = [k for k in floats if k.startswith("valid")][:2] or [k for k in floats if k == "loss"]
    elapsed = now - started
    timing = f"{elapsed:.0f} s"
    if report.get("final") and total and done and done < total:
        timing += ", stopped early"
    elif total and done and done < total:
        timing += f", about {elapsed * (total - done) / done:.0f} s left"
    return f"{report['fit']}: {', '.join([where, *(f'{k} {floats[k]:.4f}' for k in shown)])} ({timing})"


@contextmanager
def training_progress(log: Callable[[str], None]) -> Iterator[None]:
    """While inside, every Ray Train fit this process starts logs its reports through ``log`` (a no-op where
    this process has not started or joined Ray: fits then run in process, with nothing to relay)."""
    import queue as stdlib_queue

    import ray
    from ray.util.queue import Queue

    if not ray.is_initialized():
        yield
        return

    relay = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    stop = threading.Event()
    started: dict[str, float] = {}
    last: dict[str, float] = {}

    def pump() -> None:
        while not stop.is_set():
            try:
                report = relay.get(timeout=0.5)
            except stdlib_queue.Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue actor is gone: lines are lost, never the fit
                time.sleep(0.5)
                continue
            now = time.monotonic()
            fit = report["fit"]
            started.setdefault(fit, now - float(report.get("seconds_in", 0.0)))
            _, done, total = position(report)
            final = bool(report.get("final")) or (bool(total) and done == total)
            if final or now - last.get(fit, started[fit]) >= MIN_INTERVAL_S:
                last[fit] = now
                log(line(report, started[fit], now))

    _ACTIVE["queue"] = relay
    thread = threading.Thread(target=pump, name="training-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        _ACTIVE.pop("queue", None)
        stop.set()
        thread.join(timeout=2)
        try:
            relay.shutdown()
        except Exception:  # noqa: BLE001
            pass
