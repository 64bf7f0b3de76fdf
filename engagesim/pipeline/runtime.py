"""Connecting to Ray: the embedded local default, or a cluster when configured."""

from __future__ import annotations

import os

from engagesim.config import RayConfig


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
    kwargs = {"include_dashboard": False, "log_to_driver": False}
    if config.num_cpus:
        kwargs["num_cpus"] = config.num_cpus
    if config.object_store_memory_mb:
        kwargs["object_store_memory"] = config.object_store_memory_mb << 20
    ray.init(**kwargs)
