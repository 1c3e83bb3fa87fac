"""``batchops up`` (``make up``): the embedded system starts from nothing, runs the demo batch on
its worker, and stops every process it started, PostgreSQL included."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

from batchops.devtools import free_port

REPO = Path(__file__).resolve().parent.parent


def _processes_under(path: Path) -> list[str]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(path) in cmdline:
            found.append(cmdline)
    return found


def test_up_starts_postgres_prefect_a_worker_and_the_api_runs_the_demo_and_stops_them_all(
        tmp_path: Path) -> None:
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "BATCHOPS_"))}
    env["BATCHOPS_API_PORT"] = str(free_port())

    done = subprocess.run(
        [sys.executable, "-m", "cli", "up", "--no-stay", "--port", str(free_port())],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=300)

    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    # the demo holds one operation that fails by design: exit code 1, the batch completed
    assert done.returncode == 1, output
    assert re.search(r"completed: 25 succeeded, 1 failed", output), output
    assert "a batchops worker runs the work pool 'batchops'" in output
    assert "View at http://127.0.0.1:" in output  # the run is on the server up started
    assert (tmp_path / ".data" / "postgres" / "PG_VERSION").exists()
    assert _processes_under(tmp_path) == []  # nothing left running, PostgreSQL included
