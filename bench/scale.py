"""Scaling: the impression feature stage and XGBoost training on 1, 2 and 3 simulated nodes.

Each size is a ``ray.cluster_utils.Cluster`` of N raylets with one CPU each, on
this machine. Be honest about what that means here: the nodes share the same
2 physical cores, so N=3 oversubscribes them — the figures show Ray's
distribution overhead and placement, not a speed-up a real cluster would give.
The baseline (ratio 1.0) is the 1-node run of the same stage. Prints JSON lines
and writes a table + plot to bench/results/scale.{md,png}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
import ray  # noqa: E402
from common import emit  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from engagesim import io  # noqa: E402
from engagesim.config import SynthConfig, load_config  # noqa: E402
from engagesim.features.post import post_row_features  # noqa: E402
from engagesim.models import xgb  # noqa: E402
from engagesim.models.data import feature_columns  # noqa: E402
from engagesim.pipeline.features import build_impression_features, build_post_features  # noqa: E402
from engagesim.synth import generate  # noqa: E402


def start(nodes: int) -> Cluster:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impressions", type=int, default=400_000)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-scale-")
    cfg = load_config(None, ["features.blocks=12"])
    rows = []
    world = f"{tmp}/world"
    for nodes in (1, 2, 3):
        cluster = start(nodes)
        try:
            if nodes == 1:
                generate(SynthConfig(users=5000, posts=20000, impressions=args.impressions, images=0,
                                     rows_per_shard=50_000, days=8), world)
                post_table, _, _ = build_post_features(cfg, post_row_features(io.read_table(io.join(world, "posts"))),
                                                       pl.from_arrow(io.read_table(io.join(world, "users"))))
            t = time.perf_counter()
            build_impression_features(cfg, io.join(world, "interactions"), io.join(world, "users"), post_table,
                                      f"{tmp}/features{nodes}", f"{tmp}/state{nodes}")
            feature_rate = args.impressions / (time.perf_counter() - t)
            table = io.read_table(f"{tmp}/features{nodes}")
            features = feature_columns(table.schema)
            params = xgb.params_for("layer6", "binary:logistic", {"nthread": 1})
            t = time.perf_counter()
            xgb.fit_ray(table, None, features, "y_like", params, args.rounds, f"{tmp}/ray{nodes}", f"scale{nodes}",
                        workers=nodes, checkpoint_every=args.rounds, early_stopping=None, cpus_per_worker=1)
            xgb_seconds = time.perf_counter() - t
        finally:
            ray.shutdown()
            cluster.shutdown()
        rows.append({"nodes": nodes, "feature_rows_per_s": round(feature_rate), "xgb_seconds": round(xgb_seconds, 1)})
        base = rows[0]
        emit(bench="scale", **rows[-1], feature_ratio=round(feature_rate / base["feature_rows_per_s"], 3),
             xgb_speedup=round(base["xgb_seconds"] / xgb_seconds, 3), physical_cores=2)

    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    lines = ["| nodes (1 CPU each, 2 physical cores) | feature rows/s | XGBoost seconds |", "|---|---|---|"]
    lines += [f"| {r['nodes']} | {r['feature_rows_per_s']:,} | {r['xgb_seconds']} |" for r in rows]
    (out / "scale.md").write_text("\n".join(lines) + "\n")
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot([r["nodes"] for r in rows], [r["feature_rows_per_s"] for r in rows], "o-")
    a.set(xlabel="simulated nodes", ylabel="rows/s", title="Impression features")
    b.plot([r["nodes"] for r in rows], [r["xgb_seconds"] for r in rows], "o-", color="#228833")
    b.set(xlabel="simulated nodes", ylabel="seconds", title=f"XGBoost, {args.rounds} rounds")
    fig.suptitle("Simulated nodes on one 2-core machine (shared cores)")
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=90)


if __name__ == "__main__":
    main()
