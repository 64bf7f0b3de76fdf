"""Cluster operations on one machine: cluster.yaml passes Ray's validation and is locked down; a job is
submitted with `ray job submit` to a token-protected head started here, and refused without the token."""

import json
import os
import re
import secrets
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import free_ports, stop, venv_bin, wait_port

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_yaml_passes_ray_validation_and_is_locked_down():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (ROOT / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    validate_config(prepare_config(config))  # Ray's own schema + checks; raises on any error
    nodes = config["available_node_types"]
    assert {"head", "cpu_worker", "gpu_worker"} <= set(nodes)
    assert nodes["head"]["resources"] == {"CPU": 0} and nodes[config["head_node_type"]] is nodes["head"]
    assert nodes["gpu_worker"]["node_config"]["InstanceType"].startswith(("g5", "g6", "p3", "p4"))
    assert all(n["node_config"].get("IamInstanceProfile") for n in nodes.values())  # S3 by role, not keys
    assert config["idle_timeout_minutes"] > 0
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in c for c in commands)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    rules = config["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]  # no dashboard/job/client port opened
    assert not re.search(r"aws_(access|secret)|AKIA[0-9A-Z]{12}|auth_token:\s*\S", text, re.I)


@pytest.fixture()
def token_head():
    """A Ray head started here with token auth, its own ports and temp dir; stopped by its handle."""
    token = secrets.token_hex(16)
    tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    names = ("gcs", "dashboard", "client", "node_manager", "object_manager", "agent_listen", "agent_grpc",
             "runtime_env", "metrics")
    ports = dict(zip(names, free_ports(len(names))))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{Path(venv_bin('ray')).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [venv_bin("ray"), "start", "--head", "--block", f"--port={ports['gcs']}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={ports['dashboard']}", f"--ray-client-server-port={ports['client']}",
           f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
           f"--dashboard-agent-listen-port={ports['agent_listen']}",
           f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--runtime-env-agent-port={ports['runtime_env']}",
           f"--metrics-export-port={ports['metrics']}", "--num-cpus=2", f"--temp-dir={tmp}",
           "--include-dashboard=true"]
    log = open(Path(tmp) / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(ports["dashboard"], 120, proc)
        yield {"address": f"http://127.0.0.1:{ports['dashboard']}", "env": env, "tmp": tmp}
    finally:
        stop(proc)
        log.close()


def _ray(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([venv_bin("ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_job_submission_with_token_and_refusal_without(token_head, tmp_path):
    address, env = token_head["address"], token_head["env"]
    deadline = time.time() + 90
    while _ray(["job", "list", "--address", address], env, 60).returncode != 0:
        assert time.time() < deadline, "the job API never came up"
        time.sleep(2)

    # No token (and a home without a default token file): refused.
    anonymous = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    anonymous["HOME"] = str(tmp_path)
    refused = _ray(["job", "list", "--address", address], anonymous, 60)
    assert refused.returncode != 0
    assert re.search(r"401|unauthori[sz]ed|authentication|token", refused.stdout + refused.stderr, re.I)

    runs = tmp_path / "runs"
    config = {"output_root": str(runs), "synth": {"users": 200, "posts": 600, "impressions": 8000, "images": 0,
                                                  "rows_per_shard": 4000, "days": 4},
              "embed": {"text": False, "image": False}, "features": {"valid_hours": 24},
              "train": {"models": ["xgb"], "xgb": {"rounds": 10, "checkpoint_every": 5}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    submitted = _ray(["job", "submit", "--address", address, "--submission-id", "behaviour-job", "--working-dir",
                      str(ROOT), "--runtime-env-json", json.dumps({"excludes": [".venv", "runs", ".cache", ".git"]}),
                      "--", "python", "jobs/behaviour.py", "--config", str(tmp_path / "job.yaml"), "--run-id",
                      "from-job"], env, 600)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    status = _ray(["job", "status", "--address", address, "behaviour-job"], env, 60)
    assert "SUCCEEDED" in status.stdout + status.stderr
    manifest = json.loads((runs / "from-job" / "manifest.json").read_text())
    assert manifest["status"] == "succeeded"
    assert manifest["metrics"]["evaluation"]["post_level"]["models"]["ensemble"]["rmse"] > 0
