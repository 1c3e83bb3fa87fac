"""The supervisor of ``batchops up``: a dead child is restarted, a stop leaves no process behind.

The system under test (``tests/supervised.py``) runs real processes under the same
:class:`~deployments.processes.Supervisor` as ``batchops up``: web servers, one of them behind a
parent that ignores SIGINT.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from batchops.devtools import free_port
from deployments.processes import wait_http
from tests.runner import REPO, alive, process_tree

STOP_TIMEOUT = 10.0  # what a graceful stop of the slow child waits for


@dataclass
class System:
    proc: subprocess.Popen[bytes]
    output: Path
    ports: list[int]
    pids: dict[str, int]  # of the children, by name

    def lines(self) -> list[str]:
        return self.output.read_text().splitlines()

    def wait_for_line(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if found := re.search(pattern, line):
                    return found
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in:\n{self.output.read_text()}")


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    ports = [free_port(), free_port()]
    output = tmp_path / "supervisor.out"
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.supervised", str(tmp_path), str(STOP_TIMEOUT),
             *map(str, ports)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    started = System(proc, output, ports, {})
    try:
        started.pids = json.loads(started.wait_for_line(r"^started (.*)$").group(1))
        for port in ports:
            assert wait_http(f"http://127.0.0.1:{port}/", 30), started.output.read_text()
        yield started
    finally:
        for pid in process_tree(proc.pid):  # whatever a failed test left
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)


def test_a_child_killed_with_sigkill_is_restarted_and_answers_again(system: System) -> None:
    port = system.ports[0]
    victim = system.pids[f"web-{port}"]

    os.killpg(victim, signal.SIGKILL)

    system.wait_for_line(rf"^web-{port} stopped \(killed by SIGKILL\); see .*web-{port}\.log\. "
                         r"Restarting it in 1 s\.$")
    restarted = int(system.wait_for_line(rf"^web-{port} restarted \(pid (\d+)\)\.$").group(1))
    assert restarted != victim and alive(restarted)
    assert wait_http(f"http://127.0.0.1:{port}/", 30)
    assert system.proc.poll() is None  # the supervisor and the other children carry on
    assert alive(system.pids["slow"]) and _answers(system.ports[1])


def test_two_quick_ctrl_cs_stop_every_process_at_once(system: System) -> None:
    tree = process_tree(system.proc.pid)
    assert len(tree) == 4  # the supervisor, two children, the slow child's web server

    started = time.monotonic()
    system.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    system.proc.send_signal(signal.SIGINT)  # while it waits for the slow child
    system.proc.wait(timeout=STOP_TIMEOUT)

    assert time.monotonic() - started < STOP_TIMEOUT / 2  # it did not wait for the slow one
    assert system.lines()[-2:] == ["stopping", "stopped"]
    assert [pid for pid in tree if alive(pid)] == []
    assert not any(_answers(port) for port in system.ports)


def test_sigterm_stops_every_process_even_one_that_ignores_sigint(system: System) -> None:
    tree = process_tree(system.proc.pid)

    system.proc.send_signal(signal.SIGTERM)
    system.proc.wait(timeout=STOP_TIMEOUT + 15)

    lines = system.lines()
    assert lines[-1] == "stopped"
    assert "stopping" in lines
    # the child that ignores SIGINT is named, with its log, after the stop timeout
    [killed] = [line for line in lines if "did not stop" in line]
    assert killed.startswith(f"slow did not stop within {STOP_TIMEOUT:g} s")
    assert killed.endswith("slow.log)")
    assert [pid for pid in tree if alive(pid)] == []
    assert not any(_answers(port) for port in system.ports)
