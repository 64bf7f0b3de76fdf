"""Soak: the Serve app under a steady mixed load for minutes — does anything leak, fail or drift?

8 clients (``--clients``) for ``--minutes`` (10 by default; not part of CI) send, in turn, single predictions,
``/v1/predict:batch`` requests and hostile ones: a wrong key, no key, a body over the 8 MiB limit sent
chunked (no Content-Length), broken JSON, a media URI naming a server file, a huge ``rows`` list. Each hostile
request must get its 4xx; nothing may get a 5xx other than a retryable 503. Every ``--every`` seconds the
scorer and gateway replicas' RSS (the Serve replica processes, found by their actor names — read, never
killed) and the single-request latency of that interval are recorded.

Prints one JSON line per interval and a summary: requests by kind and status, 5xx count, the replicas' RSS
after the first interval and at the end (the soak's bound: within 10 %), p99 of the first and last intervals.

    .venv/bin/python bench/soak.py --run runs/<run_id>          # an existing run (else a small one is trained)
"""

import argparse
import concurrent.futures as cf
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
import requests  # noqa: E402
from common import emit  # noqa: E402
from ray import serve  # noqa: E402
from serve import KEY, bodies, train  # noqa: E402

HOSTILE = ("wrong_key", "no_key", "chunked_over_limit", "broken_json", "server_file_media", "too_many_rows")


def hostile(session: requests.Session, url: str, kind: str, sample: dict) -> requests.Response:
    auth = {"Authorization": f"Bearer {KEY}"}
    if kind == "wrong_key":
        return session.post(f"{url}/v1/predict", json=sample, headers={"Authorization": "Bearer " + "x" * 24})
    if kind == "no_key":
        return session.post(f"{url}/v1/predict", json=sample)
    if kind == "chunked_over_limit":  # a generator body: sent chunked, no Content-Length to check
        chunk = b" " * (1 << 20)
        return session.post(f"{url}/v1/predict", data=(chunk for _ in range(9)),
                            headers={**auth, "Content-Type": "application/json"})
    if kind == "broken_json":
        return session.post(f"{url}/v1/predict", data=b'{"post": {', headers={**auth, "Content-Type": "application/json"})
    if kind == "server_file_media":
        body = {**sample, "post": {**sample["post"], "media": [{"kind": "photo", "uri": "../../etc/passwd"}]}}
        return session.post(f"{url}/v1/predict", json=body, headers=auth)
    return session.post(f"{url}/v1/predict:batch", json={"rows": [sample] * 100_000}, headers=auth)


def replica_rss_mb() -> dict[str, float]:
    """RSS of each Serve replica process of the app (by its actor name in the process title)."""
    out: dict[str, float] = {}
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        title = " ".join(p.info["cmdline"] or [])
        for role in ("Scorer", "Gateway"):
            if title.startswith("ray::ServeReplica:engagesim:" + role):
                out[f"{role}:{p.pid}"] = round(p.info["memory_info"].rss / 2**20, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="A finished behaviour run to serve (default: train a small one).")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--every", type=float, default=60.0, help="Seconds per reported interval.")
    parser.add_argument("--batch-rows", type=int, default=100)
    args = parser.parse_args()
    from engagesim.serve.app import build_app
    from engagesim.serve.guard import RateLimit

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    run_uri = args.run or train(tempfile.mkdtemp(prefix="bench-soak-"), "soak", 60_000)
    sample = bodies(run_uri, 500)
    port = 19000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(run_uri, keys=KEY, max_batch_rows=1000, rate=RateLimit(per_second=1e6, burst=10**6)),
              name="engagesim", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    requests.post(f"{url}/v1/predict", json=sample[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    lock, log = threading.Lock(), []  # (time, kind, status, seconds)
    deadline = time.monotonic() + args.minutes * 60

    def client(k: int) -> None:
        session, i = requests.Session(), k
        while time.monotonic() < deadline:
            body, turn = sample[i % len(sample)], i % 10
            kind = "single" if turn < 7 else "batch" if turn < 9 else HOSTILE[(i // 10) % len(HOSTILE)]
            t = time.perf_counter()
            try:
                if kind == "single":
                    r = session.post(f"{url}/v1/predict", json=body, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=60)
                elif kind == "batch":
                    rows = [sample[(i + j) % len(sample)] for j in range(args.batch_rows)]
                    r = session.post(f"{url}/v1/predict:batch", json={"rows": rows},
                                     headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
                else:
                    r = hostile(session, url, kind, body)
                status = r.status_code
            except requests.RequestException as e:  # a dropped connection counts as a failure
                status = f"error:{type(e).__name__}"
            with lock:
                log.append((time.monotonic(), kind, status, time.perf_counter() - t))
            i += args.clients

    start = time.monotonic()
    intervals = []
    with cf.ThreadPoolExecutor(args.clients) as pool:
        futures = [pool.submit(client, k) for k in range(args.clients)]
        while time.monotonic() < deadline:
            time.sleep(min(args.every, max(deadline - time.monotonic(), 0.1)))
            now = time.monotonic()
            with lock:
                window = [e for e in log if e[0] > now - args.every]
            singles = [s for _, kind, status, s in window if kind == "single" and status == 200]
            rss = replica_rss_mb()
            intervals.append({"at_s": round(now - start), "requests": len(window),
                              "single_p50_ms": round(1000 * float(np.percentile(singles, 50)), 1) if singles else None,
                              "single_p99_ms": round(1000 * float(np.percentile(singles, 99)), 1) if singles else None,
                              "replica_rss_mb": rss, "replica_rss_total_mb": round(sum(rss.values()), 1)})
            emit(bench="soak_interval", **intervals[-1])
        for f in futures:
            f.result()
    by: dict[str, dict[str, int]] = {}
    for _, kind, status, _ in log:
        by.setdefault(kind, {}).setdefault(str(status), 0)
        by[kind][str(status)] += 1
    five = sum(n for kind in by.values() for s, n in kind.items() if s.startswith("5") and s != "503")
    unexpected_hostile = {k: v for k, v in by.items() if k in HOSTILE and any(not s.startswith("4") for s in v)}
    first, last = intervals[0], intervals[-1]
    emit(bench="soak", minutes=args.minutes, clients=args.clients, requests=len(log), by_kind_status=by,
         server_errors_5xx=five, retryable_503=sum(v.get("503", 0) for v in by.values()),
         hostile_not_4xx=unexpected_hostile, errors=sum(n for v in by.values() for s, n in v.items()
                                                         if s.startswith("error")),
         rss_first_mb=first["replica_rss_total_mb"], rss_end_mb=last["replica_rss_total_mb"],
         rss_growth=round(last["replica_rss_total_mb"] / max(first["replica_rss_total_mb"], 1), 3),
         p99_first_ms=first["single_p99_ms"], p99_last_ms=last["single_p99_ms"])
    serve.shutdown()
    ray.shutdown()
    print(json.dumps({"run": run_uri}), file=sys.stderr)


if __name__ == "__main__":
    main()
