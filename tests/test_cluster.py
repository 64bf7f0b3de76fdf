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
from helpers import free_ports, stop_group, venv_bin, wait_port

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


class Head:
    """A Ray head started here (``ray start --head --block``) with its own ports, temp dir and token;
    stopped by its process group."""

    def __init__(self, extra: list[str] | None = None, env: dict | None = None):
        self.token = secrets.token_hex(16)
        self.tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
        names = ("gcs", "dashboard", "client", "node_manager", "object_manager", "agent_listen", "agent_grpc",
                 "runtime_env", "metrics")
        self.ports = dict(zip(names, free_ports(len(names))))
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "PATH": f"{Path(venv_bin('ray')).parent}:{os.environ['PATH']}", **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        p = self.ports
        self.cmd = [venv_bin("ray"), "start", "--head", "--block", f"--port={p['gcs']}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={p['dashboard']}", f"--ray-client-server-port={p['client']}",
                    f"--node-manager-port={p['node_manager']}", f"--object-manager-port={p['object_manager']}",
                    f"--dashboard-agent-listen-port={p['agent_listen']}",
                    f"--dashboard-agent-grpc-port={p['agent_grpc']}", f"--runtime-env-agent-port={p['runtime_env']}",
                    f"--metrics-export-port={p['metrics']}", f"--temp-dir={self.tmp}", "--include-dashboard=true",
                    *(extra or ["--num-cpus=2"])]
        self.address = f"http://127.0.0.1:{p['dashboard']}"
        self.gcs = f"127.0.0.1:{p['gcs']}"

    def __enter__(self) -> "Head":
        self.log = open(Path(self.tmp) / "head.log", "w")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_port(self.ports["dashboard"], 120, self.proc)
        return self

    def __exit__(self, *exc) -> None:
        stop_group(self.proc)
        self.log.close()


@pytest.fixture()
def token_head():
    # The head's own environment has no API keys: `serve deploy` must bring the digests in the config itself.
    with Head(env={"ENGAGESIM_API_KEYS": ""}) as head:
        yield {"address": head.address, "env": head.env, "tmp": head.tmp}


