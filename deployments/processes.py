"""Supervising the processes of a system on one machine: start, watch, restart, stop them all.

``batchops up`` (:mod:`deployments.local`) and ``batchops up --scaled``
(:mod:`deployments.scaled`) both start their processes through a :class:`Supervisor`: each
child runs in its own session (so a signal reaches its whole tree, e.g. a worker and the flow
runs it started) with its output in ``<log_dir>/<name>.log``.

* :meth:`Supervisor.supervise` keeps them running: a child that dies is logged and started
  again after a backoff that doubles from :data:`FIRST_BACKOFF_SECONDS` up to
  :data:`MAX_BACKOFF_SECONDS` while it keeps dying young (it resets once a child has run
  :data:`STABLE_SECONDS`), and its restart is logged too.
* :meth:`Supervisor.stop_all` stops them in reverse order — SIGINT first, so runners and
  uvicorn finish what they run, SIGKILL after a timeout — then kills whatever is left in each
  child's process group, so nothing outlives the supervisor.
* :meth:`Supervisor.stop_on_signals`: the first Ctrl-C or SIGTERM raises
  ``KeyboardInterrupt`` (a stop); every further one only hurries the stop along (the children
  still running get SIGKILL at once), so a second Ctrl-C can never leave children behind.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import NoReturn

import httpx

__all__ = ["FIRST_BACKOFF_SECONDS", "MAX_BACKOFF_SECONDS", "STABLE_SECONDS", "Child",
           "Supervisor", "port_in_use", "stop_on_signals", "wait_http"]

FIRST_BACKOFF_SECONDS = 1.0  # before the first restart of a child that died
MAX_BACKOFF_SECONDS = 30.0  # the longest wait before a restart
STABLE_SECONDS = 60.0  # a child that ran this long before it died is restarted at once again


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
    background job). For one process; a :class:`Supervisor` has its own."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        with suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


@dataclass
class Child:
    """One supervised process, and how to start it again."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path | None = None
    stop_signal: int = signal.SIGINT
    proc: subprocess.Popen[bytes] = field(init=False)
    started_at: float = field(init=False, default=0.0)
    quick_deaths: int = field(init=False, default=0)  # in a row, each before STABLE_SECONDS

    def spawn(self) -> None:
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.started_at = time.monotonic()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def next_backoff(self) -> float:
        """Seconds to wait before restarting the child that just died."""
        if time.monotonic() - self.started_at >= STABLE_SECONDS:
            self.quick_deaths = 0
        delay = min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2 ** self.quick_deaths)
        self.quick_deaths += 1
        return delay

    def _signal_group(self, signum: int) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)

    def kill(self) -> None:
        """SIGKILL to the child's whole process group: a machine lost (tests), or what a dead
        child left behind."""
        self._signal_group(signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20, hurry: threading.Event | None = None) -> bool:
        """The stop signal to the child's process group; SIGKILL once ``timeout`` has passed
        or ``hurry`` is set, and to what the child left in its group when it exited. Whether
        the child stopped by itself (``False``: it had to be killed)."""
        stopped = True
        if self.running:
            self._signal_group(self.stop_signal)
            deadline = time.monotonic() + timeout
            while self.running and time.monotonic() < deadline and not (
                    hurry is not None and hurry.is_set()):
                time.sleep(0.05)
            stopped = not self.running
        self.kill()
        return stopped


class Supervisor:
    """The children of one system, started in order, kept running, and stopped in reverse."""

    def __init__(self, log_dir: Path, log: Callable[[str], object] = print) -> None:
        self.log_dir = log_dir
        self.log = log  # the terminal: deaths and restarts are reported there
        self.children: list[Child] = []
        self._stopping = False
        self._hurry = threading.Event()
        self._spawning = False
        self._interrupted = False  # a signal came while a child was being started
        log_dir.mkdir(parents=True, exist_ok=True)

    # -- signals ---------------------------------------------------------------------------

    def stop_on_signals(self) -> None:
        """The first Ctrl-C or SIGTERM raises ``KeyboardInterrupt`` (also when SIGINT arrived
        ignored, in a background job); any further one makes :meth:`stop_all` SIGKILL the
        children still running at once, instead of interrupting it."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping:
            self._hurry.set()
            return
        self._stopping = True
        if self._spawning:  # raised once the child being started is known (see _spawn)
            self._interrupted = True
            return
        raise KeyboardInterrupt

    # -- children --------------------------------------------------------------------------

    def start(self, name: str, argv: list[str], env: dict[str, str], *,
              cwd: Path | None = None, stop_signal: int = signal.SIGINT) -> Child:
        """Start a child (one of the same name that stopped is replaced)."""
        child = Child(name, argv, env, self.log_dir / f"{name}.log", cwd, stop_signal)
        self._spawn(child)
        return child

    def _spawn(self, child: Child) -> None:
        # A stop signal between the fork and the bookkeeping would orphan the new child.
        self._spawning = True
        try:
            child.spawn()
            for i, known in enumerate(self.children):
                if known.name == child.name:
                    self.children[i] = child
                    break
            else:
                self.children.append(child)
        finally:
            self._spawning = False
        if self._interrupted:
            self._interrupted = False
            raise KeyboardInterrupt

    def get(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def supervise(self, poll: float = 0.5) -> NoReturn:
        """Keep every child running until interrupted (``KeyboardInterrupt``): a child that
        stops is reported and started again after its backoff."""
        restart_at: dict[str, float] = {}
        while True:
            for child in list(self.children):
                if child.running:
                    continue
                if child.name not in restart_at:
                    delay = child.next_backoff()
                    self.log(f"{child.name} stopped ({_exit_status(child.proc.returncode)}); "
                             f"see {child.log_path}. Restarting it in {delay:.0f} s.")
                    restart_at[child.name] = time.monotonic() + delay
                elif time.monotonic() >= restart_at[child.name]:
                    del restart_at[child.name]
                    child.kill()  # what it left behind (e.g. a dead runner's flow runs)
                    self._spawn(Child(child.name, child.argv, child.env, child.log_path,
                                      child.cwd, child.stop_signal))
                    restarted = self.get(child.name)
                    restarted.quick_deaths = child.quick_deaths
                    self.log(f"{child.name} restarted (pid {restarted.proc.pid}).")
            time.sleep(poll)

    def stop_all(self, timeout: float = 20) -> None:
        """Stop every child, the last started first; a stop signal meanwhile hurries it."""
        self._stopping = True
        for child in reversed(self.children):
            if not child.stop(timeout, self._hurry) and not self._hurry.is_set():
                self.log(f"{child.name} did not stop within {timeout:g} s of its stop "
                         f"signal: killed (its log: {child.log_path})")
