"""Serving: HTTP latency/throughput of the Ray Serve app vs the same ensemble called in-process,
the batch endpoint's rows/s, and ``engagesim score`` rows/s per core vs one process.

No ``from __future__ import annotations`` in this file: FastAPI must see the echo routes' ``Request`` itself,
not the string "Request" (it then took ``request`` for a query parameter and answered 422).

Trains a small run first (synthetic world, no text transformer — the goals are stated for
the ensemble without it), then measures on 127.0.0.1. Prints JSON lines.
"""

import argparse
import concurrent.futures as cf
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import requests  # noqa: E402
from common import emit  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from ray import serve  # noqa: E402

from engagesim import io  # noqa: E402
from engagesim.config import load_config  # noqa: E402
from engagesim.pipeline import behaviour  # noqa: E402
from engagesim.serve.api import PredictRequest  # noqa: E402

KEY = "bench-key-" + "b" * 16  # keys under 16 characters are refused


def bodies(run_uri: str, n: int) -> list[dict]:
    posts = pl.from_arrow(io.read_table(io.join(run_uri, "data", "posts"))).tail(n)
    users = pl.from_arrow(io.read_table(io.join(run_uri, "data", "users")))["user_id"].to_list()
    out = []
    for i, r in enumerate(posts.to_dicts()):
        out.append({"post": {"post_id": r["post_id"], "account": r["author_id"], "text": r["text"],
                             "created_at": r["created_at"].isoformat()},  # no media: the service fetches none
                    "viewer": {"user_id": users[i % len(users)]}})
    return out


def percentile_ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 2)


