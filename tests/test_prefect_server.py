"""The embedded Prefect server that ``make up`` starts (``batchops.devtools.prefect_server``)."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchops.devtools import free_port
from batchops.devtools.prefect_server import command
from deployments.local import wait_for_prefect
from deployments.processes import Supervisor


@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The server as ``make up`` starts and stops it (``deployments.local``)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false")
    processes = Supervisor(home)
    server = processes.start("prefect-server", command("127.0.0.1", port), env,
                             stop_signal=signal.SIGTERM)
    api = f"http://127.0.0.1:{port}/api"
    try:
        assert wait_for_prefect(api), server.log_path.read_text()
        yield api, home / "prefect.db"
    finally:
        processes.stop_all()


def test_a_flow_run_created_while_another_connection_writes_waits_instead_of_failing(
        embedded_server: tuple[str, Path]) -> None:
    """Prefect's own ``prefect server start`` answers this create with ``503 database is
    locked`` within ~50 ms (its transaction reads, then cannot upgrade to a write), and its
    client retries two seconds later; the embedded server waits for the lock and creates it."""
    api, db = embedded_server
    with httpx.Client(base_url=api, timeout=60) as client:
        flow_id = client.post("/flows/", json={"name": "lock-wait"}).json()["id"]
        writer = sqlite3.connect(db, isolation_level=None, timeout=60)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE flow SET updated = updated WHERE name = 'lock-wait'")
        answer: dict[str, Any] = {}

        def create() -> None:
            started = time.perf_counter()
            resp = client.post("/flow_runs/", json={"flow_id": flow_id, "name": "waited"})
            answer.update(status=resp.status_code, body=resp.json(),
                          seconds=time.perf_counter() - started)

        thread = threading.Thread(target=create)
        thread.start()
        time.sleep(1.0)
        writer.execute("COMMIT")
        thread.join(timeout=60)
        writer.close()

        assert answer["status"] == 201, answer
        assert answer["seconds"] >= 0.9, "the create should have waited for the writer"
        run = client.get(f"/flow_runs/{answer['body']['id']}").json()
        assert run["name"] == "waited" and run["flow_id"] == flow_id