def _report(stdout: str) -> dict:
    """The driver's JSON report line (Ray may print its own lines to stdout around it)."""
    lines = [line for line in stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, stdout[-3000:]
    return json.loads(lines[-1][len("REPORT "):])


def _ray(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([venv_bin("ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_job_submission_then_serve_deploy_with_token_and_refusal_without(token_head, tmp_path):
    """The cluster path of the README on one machine: `ray job submit` runs the behaviour job on a token-protected
    head; `engagesim serve --write-config` (keys in the user's shell only) then `serve deploy` serves that run from
    the head, which answers with the key and refuses without it."""
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
    assert re.search(r"succeeded", status.stdout + status.stderr, re.I)
    manifest = json.loads((runs / "from-job" / "manifest.json").read_text())
    assert manifest["status"] == "succeeded"
    assert manifest["metrics"]["test"]["post_level"]["models"]["ensemble"]["rmse"] > 0

    # serve deploy: the digests of the user's keys travel in serve.yaml's runtime_env, never the keys.
    import requests
    from helpers import free_port, run_cli

    key, port, config = "deploy-key-" + secrets.token_hex(8), free_port(), tmp_path / "serve.yaml"
    written = run_cli("serve", "--run", str(runs / "from-job"), "--port", str(port), "--write-config", str(config),
                      env={"ENGAGESIM_API_KEYS": key})
    assert written.returncode == 0 and key not in config.read_text(), written.stderr
    deployed = subprocess.run([venv_bin("serve"), "deploy", str(config), "--address", address], env=env,
                              capture_output=True, text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    url, body = f"http://127.0.0.1:{port}", {"post": {"account": "acme", "text": "New drop today #sale",
                                                       "created_at": "2026-12-01T17:00:00Z"}}
    deadline, answer = time.time() + 240, None
    while time.time() < deadline:
        try:
            answer = requests.post(f"{url}/v1/predict", json=body, headers={"Authorization": f"Bearer {key}"},
                                   timeout=30)
            if answer.status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(2)
    assert answer is not None and answer.status_code == 200, answer and answer.text
    assert answer.json()["likes"]["expected"] >= 0
    assert requests.post(f"{url}/v1/predict", json=body, timeout=30).status_code == 401
    assert requests.post(f"{url}/v1/predict", json=body, headers={"Authorization": f"Bearer {key}x"},
                         timeout=30).status_code == 401


FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
# Fake (scaled-down) resources per instance type of cluster.yaml: the node types stay the same.
FAKE_RESOURCES = {"m5.4xlarge": {"CPU": 2}, "g5.xlarge": {"CPU": 1, "GPU": 1}}


def fake_autoscaling_config(cluster_yaml: Path, gcs: str, idle_minutes: float) -> dict:
    """cluster.yaml's node types on Ray's fake multi-node provider (nodes are local raylets)."""
    config = yaml.safe_load(cluster_yaml.read_text())
    types = {"ray.head.default": {"resources": config["available_node_types"][config["head_node_type"]]["resources"],
                                  "node_config": {}, "max_workers": 0}}
    for name, node in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue
        types[name] = {"resources": FAKE_RESOURCES[node["node_config"]["InstanceType"]], "node_config": {},
                       "min_workers": node["min_workers"], "max_workers": min(node["max_workers"], 2)}
    empty: dict = {k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                                   "setup_commands", "head_setup_commands", "worker_setup_commands",
                                   "head_start_ray_commands", "worker_start_ray_commands")}
    return {"cluster_name": "fake", "max_workers": 4, "idle_timeout_minutes": idle_minutes, "upscaling_speed": 1.0,
            # "external" loads the provider class by path (the fake provider's defaults file is not in the wheel).
            "provider": {"type": "external", "module": FAKE_PROVIDER, "gcs_address": gcs},
            "auth": {"ssh_user": config["auth"]["ssh_user"]}, "head_node_type": "ray.head.default",
            "available_node_types": types, "file_mounts": {}, "file_mounts_sync_continuously": False, **empty}


def test_autoscaler_adds_a_gpu_worker_for_a_gpu_stage_and_removes_it_when_idle(tmp_path):
    head = Head(extra=["--num-cpus=0"], env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    config = tmp_path / "autoscaling.json"
    config.write_text(json.dumps(fake_autoscaling_config(ROOT / "cluster.yaml", head.gcs, idle_minutes=0.1)))
    head.cmd.append(f"--autoscaling-config={config}")
    driver = f"""
import json, time
import ray
ray.init(address="{head.gcs}")
gpu_nodes = lambda: [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
before = len(gpu_nodes())
nodes_before = {{n["NodeID"] for n in ray.nodes() if n["Alive"]}}

# A stage that asks for a GPU, as the embedding/NN stages do when the config sets gpus_per_actor.
@ray.remote(num_gpus=1, num_cpus=1)
def embed_stage():
    return ray.get_runtime_context().get_node_id(), len(ray.get_gpu_ids())

node, gpus = ray.get(embed_stage.remote(), timeout=180)
# Informational only: with a 6 s idle timeout a slow sitting can remove the node before this line runs
# (CI saw during=0 once); the task's own GPU and its node's novelty are what prove the scale-up.
during = len(gpu_nodes())
start = time.time()
while gpu_nodes() and time.time() - start < 180:
    time.sleep(1)
print("REPORT " + json.dumps({{"before": before, "during": during, "after": len(gpu_nodes()), "node": node,
                   "gpus": gpus, "new_node": node not in nodes_before,
                   "removed_after_s": round(time.time() - start, 1)}}), flush=True)
"""
    with head:
        env = {k: v for k, v in head.env.items() if k != "RAY_FAKE_CLUSTER"}
        result = subprocess.run([venv_bin("python"), "-c", driver], env=env, capture_output=True, text=True,
                                timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    report = _report(result.stdout)
    assert report["before"] == 0 and report["after"] == 0, report  # no GPU node before, none left when idle
    assert report["new_node"] and report["gpus"] == 1, report  # the stage ran on a GPU worker the autoscaler added


MULTINODE_DRIVER = """
import json, sys, threading, time
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.cluster_utils import Cluster

from engagesim import io
from engagesim.config import load_config
from engagesim.datasets import write_streaming

out = sys.argv[1]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address)
N, BLOCKS = 60_000, 40

import os, uuid
marks = out + "_marks"
os.makedirs(marks)

def stage(batch: pa.Table) -> pa.Table:
    time.sleep(0.25)  # long enough that a node dies while blocks are in flight
    open(os.path.join(marks, uuid.uuid4().hex), "w").close()
    return batch.append_column("node", pa.array([ray.get_runtime_context().get_node_id()] * batch.num_rows))

killed_at = {}

def kill_mid_stage():
    while len(os.listdir(marks)) < 6:
        time.sleep(0.05)
    cluster.remove_node(workers[1], allow_graceful=False)
    killed_at["blocks_done"] = len(os.listdir(marks))

ds = ray.data.from_items([{"i": i} for i in range(N)], override_num_blocks=BLOCKS).map_batches(
    stage, batch_format="pyarrow", batch_size=None)
killer = threading.Thread(target=kill_mid_stage, daemon=True)
killer.start()
written = write_streaming(ds, out, "multinode_rows", load_config(None, []))
killer.join()
# The GCS marks a killed raylet dead after its health checks fail (seconds, longer on a loaded machine).
deadline = time.time() + 60
while sum(n["Alive"] for n in ray.nodes()) > 2 and time.time() < deadline:
    time.sleep(0.5)
table = io.read_table(out)
ids = table.column("i")
report = {"written": written, "rows": table.num_rows, "unique": len(pc.unique(ids)),
                  "nodes": len(pc.unique(table.column("node"))), "alive": sum(n["Alive"] for n in ray.nodes()),
                  "killed_after_blocks": killed_at.get("blocks_done"), "blocks": BLOCKS}

# The impression history plane across nodes: fit per block, combined by a key-hash shuffle, every group
# joined partition against partition (nothing broadcast). Same table as the in-process executor.
import polars as pl
sys.path.insert(0, "tests")
from helpers import frame_mismatches
from engagesim.config import SynthConfig
from engagesim.features.impression import features_in_process
from engagesim.features.post import post_row_features
from engagesim.pipeline.features import build_impression_features, build_post_features
from engagesim.synth import generate

cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
world = out + "_world"
generate(SynthConfig(users=300, posts=800, impressions=20_000, images=0, rows_per_shard=5_000, days=5, seed=3), world)
fcfg = load_config(None, ["embed.text=false", "embed.image=false", "embed.sketch=false", "features.valid_hours=24",
                          "features.broadcast_max_rows=0", "features.partitions=3", "features.blocks=6"])
users = pl.from_arrow(io.read_table(io.join(world, "users")))
posts, _, _ = build_post_features(fcfg, post_row_features(io.read_table(io.join(world, "posts"))), users)
# The Ray post plane across the nodes too; the impressions then meet its table by a hash join on post_id.
from engagesim import datasets
from engagesim.pipeline.post_plane import run_post_plane
rows = datasets.read(io.join(world, "posts"), blocks=6).map_batches(post_row_features, batch_format="pyarrow")
run_post_plane(fcfg, rows, out + "_post_rows", out + "_posts", out + "_post_state", users, None, None, print)
report["post_mismatches"] = frame_mismatches(pl.from_arrow(io.read_table(out + "_posts")), posts, ["post_id"])
info, _ = build_impression_features(fcfg, io.join(world, "interactions"), io.join(world, "users"), out + "_posts",
                                    out + "_impressions", out + "_state")
f = fcfg.features
local = pl.from_arrow(features_in_process(io.read_table(io.join(world, "interactions")), posts, users,
                                          f.valid_hours, f.window_hours, f.history_mode, f.jaccard_k, f.seed,
                                          test_share=f.test_share, leiden_max_edges=f.leiden_max_edges,
                                          community_folds=f.community_folds))
dist = pl.from_arrow(io.read_table(out + "_impressions"))
report.update({"history_rows": dist.height, "history_rounds": sorted(info["history"]["partitioned"]),
               "post_join": info["posts"],
               "history_mismatches": frame_mismatches(dist, local, ["impression_at", "user_id", "post_id"])})

# XGBoost on Ray Train across nodes: 2 workers on 3 one-CPU nodes; the node of a worker dies after the
# first checkpoint; Ray Train restarts the group and the fit resumes from that checkpoint.
import glob
import numpy as np
from ray._private import state
from engagesim.config import XGBConfig
from engagesim.models import xgb

rng = np.random.default_rng(0)
x = rng.normal(size=(40_000, 10)).astype("float32")
data = pa.table({**{f"f{i}": x[:, i] for i in range(10)},
                 "y": (x[:, 0] + rng.normal(size=40_000) > 0).astype("float32")})
placements, stop, victim = set(), threading.Event(), {}
storage = out + "_train"

def train_workers():
    return {a["Address"]["NodeID"] for a in state.actors().values()
            if "RayTrainWorker" in a.get("ActorClassName", "") and a.get("State") == "ALIVE"}

def kill_worker_node_after_checkpoint():
    head_id = cluster.head_node.node_id
    while not stop.is_set():
        nodes = train_workers()
        placements.update(nodes)
        if not victim and glob.glob(storage + "/**/checkpoint_*", recursive=True):
            target = next((n for n in cluster.list_all_nodes() if n.node_id in nodes and n.node_id != head_id), None)
            if target is not None:
                victim["node"] = target.node_id
                cluster.remove_node(target, allow_graceful=False)
        time.sleep(0.2)

watcher = threading.Thread(target=kill_worker_node_after_checkpoint, daemon=True)
watcher.start()
params = xgb.params_for("layer6", "binary:logistic", {"nthread": 1})
settings = XGBConfig(rounds=120, checkpoint_every=20, workers=2, cpus_per_worker=1)
booster = xgb.fit_ray(data, None, [f"f{i}" for i in range(10)], "y", params, settings, storage, "multinode",
                      max_failures=3)
stop.set()
watcher.join()
report.update({"train_nodes": len(placements), "train_victim": bool(victim),
               "rounds": booster.num_boosted_rounds()})
print("REPORT " + json.dumps(report), flush=True)
ray.shutdown()
cluster.shutdown()
"""


def test_multinode_stage_survives_a_killed_node_with_exact_row_counts(tmp_path):
    """Three raylets on one machine (ray.cluster_utils.Cluster, in its own process): blocks spread over the
    nodes; one node is killed mid-stage; the committed dataset has every row exactly once. The post plane and
    the impression history plane (key-hash shuffles, partition-against-partition joins) runs across the nodes and makes the
    in-process executor's table. Then XGBoost on Ray Train spreads its workers over nodes, loses one node
    after a checkpoint, and still finishes."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([venv_bin("python"), "-c", MULTINODE_DRIVER, str(tmp_path / "rows")], env=env,
                            capture_output=True, text=True, timeout=600, cwd=ROOT, start_new_session=True)
    assert result.returncode == 0, result.stderr[-4000:]
    report = _report(result.stdout)
    assert report == {**report, "written": 60_000, "rows": 60_000, "unique": 60_000, "alive": 2}, report
    assert report["nodes"] >= 2, report
    assert report["killed_after_blocks"] < report["blocks"], report  # the node died mid-stage
    # The partitioned history plane on the cluster: every row, the same table as one process makes.
    # The post plane on the cluster makes the in-process post table; impressions join it by post_id.
    assert report["post_mismatches"] == [] and report["post_join"] == "hash join on post_id", report
    assert report["history_rows"] == 20_000 and report["history_mismatches"] == [], report
    assert report["history_rounds"] == ["creator_id", "post_id", "user_id"], report
    # XGBoost: workers on more than one node; one of those nodes killed after a checkpoint; the fit finished.
    assert report["train_nodes"] >= 2 and report["train_victim"] and report["rounds"] == 120, report
