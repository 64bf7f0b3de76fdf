"""The Ray Serve application: a FastAPI gateway (HTTP, API keys, validation, error mapping, the page) and the
scorer (the run's feature state, encoders and models; ``QueueBatcher`` groups concurrent single requests into
one model call), in one of two topologies:

- ``one`` (default): one autoscaled deployment, named ``Scorer``, whose replicas hold both. Chosen by
  measurement (bench/serve.py, same run, README): 1 client p50 28.5 vs 30.3 ms, 32 clients 151 vs 117 req/s,
  the batch endpoint 6.35k vs 5.20k rows/s (8 clients: 86 vs 84 req/s); Serve's echo floor 6.7 vs 11.4 ms.
  The handle call from the gateway to the scorer was ~17 % of the gateway's CPU (py-spy), in Ray's actor-call
  path.
- ``two``: a ``Gateway`` deployment calling ``Scorer`` replicas through a ``DeploymentHandle``. A scoring
  replica lost mid-request then becomes a retryable 503 (in ``one`` its in-flight requests get the proxy's
  500 or a closed connection), and scorers can scale on GPU nodes apart from the HTTP layer.

Start it with ``engagesim serve --run RUN_DIR`` or ``serve run``/``serve deploy`` on a config from
``engagesim serve --run RUN_DIR --write-config serve.yaml``.

API keys come only from the environment (``ENGAGESIM_API_KEYS``, comma
separated) of the process that builds the app; only their SHA-256 digests
travel to the replicas.
"""


import asyncio
import hashlib
import hmac
import os
from importlib import resources
from types import SimpleNamespace
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from engagesim import __version__
from engagesim.serve.api import (
    BatchRequest,
    BatchResponse,
    GenerateRequest,
    GenerateResponse,
    Prediction,
    PredictRequest,
)
from engagesim.serve.guard import Guard, RateLimit
from engagesim.serve.media import MediaPolicy, check_uri

KEYS_ENV = "ENGAGESIM_API_KEYS"
DIGESTS_ENV = "ENGAGESIM_API_KEY_DIGESTS"

app = FastAPI(
    title="engagesim",
    version=__version__,
    description="How will this post do? Expected likes with an interval and P(like/reply/retweet/quote) for a "
                "viewer, from a trained engagesim run. Every /v1 call needs `Authorization: Bearer <key>`.",
)


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: Any, headers: dict | None = None):
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def _error(status: int, error: str, detail: Any, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def _json(content: dict) -> Response:
    """A prediction response, encoded as it is: the scorer builds it in ``response_model``'s shape
    (``tests/test_serve.py`` validates it), so FastAPI's validation of it against the model and its encoding
    are skipped — 9.6 + 2 ms for a batch of 1,000 rows, where orjson takes ~1 ms (NaN → null, as pydantic).
    Defined above the routes: below them, the replica raised NameError (the ingress class travels by value)."""
    return Response(orjson.dumps(content), media_type="application/json")


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.error, exc.detail, exc.headers)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    detail = [{"field": ".".join(str(p) for p in e["loc"] if p != "body") or "body", "message": e["msg"]}
              for e in exc.errors()]
    return _error(422, "invalid_request", detail)


@app.exception_handler(StarletteHTTPException)
async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, "payload_too_large" if exc.status_code == 413 else "http_error", exc.detail)


app.add_middleware(Guard)


MIN_KEY_CHARS = 16


def key_digests(keys: str | None) -> list[str]:
    """SHA-256 digests of the comma-separated keys; refuses none, and keys too short to resist guessing."""
    keys_ = [k.strip() for k in (keys or "").split(",") if k.strip()]
    if not keys_:
        digests = [d.strip() for d in os.environ.get(DIGESTS_ENV, "").split(",") if d.strip()]
        if digests and all(len(d) == 64 and all(c in "0123456789abcdef" for c in d) for d in digests):
            return digests  # a `serve deploy` config carries only these (--write-config)
        raise RuntimeError(f"set {KEYS_ENV} (comma-separated API keys) in the environment; the service refuses "
                           "to start without keys")
    short = sum(len(k) < MIN_KEY_CHARS for k in keys_)
    if short:
        raise RuntimeError(f"{KEYS_ENV}: {short} key(s) shorter than {MIN_KEY_CHARS} characters; use long random "
                           "keys, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`")
    return [hashlib.sha256(k.encode()).hexdigest() for k in keys_]


