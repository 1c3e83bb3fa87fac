"""Supervising the processes of a system on one machine: start, watch, stop them all.

``batchops up`` (:mod:`deployments.local`) and ``batchops up --scaled``
(:mod:`deployments.scaled`) both start their processes through a :class:`Supervisor`: each
child runs in its own session (so a signal reaches its whole tree, e.g. a worker and the flow
runs it started) with its output in ``<log_dir>/<name>.log``; :meth:`Supervisor.stop_all`
stops them in reverse order — SIGINT first, so runners and uvicorn finish what they run.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["Child", "Supervisor", "port_in_use", "stop_on_signals", "wait_http"]


def wait_http(url: str, timeout: float = 60) -> bool:
    """``True`` once ``url`` answers 200, ``False`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on ``host:port`` already (a server started there would fail
    to bind). Binds the way uvicorn does, with ``SO_REUSEADDR``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:  # any other problem is the server's to report
            return exc.errno == errno.EADDRINUSE
    return False


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both raise KeyboardInterrupt (SIGINT may arrive ignored in a
    background job)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int = signal.SIGINT

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL to the child's whole process group (a machine lost, for tests)."""
        if self.running:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20) -> None:
        if not self.running:
            return
        try:
            os.killpg(self.proc.pid, self.stop_signal)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass


class Supervisor:
    """The children of one system, started in order and stopped in reverse."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str], *,
              cwd: Path | None = None, stop_signal: int = signal.SIGINT) -> Child:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        child = Child(name, proc, log_path, stop_signal)
        self.children.append(child)
        return child

    def get(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def watch(self, poll: float = 1.0) -> Child:
        """Block until a child stops; that child."""
        while True:
            for child in self.children:
                if not child.running:
                    return child
            time.sleep(poll)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop()
