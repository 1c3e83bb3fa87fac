"""A killed API leaves no half-made request behind: a batch-level ``Idempotency-Key`` is
claimed in the transaction that stores its batch, so the client retrying at once gets the
batch it started (or a free key), never ``409`` for a batch that does not exist.

The API runs as a real process (uvicorn), killed with SIGKILL the moment the key's claim is
visible in the store's database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from batchops.devtools import free_port
from tests.conftest import _truncate_pg

pytestmark = pytest.mark.usefixtures("prefect_server")

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def _api_process(database_url: str, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    from prefect.settings import PREFECT_API_URL

    port = free_port()
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "BATCHOPS_DATABASE_URL": database_url, "BATCHOPS_QUOTA_OPS_PER_MINUTE": "0"}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _claimed_batch(engine: sa.Engine, key: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT batch_id FROM batch_requests WHERE key = :k"),
                            {"k": key}).scalar()


def test_a_retry_after_the_api_was_killed_mid_request_gets_the_batch_or_a_free_key(
        pg_database: str, tmp_path: Path) -> None:
    _truncate_pg(pg_database)
    engine = sa.create_engine(pg_database)
    key = "killed-mid-request"
    body: dict[str, Any] = {"mode": "sync", "operations": [
        {"id": f"u{i}", "method": "POST", "path": "/users",
         "body": {"email": f"killed{i}@example.com"}} for i in range(1000)]}
    headers = {"Idempotency-Key": key, "Prefer": "wait=1"}
    log = tmp_path / "api.log"

    with _api_process(pg_database, log) as (proc, url):
        sender = threading.Thread(target=lambda: _post_ignoring_errors(url, body, headers))
        sender.start()
        deadline = time.monotonic() + 60
        while (claimed := _claimed_batch(engine, key)) is None:
            assert time.monotonic() < deadline, f"the key was never claimed:\n{log.read_text()}"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)  # the moment the key is claimed
        sender.join(30)

    with _api_process(pg_database, log) as (_, url):
        retry = httpx.post(f"{url}/batches", json=body, headers=headers, timeout=60)

    assert retry.status_code in (200, 202, 207), retry.text
    assert retry.json()["batch_id"] == claimed
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT id FROM batches")).scalars().all()
    engine.dispose()
    assert stored == [claimed]  # the claimed batch exists, and no second one was made


def _post_ignoring_errors(url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
    with suppress(httpx.HTTPError):  # the server is killed mid-request
        httpx.post(f"{url}/batches", json=body, headers=headers, timeout=60)