class QueueBatcher:
    """Single requests scored together: while a batch is scored, new requests queue; the next batch is all
    that queued by then (up to ``max_size``), taken the moment scoring is free — no wait when idle.

    Why not ``@serve.batch``: it forms each batch within its wait window and only then queues it behind its
    ``max_concurrent_batches`` semaphore, so with a ~25 ms scoring call its batches came out of size ~1 under
    load — at 8 clients the scorer spent 28 CPU-ms per request, where a batch of 8 costs 3.4 ms a request
    in process. With this batcher the scorer spent 11.8 CPU-ms a request in the same setting, and 8 clients
    went from 34 req/s (the bench of the day before) to 84 (gateway → scorer) and 86 (one deployment)."""

    def __init__(self, fn, max_size: int = 32):
        self.fn, self.max_size = fn, max_size
        self._queue: asyncio.Queue | None = None  # made on the replica's event loop, at the first request
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [(item, f) for item, f in batch if not f.done()]  # a client gone: its request is dropped
            if not batch:
                continue
            try:
                results = await self.fn([item for item, _ in batch])
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0][1], exception=exc)
                    continue
                for item, f in batch:  # one by one: a bad request fails alone, not the batch it queued in
                    try:
                        _settle(f, result=(await self.fn([item]))[0])
                    except Exception as exc_:
                        _settle(f, exception=exc_)
                continue
            for (_, f), result in zip(batch, results):
                _settle(f, result=result)


def _settle(future: asyncio.Future, result: Any = None, exception: BaseException | None = None) -> None:
    if not future.done():  # (its client may have gone)
        future.set_result(result) if exception is None else future.set_exception(exception)


SCORER = {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 64, "health_check_period_s": 2,
          "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16}}
TOPOLOGIES = ("one", "two")


@serve.deployment(**SCORER)
class Scorer:
    """Holds one run's feature state and models; scores lists of requests."""

    def __init__(self, run_uri: str, media: MediaPolicy | None = None):
        from engagesim.serve.predictor import RequestPredictor

        self.predictor = RequestPredictor(run_uri, media)
        self._one_at_a_time = asyncio.Lock()
        self._singles = QueueBatcher(self._predict, max_size=32)

    async def predict_one(self, request: PredictRequest) -> dict:
        return await self._singles.submit(request)

    async def predict_many(self, requests: list[PredictRequest]) -> list[dict]:
        return await self._predict(requests)

    async def _predict(self, requests: list[PredictRequest]) -> list[dict]:
        """In a worker thread, one call at a time: the replica's event loop keeps taking requests (and health
        checks) while a batch is scored."""
        async with self._one_at_a_time:
            return await asyncio.to_thread(self.predictor.predict, requests)

    def models(self) -> dict:
        return self.predictor.models()

    def limits(self) -> dict:
        return {"max_text_chars": self.predictor.max_text_chars, "impressions": self.predictor.has_impressions}


class InProcess:
    """A scorer in the gateway's own replica (topology ``one``), called as a handle is: ``.method.remote(…)``."""

    def __init__(self, target: Any):
        self._target = target

    def __getattr__(self, name: str) -> SimpleNamespace:
        method = getattr(self._target, name)

        async def remote(*args):
            result = method(*args)
            return await result if asyncio.iscoroutine(result) else result

        return SimpleNamespace(remote=remote)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=4)
