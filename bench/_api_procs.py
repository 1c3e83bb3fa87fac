"""Processes of ``bench.api``: the two HTTP servers (uvicorn) and the batchops worker.

Each runs in a session of its own, so ``stop()`` ends it and any children by signalling that
process group only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bench._prefect_server import free_port

__all__ = ["ManagedProcess", "http_ok", "uvicorn_app", "worker"]


class ManagedProcess:
    """A subprocess with a log file, ready once ``ready()`` says so."""

    def __init__(self, name: str, cmd: list[str], *, cwd: Path, env: dict[str, str],
                 log_path: Path) -> None:
        self.name, self.cmd, self.cwd, self.env, self.log_path = name, cmd, cwd, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready: Callable[[], bool], timeout: float = 120.0) -> None:
        started = time.perf_counter()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n"
                                   f"{self.log_tail()}")
            if ready():
                self.startup_seconds = time.perf_counter() - started
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False
    return check


def uvicorn_app(name: str, factory: str, *, cwd: Path, env: dict[str, str],
                log_path: Path) -> tuple[ManagedProcess, str]:
    """``uvicorn --factory FACTORY`` on a free 127.0.0.1 port (one worker, no access log),
    with the HTTP parser and header limit ``api.main.server_options`` serves the API with
    (both sides alike); the process (not started) and its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "--factory", factory, "--host", "127.0.0.1",
           "--port", str(port), "--no-access-log", "--log-level", "warning",
           "--http", "h11", "--h11-max-incomplete-event-size", str(64 * 1024),
           "--no-proxy-headers"]
    return ManagedProcess(name, cmd, cwd=cwd, env=env, log_path=log_path), \
        f"http://127.0.0.1:{port}"


def worker(pool: str, limit: int, *, cwd: Path, env: dict[str, str],
           log_path: Path) -> ManagedProcess:
    """One batchops worker on the work pool ``pool``, as ``make up`` starts it
    (``batchops worker``: each flow run in a thread of its process)."""
    cmd = [sys.executable, "-m", "cli", "worker", "--work-pool", pool, "--limit", str(limit)]
    return ManagedProcess("batchops worker", cmd, cwd=cwd, env=env, log_path=log_path)
