"""The gateway's first checks, in order, before a route runs or a byte of the body is parsed: the API key
(401), the key's request rate (429 with Retry-After), the body's size (413) — on the bytes actually read, so
a chunked upload without Content-Length is held to the same limit.

Measured before: the key was checked after FastAPI had parsed the body (an unauthenticated 8 MiB body cost
~2.5 s, and bad bodies got field-level 422s before any 401), and only Content-Length was checked (a chunked
20 MiB upload went through).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

OPEN_PATHS = ("/healthz", "/docs", "/openapi.json", "/favicon.ico")


@dataclass
class RateLimit:
    """A token bucket per key: ``per_second`` sustained, ``burst`` at once (per gateway replica)."""

    per_second: float = 50.0
    burst: int = 100
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def wait(self, key: str, now: float | None = None) -> float:
        """0 if a request of ``key`` may go now (and take its token), else the seconds until one may."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, then = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.per_second)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.per_second

    def __getstate__(self) -> dict:  # travels to the replica without its lock
        return {"per_second": self.per_second, "burst": self.burst}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def presented_digest(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return hashlib.sha256(token.strip().encode()).hexdigest()
    return None


class Guard:
    """Pure ASGI middleware; reads ``digests``, ``rate`` and ``max_body_bytes`` from ``app.state``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope["app"].state
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # an app under a route prefix (/engagesim/v1/…) is guarded the same
            path = path[len(root):]
        if path.startswith("/v1/"):
            digest = presented_digest(scope.get("headers", []))
            known = getattr(state, "digests", [])
            if digest is None or not any(hmac.compare_digest(digest, d) for d in known):
                return await _reply(scope, receive, send, 401, "unauthorized", "send Authorization: Bearer <API key>",
                                    {"WWW-Authenticate": "Bearer"})
            rate: RateLimit | None = getattr(state, "rate", None)
            wait = rate.wait(digest) if rate is not None else 0.0
            if wait > 0:
                return await _reply(scope, receive, send, 429, "rate_limited",
                                    f"over {rate.per_second:g} requests/s for this key; retry later",
                                    {"Retry-After": str(max(1, math.ceil(wait)))})
        limit = getattr(state, "max_body_bytes", 8 * 1024 * 1024)
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length" and (not value.isdigit() or int(value) > limit):
                return await _reply(scope, receive, send, 413, "payload_too_large", f"request body over {limit} bytes")
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # FastAPI re-raises HTTPException from body reading; the app maps it to JSON
                    raise HTTPException(413, f"request body over {limit} bytes")
            return message

        await self.app(scope, counted, send)


async def _reply(scope, receive, send, status: int, error: str, detail: str, headers: dict | None = None) -> None:
    await JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)(scope, receive, send)