class ContentGenerator:
    """Holds a content run (tuned LLM, hashtag model) and ranks its candidates with the served behaviour run."""

    def __init__(self, content_run: str, behaviour_run: str):
        import tempfile

        from engagesim.content.best_of_n import ContentSimulator

        self.simulator = ContentSimulator(content_run, behaviour_run)
        self.uploads = tempfile.mkdtemp(prefix="engagesim-generate-")

    def generate(self, body: GenerateRequest) -> dict:
        from engagesim.serve.api import save_upload

        image = save_upload(body.image_base64, self.uploads) if body.image_base64 else None
        try:
            return self.simulator.simulate(body.account, body.created_at, n=body.n, company=body.company,
                                           image_path=image, target_likes=body.target_likes, seed=body.seed)
        finally:
            if image:
                os.remove(image)  # an upload lives only while its request runs


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(app)
class Gateway:
    async def __init__(self, scorer: DeploymentHandle | str, digests: list[str], max_batch_rows: int = 1000,
                       max_body_bytes: int = 8 * 1024 * 1024, generator: DeploymentHandle | None = None,
                       media: MediaPolicy | None = None, rate: RateLimit | None = None, deadline_s: float = 30.0):
        """``scorer``: a handle to ``Scorer`` replicas (topology ``two``), or a run URI to score in this replica.

        Async: Serve's ingress wrapper awaits it, so in topology two the run's request limits are asked of a
        scorer here, before the replica takes traffic (waiting for a scorer replica to start), not by the first
        request."""
        self.max_batch_rows, self.deadline_s = max_batch_rows, deadline_s
        self.generator, self.media = generator, media or MediaPolicy()
        local = Scorer.func_or_class(scorer, self.media) if isinstance(scorer, str) else None
        self.scorer = InProcess(local) if local is not None else scorer
        # What the Guard middleware checks before a route (and its body parsing) runs.
        app.state.digests, app.state.max_body_bytes = list(digests), max_body_bytes
        app.state.rate = rate or RateLimit()
        # The run's request limits (text length, whether viewers can be scored): every request is checked
        # against them before it reaches a scorer.
        self.limits: dict = local.limits() if local is not None else await self.scorer.limits.remote()

    def _authorise(self, request: Request) -> None:
        """Kept as a second check on every route (the Guard middleware has already refused a bad key)."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        presented = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(presented, d) for d in app.state.digests):
            raise ApiError(401, "unauthorized", "send Authorization: Bearer <API key>",
                           {"WWW-Authenticate": "Bearer"})

    def _check(self, requests: list[PredictRequest], prefix: str) -> None:
        for i, r in enumerate(requests):
            where = f"{prefix}{i}]." if prefix else ""
            if len(r.post.text) > self.limits["max_text_chars"]:
                raise ApiError(422, "invalid_request", [{"field": f"{where}post.text",
                                                         "message": f"longer than {self.limits['max_text_chars']} "
                                                                    "characters"}])
            if r.viewer is not None and not self.limits["impressions"]:
                raise ApiError(422, "invalid_request", [{"field": f"{where}viewer",
                                                         "message": "this run has no impression-level models"}])
            for k, item in enumerate(r.post.media):  # never a path or bucket on the server; https on the allowlist
                reason = check_uri(item.uri, self.media)
                if reason:
                    raise ApiError(422, "invalid_request", [{"field": f"{where}post.media.{k}.uri", "message": reason}])

    async def _call(self, method, *args):
        """A call to the scorer under the request deadline (504 past it); a replica lost mid-request becomes a
        503 the client can retry."""
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return await asyncio.wait_for(method(*args), self.deadline_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {self.deadline_s:g} s; retry, or send fewer rows",
                           {"Retry-After": "1"}) from None
        except (RayActorError, RayTaskError) as exc:
            if isinstance(exc, RayTaskError) and isinstance(exc.cause, ValueError):
                raise ApiError(422, "invalid_request", str(exc.cause)) from None
            raise ApiError(503, "unavailable", "a scoring replica restarted; retry", {"Retry-After": "1"}) from None
        except ValueError as exc:  # a request the run cannot score, raised in this replica (topology one)
            raise ApiError(422, "invalid_request", str(exc)) from None
        except Exception as exc:  # Serve's own "replica unavailable" errors and the like
            if type(exc).__name__ in ("BackPressureError", "DeploymentUnavailableError", "ActorDiedError",
                                      "ActorUnavailableError", "RequestCancelledError"):
                raise ApiError(503, "unavailable", "scoring is restarting or overloaded; retry",
                               {"Retry-After": "1"}) from None
            raise

    @app.get("/healthz", summary="Liveness: the gateway answers (no key needed).")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", summary="The served run: models, ensemble method, evaluation metrics.")
    async def models(self, request: Request) -> dict:
        self._authorise(request)
        return await self._call(self.scorer.models.remote)

    @app.post("/v1/predict", response_model=Prediction, summary="Predict one post (and, with a viewer, P(engagement)).")
    async def predict(self, body: PredictRequest, request: Request) -> dict:
        self._authorise(request)
        self._check([body], "")
        return _json(await self._call(self.scorer.predict_one.remote, body))

    @app.post("/v1/predict:batch", response_model=BatchResponse, summary="Predict many rows in one call.")
    async def predict_batch(self, body: BatchRequest, request: Request) -> dict:
        self._authorise(request)
        if len(body.rows) > self.max_batch_rows:
            raise ApiError(413, "payload_too_large", f"rows: at most {self.max_batch_rows} per call")
        self._check(body.rows, "rows[")
        predictions = await self._call(self.scorer.predict_many.remote, body.rows)
        return _json({"predictions": predictions, "model_version": predictions[0]["model_version"]})

    @app.post("/v1/generate", response_model=GenerateResponse,
              summary="Best-of-N: generated posts for an account and time, ranked by predicted likes.")
    async def generate(self, body: GenerateRequest, request: Request) -> dict:
        self._authorise(request)
        if self.generator is None:
            raise ApiError(404, "not_configured", "this service has no content run (engagesim serve --content-run)")
        return await self._call(self.generator.generate.remote, body)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        return resources.files("engagesim.serve").joinpath("page.html").read_text()


def build_app(run_uri: str, keys: str | None = None, max_batch_rows: int = 1000, scorer_replicas: int | None = None,
              gpus_per_replica: float = 0.0, content_run: str | None = None, media_hosts: tuple[str, ...] = (),
              rate: RateLimit | None = None, topology: str = "one"):
    """The Serve application for a run (keys default to the environment's ENGAGESIM_API_KEYS, or the digests in
    ENGAGESIM_API_KEY_DIGESTS that a ``serve deploy`` config carries).

    ``gpus_per_replica`` > 0 puts scorer replicas on GPU nodes (the encoders and the NN use CUDA there).
    ``content_run`` adds ``POST /v1/generate`` (its candidates ranked by this run's ensemble).
    ``media_hosts``: hosts whose https:// media requests may name (none: no fetching; uploads still work).
    ``rate``: requests per second per key and HTTP replica (429 with Retry-After beyond it).
    ``topology``: "one" deployment holding gateway and scorer, or "two" (gateway → scorers); see the module.
    """
    from engagesim.runs import check_run

    if topology not in TOPOLOGIES:
        raise RuntimeError(f"topology {topology!r}: use one of {', '.join(TOPOLOGIES)}")
    digests = key_digests(keys if keys is not None else os.environ.get(KEYS_ENV))
    check_run(run_uri)  # before any replica starts: a wrong path is one line, not a failed deployment
    options: dict = {}
    if scorer_replicas is not None:
        options.update(num_replicas=scorer_replicas, autoscaling_config=None)
    if gpus_per_replica:
        options["ray_actor_options"] = {"num_cpus": 1, "num_gpus": gpus_per_replica}
    generator = ContentGenerator.bind(content_run, run_uri) if content_run else None
    media = MediaPolicy(hosts=tuple(media_hosts))
    if topology == "one":  # the gateway's replicas score: they take the scorer's resources, scaling and name
        gateway = Gateway.options(name="Scorer", **{**SCORER, **options})
        return gateway.bind(run_uri, digests, max_batch_rows, generator=generator, media=media, rate=rate)
    scorer = Scorer.options(**options) if options else Scorer
    return Gateway.bind(scorer.bind(run_uri, media), digests, max_batch_rows, generator=generator, media=media,
                        rate=rate)


def app_builder(args: dict[str, str]):
    """For ``serve run engagesim.serve.app:app_builder run=RUN_DIR`` and Serve config files."""
    if "run" not in args:
        raise ValueError("args.run: the run directory to serve is required")
    hosts = tuple(h for h in str(args.get("media_hosts", "")).split(",") if h)
    return build_app(args["run"], max_batch_rows=int(args.get("max_batch_rows", 1000)),
                     gpus_per_replica=float(args.get("gpus_per_replica", 0)), content_run=args.get("content_run"),
                     media_hosts=hosts, topology=str(args.get("topology", "one")))


def serve_config(run_uri: str, host: str = "127.0.0.1", port: int = 8000, gpus_per_replica: float = 0.0,
                 content_run: str | None = None, media_hosts: tuple[str, ...] = (), topology: str = "one") -> dict:
    """A Serve config file for ``serve deploy``. ``serve deploy`` does not carry the user's shell environment
    to the cluster, so the digests of ENGAGESIM_API_KEYS (never the keys) go into the application's
    ``runtime_env``; without keys in this environment the cluster's own environment must provide them."""
    keys = os.environ.get(KEYS_ENV)
    runtime_env = {"env_vars": {DIGESTS_ENV: ",".join(key_digests(keys))}} if keys else {}
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": "engagesim",
            "route_prefix": "/",
            "import_path": "engagesim.serve.app:app_builder",
            "args": {"run": run_uri, "max_batch_rows": 1000, "gpus_per_replica": gpus_per_replica, "topology": topology,
                     **({"content_run": content_run} if content_run else {}),
                     **({"media_hosts": ",".join(media_hosts)} if media_hosts else {})},
            **({"runtime_env": runtime_env} if runtime_env else {}),
            "deployments": [
                {"name": "Scorer", "autoscaling_config": {"min_replicas": 1, "max_replicas": 4,
                                                          "target_ongoing_requests": 16},
                 "ray_actor_options": {"num_cpus": 1, **({"num_gpus": gpus_per_replica} if gpus_per_replica else {})}},
                *([{"name": "Gateway", "num_replicas": 1}] if topology == "two" else []),
                *([{"name": "ContentGenerator", "num_replicas": 1}] if content_run else []),
            ],
        }],
    }
