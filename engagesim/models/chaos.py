"""Fault injection for the chaos tests: callbacks a test passes into a Ray Train fit; production passes none.

Each kills its worker process once (a marker file remembers across the restart) and records, in
``<marker>.resumed``, where the restarted worker picked up — so a test can assert that Ray Train really
resumed from a checkpoint rather than from scratch.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import xgboost as xgb

from engagesim.models.distributed import LoopCallback


def _die_once(marker: str, done: int, rank: int, delay: float) -> None:
    if rank == 0 and not Path(marker).exists():
        Path(marker).write_text(str(done))
        time.sleep(delay)  # an earlier checkpoint's report reaches the controller, as in a real late crash
        os._exit(1)


def _rank() -> int:
    import ray.train

    return ray.train.get_context().get_world_rank()


class CrashOnce(xgb.callback.TrainingCallback, LoopCallback):
    """Kill rank 0 once when ``at`` rounds (XGBoost) or units (the torch loop) are done; in a multi-output
    XGBoost run, of the booster after the first ``skip_fits``."""

    def __init__(self, at: int, marker: str, delay: float = 0.0, skip_fits: int = 0):
        self.at, self.marker, self.delay, self.skip_fits = at, marker, delay, skip_fits
        self.fits = 0

    def before_training(self, model: xgb.Booster) -> xgb.Booster:
        self.fits += 1
        return model

    def on_resume(self, done: int) -> None:
        Path(self.marker + ".resumed").write_text(str(done))

    # XGBoost
    def after_iteration(self, model: xgb.Booster, epoch: int, evals_log: dict) -> bool:
        if self.fits > self.skip_fits and model.num_boosted_rounds() >= self.at:
            _die_once(self.marker, model.num_boosted_rounds(), _rank(), self.delay)
        return False

    # the shared torch loop (distributed.fit_on_ray) and the LoRA loop
    def after_unit(self, done: int) -> None:
        if done >= self.at:
            _die_once(self.marker, done, _rank(), self.delay)
