"""A Prefect runner serving the deployments, in a subprocess, for tests that run deployments."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

__all__ = ["alive", "kill_process_tree", "process_tree", "serving_deployments", "stop_process"]

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def serving_deployments(env: dict[str, str], deployments: Sequence[str],
                        log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``serve_deployments()`` in a subprocess until every named deployment is served; the
    runner is stopped (SIGINT, then kill) when the block ends."""
    from prefect import get_client

    with log_path.open("wb") as log:
        runner = subprocess.Popen(
            [sys.executable, "-c",
             "from deployments.serve import serve_deployments; serve_deployments()"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            for name in deployments:
                while True:
                    try:
                        client.read_deployment_by_name(name)
                        break
                    except Exception:
                        if runner.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError(f"the runner did not serve {name}:\n"
                                               f"{log_path.read_text()}") from None
                        time.sleep(0.5)
        yield runner
    finally:
        stop_process(runner)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a runner or worker as Ctrl-C does (SIGINT), killing it after 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry))
    return found


def process_tree(pid: int) -> list[int]:
    """A process and every process it started that is still its descendant (whatever their
    session)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += _children(current)
    return tree


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def kill_process_tree(pid: int) -> list[int]:
    """``kill -9`` a process and every process it started (whatever their session): what a
    machine that dies does to them. The pids killed."""
    tree = process_tree(pid)
    for p in tree:
        with suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return tree
