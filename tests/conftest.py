"""Shared fixtures: one SeaweedFS S3 server and one local Ray cluster per test session."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import TINY_WORLD, free_ports, run_root, stop, venv_bin, wait_port

ROOT = Path(__file__).resolve().parent.parent
ADOBE = ROOT.parent / "shared" / "data" / "adobe"

# Hermetic caches: a test that leaves embed.cache_dir / content.llm.cache_dir at their defaults writes into this
# session's own folder (set before Ray starts, so its workers and every CLI subprocess inherit it), never into
# the user cache that a developer's real runs fill.
os.environ["ENGAGESIM_CACHE"] = tempfile.mkdtemp(prefix="engagesim-test-cache-")


def pytest_unconfigure(config) -> None:
    """The session's cache goes with it (it holds ~0.5 GB of tiny models and embeddings by the end of a run)."""
    shutil.rmtree(os.environ["ENGAGESIM_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def adobe_dir() -> Path:
    if not ADOBE.exists():
        raise FileNotFoundError(f"the real Adobe data is expected at {ADOBE}")
    return ADOBE


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1 with random credentials; yields its env settings."""
    data = tmp_path_factory.mktemp("seaweed")
    key, secret = "AK" + secrets.token_hex(8), secrets.token_hex(16)
    (data / "s3.json").write_text(
        json.dumps({"identities": [{"name": "test", "credentials": [{"accessKey": key, "secretKey": secret}],
                                     "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]})
    )
    names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc", "metrics")
    ports = dict(zip(names, free_ports(len(names))))
    cmd = [
        venv_bin("weed"), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
        # Every port explicit: SeaweedFS's default gRPC port is port + 10000, which may not exist.
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
        f"-s3.config={data / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-metricsPort={ports['metrics']}", "-volume.max=0", "-master.volumeSizeLimitMB=64",
    ]
    log = open(data / "weed.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(ports["s3"], 90, proc)
        env = {
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}",
            "AWS_REGION": "us-east-1",
        }
        yield env
    finally:
        stop(proc)
        log.close()


@pytest.fixture()
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket; the S3 settings are in this process's environment for the test."""
    import boto3

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    name = "engagesim-" + secrets.token_hex(4)
    client = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name="us-east-1")
    for attempt in range(30):
        try:
            client.create_bucket(Bucket=name)
            break
        except Exception:  # the filer may still be starting
            if attempt == 29:
                raise
            import time

            time.sleep(1)
    return name


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for the whole session (ray.init costs ~7 s and ~0.9 GB)."""
    import ray

    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    from engagesim.runtime import local_ray_env

    local_ray_env()
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ctx
    ray.shutdown()


@pytest.fixture(scope="session")
def behaviour_run(ray_local, tmp_path_factory):
    """One finished behaviour run on a tiny synthetic world, shared by the run-API, scoring and Serve tests."""
    from engagesim.config import load_config
    from engagesim.pipeline import behaviour

    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, [
        *run_root(root), *TINY_WORLD, "features.valid_hours=24", "embed.pca_components=4", "train.xgb.rounds=20", "train.xgb.checkpoint_every=10",
        "train.nn.epochs=2", "train.nn.layer6_preset=0"])
    lines: list[str] = []
    job = behaviour.run(cfg, "tiny", log=lines.append)
    job.log_lines = lines  # what the CLI would have printed (tests/test_run_api.py reads the progress lines)
    return job
