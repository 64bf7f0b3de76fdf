"""Connecting to Ray: the embedded local default, or a cluster when configured. The bottom layer every
stage (synth, features, training, scoring, the CLI) starts Ray through."""

from __future__ import annotations

import logging
import os

from engagesim.config import RayConfig

# Ray Train's controller polls its workers every 2 s by default, so every fit ends up to 2 s after its
# workers finished (measured: XGBoost on 1M rows, 23.2 s → 21.2 s with 0.25 s). A pipeline run makes
# a dozen fits. Polling a local worker group more often costs the controller next to nothing; a user's
# own setting (or a cluster's) wins.
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def release_freed_memory() -> None:
    """Hand the memory a finished stage freed back to the OS: Python's cycles, Arrow's pool (jemalloc keeps
    freed pages for reuse) and glibc's arenas (numpy's buffers). A job's driver runs every stage in one
    process, and what one stage freed but its allocator kept was still counted against the next stage's peak
    (bench/rows.py's driver steps: the USS a stage ended at stayed for the stages after it)."""
    import ctypes
    import gc

    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def local_ray_env() -> None:
    """Defaults for an embedded Ray, set before it starts (its processes inherit the environment)."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)


def ensure_ray(config: RayConfig | None = None) -> None:
    """Start (or join) Ray once per process.

    Inside `ray job submit` the job joins its cluster (address "auto" or
    RAY_ADDRESS). Otherwise an embedded local Ray starts with token auth left
    at Ray's default (on). A process that already called ``ray.init`` is
    left alone, which is how tests share one cluster.
    """
    import ray

    if ray.is_initialized():
        return
    config = config or RayConfig()
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    local_ray_env()
    kwargs: dict = {"include_dashboard": config.include_dashboard, "log_to_driver": False}
    if _QUIET["on"]:
        kwargs["logging_level"] = logging.ERROR  # the token-auth notice and "Started a local Ray instance"
    if config.num_cpus:
        kwargs["num_cpus"] = config.num_cpus
    if config.object_store_memory_mb:
        kwargs["object_store_memory"] = config.object_store_memory_mb << 20
    context = ray.init(**kwargs)
    if _QUIET["on"]:
        _quiet_loggers()
    if config.include_dashboard and getattr(context, "dashboard_url", None):
        import sys

        print(f"Ray dashboard: http://{context.dashboard_url}", file=sys.stderr, flush=True)


# The CLI's default (``--verbose`` turns it off): a pipeline run printed 225 lines of Ray Data progress
# dumps out of 244 on stderr, because Ray (re)configures its loggers in ``ray.init`` and when ray.data is
# first imported — levels set before either are lost. So they are set again right after ``ray.init``.
_QUIET = {"on": False}


def _quiet_loggers() -> None:
    import ray.data  # noqa: F401  (configures its loggers on import: after it, not before)

    # Ray Data's warnings too: make demo's evaluation printed "The Ray cluster currently does not have any
    # available CPUs. The Dataset job will hang unless …" while its scoring actors held the CPUs it then used.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    logging.getLogger("ray").setLevel(logging.WARNING)


def quiet_ray(verbose: bool | None = None) -> None:
    """Keep Ray's and Ray Data's own logging out of the terminal (engagesim's stage lines stay), unless
    ``verbose`` (default: the CLI's ``--verbose``) — now and for a Ray started later by ``ensure_ray``."""
    if verbose is not None:
        _QUIET["verbose"] = verbose
    if _QUIET.get("verbose"):
        return
    _QUIET["on"] = True
    logging.getLogger("ray").setLevel(logging.WARNING)