def http_load(url: str, body_list: list[dict], clients: int, requests_per_client: int) -> dict:
    def worker(k: int) -> list[float]:
        session = requests.Session()
        times = []
        for j in range(requests_per_client):
            body = body_list[(k * requests_per_client + j) % len(body_list)]
            t = time.perf_counter()
            r = session.post(f"{url}/v1/predict", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            times.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
        return times

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        latencies = [t for ts in pool.map(worker, range(clients)) for t in ts]
    wall = time.perf_counter() - start
    return {"p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
            "requests_per_s": round(len(latencies) / wall, 1)}


hop_api, one_api = FastAPI(), FastAPI()


def _answer(body: dict) -> dict:
    return {"post_id": body["post"].get("post_id"), "likes": {"expected": 0.0}}


@serve.deployment(ray_actor_options={"num_cpus": 1})
class EchoScorer:
    async def predict_one(self, body: dict) -> dict:
        return _answer(body)


@serve.deployment(num_replicas=1)
@serve.ingress(hop_api)
class EchoGateway:
    def __init__(self, scorer):
        self.scorer = scorer

    @hop_api.post("/v1/predict")
    async def predict(self, request: Request) -> dict:
        return await self.scorer.predict_one.remote(await request.json())


@serve.deployment(num_replicas=1)
@serve.ingress(one_api)
class EchoOne:
    @one_api.post("/v1/predict")
    async def predict(self, request: Request) -> dict:
        return _answer(await request.json())


def echo_floor(port: int, sample: list[dict], requests_per_client: int) -> dict:
    """Ray Serve's own floor on this machine, in the same run: trivial apps that parse the same JSON body and
    answer at once, (a) in engagesim's topology (FastAPI gateway → scorer deployment handle) and (b) as one
    deployment (no handle hop). What engagesim adds is its p50 minus (a)'s."""
    url = f"http://127.0.0.1:{port}"
    floors = {}
    for name, application in (("gateway_scorer", EchoGateway.bind(EchoScorer.bind())), ("one_deployment", EchoOne.bind())):
        serve.run(application, name="echo", route_prefix="/")
        http_load(url, sample, 1, 20)  # warm-up
        floors[name] = {clients: http_load(url, sample, clients, max(requests_per_client // clients, 5))
                        for clients in (1, 8)}
        serve.delete("echo")
    return floors


def train(tmp: str, name: str, impressions: int, scale: int = 1) -> str:
    """A run on a synthetic world ``scale`` × the base one (users, posts and impressions alike)."""
    cfg = load_config(None, [f"output_root={tmp}", f"embed.cache_dir={tmp}/cache", "embed.text=false",
                             f"synth.users={1000 * scale}", f"synth.posts={4000 * scale}",
                             f"synth.impressions={impressions * scale}", "synth.images=20", "synth.days=6",
                             "features.valid_hours=24", "train.xgb.rounds=100", "train.nn.epochs=2",
                             "train.models=[xgb,nn,stacked_mlp]"])
    return behaviour.run(cfg, name, log=lambda _: None).uri


def load(run_uri: str, n: int) -> dict:
    """The predictor a Serve replica holds, loaded here: its load time and memory, and n requests for it."""
    import psutil

    from engagesim.serve.predictor import RequestPredictor

    rss, started = psutil.Process().memory_info().rss, time.perf_counter()
    predictor = RequestPredictor(run_uri)
    parsed = [PredictRequest.model_validate(b) for b in bodies(run_uri, n + 20)]
    predictor.predict(parsed[:1])  # the lazily loaded state and models, and the first lookup's index build
    return {"predictor": predictor, "requests": parsed, "load_s": round(time.perf_counter() - started, 2),
            "state_rss_mb": round((psutil.Process().memory_info().rss - rss) / 2**20, 1)}


def single_latencies(cases: dict[str, dict], n: int) -> dict[str, list[float]]:
    """One request's latency (post + viewer) for each case, the cases taking turns request by request, so
    that a drift of the machine lands on all of them alike. A case may carry ``index: False`` (every
    lookup a hash join: the baseline of features/lookup.py) or ``arrays: False`` (scored through feature
    tables, as before the numpy-column path: its baseline)."""
    from engagesim.features import lookup

    kept = lookup.INDEX_MAX_KEYS
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(n + 20):
        for name, case in cases.items():
            lookup.INDEX_MAX_KEYS = kept if case.get("index", True) else -1
            run = case["predictor"].run
            if not case.get("arrays", True):
                _through_tables(run)
            t = time.perf_counter()
            case["predictor"].predict([case["requests"][i]])
            if i >= 20:  # the first 20: warm-up
                times[name].append(time.perf_counter() - t)
            for method in ("score_impressions", "score_post_features"):
                run.__dict__.pop(method, None)  # back to the class's (numpy-column) path
    lookup.INDEX_MAX_KEYS = kept
    return times


def _through_tables(run) -> None:
    """Make this loaded run score through feature tables (Arrow), the path before numpy columns (the baseline)."""
    cls = type(run)
    run.score_impressions = lambda impressions, posts=None, featurised_posts=None, members="all": (
        run.score_impression_features(run.impression_features(impressions, posts, featurised_posts), members))
    run.score_post_features = lambda table, members="all": cls.score_post_features(run, _arrow(table), members)


def _arrow(posts) -> pa.Table:
    """Post features as the Arrow table the baseline scores (``FeaturisedPosts``: its frame, made for it)."""
    from engagesim.runs import FeaturisedPosts

    posts = posts.frame if isinstance(posts, FeaturisedPosts) else posts
    return posts.to_arrow() if isinstance(posts, pl.DataFrame) else posts


def in_process_rows_per_s(case: dict, rows: int) -> float:
    requests_ = (case["requests"] * (rows // len(case["requests"]) + 1))[:rows]
    t = time.perf_counter()
    case["predictor"].predict(requests_)
    return round(rows / (time.perf_counter() - t), 1)


def state_rows(run_uri: str) -> dict:
    from engagesim.features.state import ImpressionState

    state = ImpressionState.load(io.join(run_uri, "features", "state", "impressions"))
    return {"users": state.users.height, "posts": state.posts.height,
            "pairs": state.apply_tables["pair"].height if "pair" in state.apply_tables else None}


def score_input(run_uri: str, kind: str, rows: int) -> pl.DataFrame:
    """``rows`` posts or impressions from the run's own data: copies with fresh ids (the contract rejects
    duplicate post ids) or impression times a second apart per copy (the same viewers and known posts)."""
    name = "posts" if kind == "posts" else "interactions"
    base = pl.from_arrow(io.read_table(io.join(run_uri, "data", name)))
    copies = range(-(-rows // base.height))
    if kind == "posts":
        return pl.concat([base.with_columns(pl.col("post_id") + f"-c{k}") for k in copies]).head(rows)
    return pl.concat([base.with_columns(pl.col("impression_at") + dt.timedelta(seconds=k)) for k in copies]).head(rows)


def score_sizes(run_uri: str, tmp: str, sizes: list[int]) -> None:
    """``engagesim score`` (one actor) on posts (every member, then the served ones) and on impressions (served),
    at each size beside one in-process call on the same table; then the marginal rate between the smallest
    and largest size, which separates the per-row cost from the fixed one (the actor's start, the run's load)."""
    from engagesim.pipeline.score import score
    from engagesim.runs import load_run

    loaded = load_run(run_uri)
    actors = max(1, (os.cpu_count() or 2) - 1)
    seconds: dict[tuple[str, str], dict[int, float]] = {}
    for kind, member_sets in (("posts", ("all", "served")), ("interactions", ("served",))):
        for rows in sizes:
            table = score_input(run_uri, kind, rows).to_arrow()
            uri = f"{tmp}/score_input_{kind}_{rows}"
            writer = io.DatasetWriter(uri, kind)
            writer.write(table)
            writer.commit()
            for members in member_sets:
                t = time.perf_counter()
                loaded.predict(table, members=members)
                base = table.num_rows / (time.perf_counter() - t)
                result = score(run_uri, uri, f"{tmp}/scores-{kind}-{members}-{rows}", actors=actors, members=members)
                seconds.setdefault((kind, members), {})[rows] = result["seconds"]
                emit(bench="score_offline", kind=kind, members=members, rows=result["read"], actors=actors,
                     rows_per_s=result["rows_per_s"], rows_per_s_per_core=round(result["rows_per_s"] / actors, 1),
                     in_process_rows_per_s=round(base, 1), ratio=round(result["rows_per_s"] / base, 3))
    for (kind, members), by_rows in seconds.items():
        if len(by_rows) > 1:
            (small, s0), (large, s1) = min(by_rows.items()), max(by_rows.items())
            # Sizes too close for the noise (the larger one no slower) give no marginal rate, not a huge one.
            marginal = (large - small) / (s1 - s0) if s1 > s0 else None
            emit(bench="score_offline_marginal", kind=kind, members=members, rows=[small, large], seconds=[s0, s1],
                 marginal_rows_per_s_per_core=marginal and round(marginal / actors, 1),
                 fixed_s=marginal and round(s0 - small / marginal, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impressions", type=int, default=60_000)
    parser.add_argument("--requests", type=int, default=200, help="Requests per client count.")
    parser.add_argument("--batch-rows", type=int, default=1000)
    parser.add_argument("--score-rows", type=int, nargs="+", default=[100_000, 400_000],
                        help="Posts (and impressions) scored offline, at each size: the marginal rate between the "
                             "smallest and the largest separates the per-row cost from the fixed one (the actor's "
                             "start, the run's load).")
    parser.add_argument("--snapshot-scale", type=int, default=10,
                        help="Also time one request against a world this many times larger (0: skip): lookups "
                             "that scan would grow with it.")
    parser.add_argument("--runs", nargs=2, metavar=("BASE", "LARGE"),
                        help="Reuse the two runs an earlier call trained (printed on stderr) instead of training.")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    run_uri = args.runs[0] if args.runs else train(tmp, "bench", args.impressions)
    print(f"base run: {run_uri}", file=sys.stderr)
    sample = bodies(run_uri, 2000)
    cases = {"base": load(run_uri, args.requests)}
    cases["base_tables"] = {**cases["base"], "arrays": False}  # same run and requests, scored through tables
    if args.snapshot_scale > 1:
        large_uri = args.runs[1] if args.runs else train(tmp, "bench-large", args.impressions, args.snapshot_scale)
        print(f"large run: {large_uri}", file=sys.stderr)
        cases["large"] = load(large_uri, args.requests)
        cases["large_join"] = {**cases["large"], "index": False}
    times = single_latencies(cases, args.requests)
    single, inproc_batch = times["base"], in_process_rows_per_s(cases["base"], args.batch_rows)
    base = cases["base"]
    emit(bench="serve_in_process", p50_ms=percentile_ms(single, 50), p99_ms=percentile_ms(single, 99),
         batch_rows_per_s=inproc_batch, load_s=base["load_s"], state_rss_mb=base["state_rss_mb"], **state_rows(run_uri))
    tables = times["base_tables"]
    emit(bench="serve_in_process_numpy_columns", p50_ms=percentile_ms(single, 50), p99_ms=percentile_ms(single, 99),
         tables_p50_ms=percentile_ms(tables, 50), tables_p99_ms=percentile_ms(tables, 99),
         ratio_p50_vs_tables=round(percentile_ms(single, 50) / percentile_ms(tables, 50), 3))
    if "large" in cases:
        large, joined = times["large"], times["large_join"]
        emit(bench="serve_in_process_large_snapshot", scale=args.snapshot_scale, p50_ms=percentile_ms(large, 50),
             p99_ms=percentile_ms(large, 99), load_s=cases["large"]["load_s"],
             state_rss_mb=cases["large"]["state_rss_mb"], **state_rows(large_uri),
             p50_ratio_vs_base=round(percentile_ms(large, 50) / percentile_ms(single, 50), 3),
             join_p50_ms=percentile_ms(joined, 50), join_p99_ms=percentile_ms(joined, 99),
             ratio_p50_vs_join=round(percentile_ms(large, 50) / percentile_ms(joined, 50), 3))

    from engagesim.serve.app import build_app
    from engagesim.serve.guard import RateLimit

    port = 18000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    floors = echo_floor(port, sample, args.requests)
    for topology, by_clients in floors.items():
        for clients, result in by_clients.items():
            emit(bench="serve_echo_floor", topology=topology, clients=clients, **result)
    # No per-key rate limit here: the benchmark measures the service, not the limiter. Both topologies, each
    # beside the echo floor of its own shape: the measurement that chose the default (engagesim/serve/app.py).
    url = f"http://127.0.0.1:{port}"
    for topology, floor_name in (("one", "one_deployment"), ("two", "gateway_scorer")):
        serve.run(build_app(run_uri, keys=KEY, max_batch_rows=args.batch_rows, topology=topology,
                            rate=RateLimit(per_second=1e6, burst=10**6)), name="engagesim", route_prefix="/")
        http_load(url, sample, 1, 20)  # warm-up
        for clients in (1, 8, 32):
            result = http_load(url, sample, clients, max(args.requests // clients, 5))
            floor = floors[floor_name].get(clients)
            emit(bench="serve_http_single", topology=topology, clients=clients, **result,
                 ratio_p50_vs_in_process=round(result["p50_ms"] / percentile_ms(single, 50), 2),
                 **({"floor_p50_ms": floor["p50_ms"], "over_floor_p50_ms": round(result["p50_ms"] - floor["p50_ms"], 2),
                     "floor_requests_per_s": floor["requests_per_s"]} if floor else {}))
        rows = sample[:args.batch_rows]
        times = []
        for _ in range(5):
            t = time.perf_counter()
            r = requests.post(f"{url}/v1/predict:batch", json={"rows": rows},
                              headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
            times.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
        batch_rate = args.batch_rows / float(np.median(times))
        emit(bench="serve_http_batch", topology=topology, rows=args.batch_rows, rows_per_s=round(batch_rate, 1),
             in_process_rows_per_s=round(inproc_batch, 1), ratio=round(batch_rate / inproc_batch, 3))
        serve.delete("engagesim")
    serve.shutdown()

    # Offline scoring: Ray Data actors vs one in-process call over the same rows.
    score_sizes(run_uri, tmp, sorted(args.score_rows))
    ray.shutdown()


if __name__ == "__main__":
    main()
