"""What a request's media may make the server read: never a file or bucket it names, only ``https://`` URLs on
an allowlist (when fetching is on), never an internal address.

Tried against the service before this module: ``post.media[].uri`` was read like a training dataset's media,
so ``../../etc/passwd`` came back as an image error and ``/dev/zero`` grew a replica to 2.3 GiB before a
MemoryError. Now:

- ``check_uri`` (the gateway, before any work): ``https://`` only; the host on ``--media-host``; else 422.
- ``MediaFetcher`` (the scorer): the host is resolved once and every address must be public (no loopback,
  private, link-local, reserved or multicast), then the connection goes to that vetted address (no second
  lookup to rebind); no redirects; one deadline over connect + read; a byte cap. Uploaded images
  (``image_base64``) are read only from the replica's own private directory.
- ``features.image_stats.decode`` caps decoded pixels (a 252 KiB 9000×9000 PNG took 3.4 s and 313 MiB).
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


class MediaRefused(PermissionError):
    """A request's media URI that the policy does not allow."""


@dataclass(frozen=True)
class MediaPolicy:
    """``hosts`` empty: fetching is off (requests may still upload an image as ``image_base64``)."""

    hosts: tuple[str, ...] = ()
    max_bytes: int = 8 * 1024 * 1024
    timeout_s: float = 5.0
    upload_dir: str | None = field(default=None, compare=False)

    @property
    def fetching(self) -> bool:
        return bool(self.hosts)

    def allows_host(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == h or host.endswith("." + h) for h in (h.lower().lstrip(".") for h in self.hosts))


def check_uri(uri: str, policy: MediaPolicy) -> str | None:
    """Why a request may not name this media URI (None: it may)."""
    parts = urlsplit(uri)
    if parts.scheme != "https" or not parts.hostname:
        return "only https:// media URLs are accepted (send an image as post.image_base64)"
    if not policy.fetching:
        return "this service does not fetch media (start it with --media-host HOST); send post.image_base64"
    if parts.username or parts.password:
        return "media URLs may not carry credentials"
    if not policy.allows_host(parts.hostname):
        return f"media host {parts.hostname!r} is not allowed on this service"
    return None


def public_addresses(host: str, port: int) -> list[str]:
    """The host's addresses, every one of them public; MediaRefused if any is not (or none resolve)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise MediaRefused(f"media host {host!r} does not resolve") from exc
    addresses = sorted({info[4][0] for info in infos})
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not ip.is_global or ip.is_multicast:
            raise MediaRefused(f"media host {host!r} resolves to a non-public address ({ip})")
    if not addresses:
        raise MediaRefused(f"media host {host!r} does not resolve")
    return addresses


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to ``host`` (certificate and SNI checked against it) over a socket to an address vetted already."""

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class MediaFetcher:
    """``fetch(uri) → bytes`` for request media, under a ``MediaPolicy`` (what a replica's featuriser calls)."""

    def __init__(self, policy: MediaPolicy):
        self.policy = policy

    def __call__(self, uri: str, *_, **__) -> bytes:
        upload = self._upload(uri)
        if upload is not None:
            with open(upload, "rb") as f:
                return f.read(self.policy.max_bytes + 1)[: self.policy.max_bytes]
        reason = check_uri(uri, self.policy)
        if reason:
            raise MediaRefused(reason)
        return self._https(uri)

    def _upload(self, uri: str) -> str | None:
        """A file this replica wrote for an ``image_base64`` upload (and nothing else on its disk)."""
        folder = self.policy.upload_dir
        if not folder or "://" in uri:
            return None
        path = os.path.realpath(uri)
        return path if os.path.dirname(path) == os.path.realpath(folder) and os.path.isfile(path) else None

    def _https(self, uri: str) -> bytes:
        parts = urlsplit(uri)
        port = parts.port or 443
        deadline = time.monotonic() + self.policy.timeout_s
        address = public_addresses(parts.hostname, port)[0]
        conn = _PinnedHTTPS(parts.hostname, address, port, self.policy.timeout_s)
        try:
            conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                         headers={"User-Agent": "engagesim-serve", "Accept": "image/*"})
            response = conn.getresponse()
            if 300 <= response.status < 400:
                raise MediaRefused(f"media URL redirects (HTTP {response.status}); give the final URL")
            if response.status != 200:
                raise MediaRefused(f"media URL answered HTTP {response.status}")
            chunks, size = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"media download over {self.policy.timeout_s} s")
                chunk = response.read(64 * 1024)
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > self.policy.max_bytes:
                    raise MediaRefused(f"media larger than {self.policy.max_bytes} bytes")
                chunks.append(chunk)
        finally:
            conn.close()
