"""Process helpers for tests: free ports and servers stopped by their own handle."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

# The small synthetic world of the session's shared behaviour run (and of the content run built on it).
TINY_WORLD = ["synth.users=300", "synth.posts=900", "synth.impressions=30000", "synth.images=12",
              "synth.rows_per_shard=10000", "synth.days=6", "synth.seed=7"]


def run_root(root: Path) -> list[str]:
    """Overrides that keep a test run's outputs and embedding cache under ``root``."""
    return [f"output_root={root}", f"embed.cache_dir={root / 'cache'}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all sockets held open while choosing, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before port {port} opened")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} did not open in {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a server we started, by its handle: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def stop_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop a server started with ``start_new_session=True`` and everything it spawned (its process
    group — e.g. a Ray head's GCS, raylet, agents and workers): SIGTERM, then SIGKILL."""
    import signal

    try:
        group = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                proc.poll()
                return
            time.sleep(0.2)
    proc.poll()


def venv_bin(name: str) -> str:
    """A console script installed beside this interpreter (the project's .venv)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} or on PATH")
    return found


def quiet_lines(stderr: str) -> list[str]:
    """A quiet run's stderr lines as a user counts them. Ray's C++ core still writes one E-level line of Ray
    Data's making to the driver's fd 2 ("[date E pid] core_worker.cc: ... constructor arguments in the object
    store"); RAY_BACKEND_LOG_LEVEL only trades it for an I-level line, so core lines are left out."""
    import re

    return [x for x in stderr.splitlines() if x.strip() and not re.match(r"\[\d{4}-\d\d-\d\d [\d:,]+ [IWE] ", x)]


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [venv_bin("engagesim"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def frame_mismatches(a, b, keys: list[str], tol: float = 1e-6) -> list[str]:
    """Columns where two polars frames differ once both are sorted by ``keys`` (floats within ``tol``, nulls
    and NaNs in the same places); [] when they hold the same rows and columns. ["<shape>"] when those differ."""
    import polars as pl

    if a.columns != b.columns or a.height != b.height:
        return ["<shape>"]
    a, b = a.sort(keys), b.sort(keys)
    bad = []
    for name in a.columns:
        x, y = a[name], b[name]
        if x.dtype.is_float():
            x, y = x.cast(pl.Float64), y.cast(pl.Float64)
            same_gaps = (x.is_null() == y.is_null()).all() and (x.is_nan().fill_null(False) ==
                                                                 y.is_nan().fill_null(False)).all()
            if not same_gaps or ((x - y).abs().fill_nan(0).max() or 0) > tol:
                bad.append(name)
        elif not x.equals(y):
            bad.append(name)
    return bad
