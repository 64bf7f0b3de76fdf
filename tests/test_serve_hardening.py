"""Hostile requests against the serving layer, without Ray: what media a request may make the server read, the
gateway's key / rate / body checks in front of any route, and start-up refusals."""

from __future__ import annotations

import io as pyio
import time

import pytest
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from engagesim.serve.guard import Guard, RateLimit
from engagesim.serve.media import MediaFetcher, MediaPolicy, MediaRefused, check_uri

KEY = "k" * 24
OPEN = MediaPolicy(hosts=("images.example.com", "localhost", "10.0.0.7", "169.254.169.254"))


@pytest.mark.parametrize("uri", ["../../etc/passwd", "/dev/zero", "file:///etc/passwd", "s3://bucket/key.png",
                                 "http://images.example.com/a.jpg", "ftp://images.example.com/a.jpg", "https:///x.jpg",
                                 "data:image/png;base64,AAAA"])
def test_requests_may_not_name_files_buckets_or_plain_http(uri):
    assert "only https://" in check_uri(uri, OPEN)


def test_https_media_needs_fetching_on_and_the_host_allowed():
    assert "does not fetch media" in check_uri("https://images.example.com/a.jpg", MediaPolicy())
    assert check_uri("https://images.example.com/a.jpg", OPEN) is None
    assert check_uri("https://cdn.images.example.com/a.jpg", OPEN) is None  # a subdomain of an allowed host
    assert "not allowed" in check_uri("https://images.example.com.evil.net/a.jpg", OPEN)
    assert "not allowed" in check_uri("https://evil.net/a.jpg", OPEN)
    assert "credentials" in check_uri("https://user:pw@images.example.com/a.jpg", OPEN)


@pytest.mark.parametrize("uri", ["https://localhost/a.jpg", "https://10.0.0.7/a.jpg", "https://169.254.169.254/latest"])
def test_allowed_hosts_on_internal_addresses_are_refused_after_resolution(uri):
    with pytest.raises(MediaRefused, match="non-public address"):
        MediaFetcher(OPEN)(uri)


def test_the_fetcher_reads_no_local_file_but_its_own_uploads(tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "abc.img").write_bytes(b"image bytes")
    (tmp_path / "secret.txt").write_text("do not read")
    fetch = MediaFetcher(MediaPolicy(upload_dir=str(uploads)))
    assert fetch(str(uploads / "abc.img")) == b"image bytes"
    started = time.perf_counter()
    for uri in ("/dev/zero", str(tmp_path / "secret.txt"), str(uploads / ".." / "secret.txt"), "/etc/passwd"):
        with pytest.raises(MediaRefused):
            fetch(uri)
    assert time.perf_counter() - started < 1  # /dev/zero is never opened


def test_a_decompression_bomb_is_refused_from_its_header():
    from PIL import Image

    from engagesim.features.image_stats import decode

    buf = pyio.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, "PNG")  # ~80 KiB of PNG, 81 megapixels
    started = time.perf_counter()
    with pytest.raises(ValueError, match="pixel limit"):
        decode(buf.getvalue())
    assert time.perf_counter() - started < 1


def _guarded(rate: RateLimit | None = None, limit: int = 1024 * 1024):
    import hashlib

    api = FastAPI()
    api.add_middleware(Guard)
    api.state.digests = [hashlib.sha256(KEY.encode()).hexdigest()]
    api.state.max_body_bytes, api.state.rate = limit, rate or RateLimit()
    seen = {"bodies": 0}

    @api.post("/v1/echo")
    async def echo(request: Request) -> dict:
        seen["bodies"] += 1
        return {"bytes": len(await request.body())}

    @api.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    return TestClient(api), seen


def test_the_key_is_checked_before_the_body_is_read():
    client, seen = _guarded()
    big = b"x" * (5 * 1024 * 1024)
    for headers in ({}, {"Authorization": "Bearer wrong-key-of-some-length"}, {"Authorization": f"Basic {KEY}"}):
        r = client.post("/v1/echo", content=big, headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized" and r.headers["WWW-Authenticate"] == "Bearer"
    assert seen["bodies"] == 0  # no route ran, no body was parsed
    assert client.get("/healthz").json() == {"status": "ok"}  # liveness needs no key


def test_the_body_limit_holds_for_chunked_uploads():
    client, _ = _guarded(limit=1024 * 1024)
    auth = {"Authorization": f"Bearer {KEY}"}
    assert client.post("/v1/echo", content=b"x" * 1000, headers=auth).json() == {"bytes": 1000}
    declared = client.post("/v1/echo", content=b"x" * (2 * 1024 * 1024), headers=auth)
    assert declared.status_code == 413 and declared.json()["error"] == "payload_too_large"

    def chunks():  # no Content-Length: Transfer-Encoding chunked, 20 MiB
        for _ in range(20):
            yield b"x" * (1024 * 1024)

    chunked = client.post("/v1/echo", content=chunks(), headers=auth)
    assert chunked.status_code == 413, chunked.text


def test_a_key_over_its_rate_gets_429_with_retry_after():
    client, _ = _guarded(rate=RateLimit(per_second=0.5, burst=2))
    auth = {"Authorization": f"Bearer {KEY}"}
    codes = [client.post("/v1/echo", content=b"{}", headers=auth).status_code for _ in range(3)]
    assert codes[:2] == [200, 200] and codes[2] == 429
    r = client.post("/v1/echo", content=b"{}", headers=auth)
    assert r.json()["error"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1


def test_the_rate_limit_refills_and_survives_serialisation():
    import cloudpickle

    rate = cloudpickle.loads(cloudpickle.dumps(RateLimit(per_second=10, burst=1)))
    assert rate.wait("a", now=0.0) == 0.0 and rate.wait("a", now=0.0) > 0
    assert rate.wait("a", now=0.2) == 0.0  # 0.2 s at 10/s refilled the token
    assert rate.wait("b", now=0.0) == 0.0  # keys have their own buckets


def test_short_keys_and_no_keys_are_refused_at_start(monkeypatch):
    from engagesim.serve.app import DIGESTS_ENV, key_digests

    monkeypatch.delenv(DIGESTS_ENV, raising=False)
    with pytest.raises(RuntimeError, match="shorter than 16"):
        key_digests(f"{KEY},short-key")
    with pytest.raises(RuntimeError, match="refuses to start"):
        key_digests("")
    assert len(key_digests(KEY)) == 1


def test_serve_deploy_config_carries_digests_never_keys(monkeypatch):
    from engagesim.serve.app import DIGESTS_ENV, KEYS_ENV, key_digests, serve_config

    monkeypatch.setenv(KEYS_ENV, KEY)
    config = serve_config("s3://bucket/runs/r1", media_hosts=("images.example.com",))
    application = config["applications"][0]
    digests = application["runtime_env"]["env_vars"][DIGESTS_ENV]
    assert KEY not in str(config) and digests == key_digests(KEY)[0]
    assert application["args"]["media_hosts"] == "images.example.com"
    # On the cluster only the digests are in the environment: the app builds from them.
    monkeypatch.delenv(KEYS_ENV)
    monkeypatch.setenv(DIGESTS_ENV, digests)
    assert key_digests(None) == [digests]
