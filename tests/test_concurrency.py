"""A crowd of concurrent clients against a real uvicorn server: no 5xx, no batch left behind.

The first user of a batch API is many clients at once. Each client here loops ``POST
/batches`` (sync, 10 inserts with unique emails) for a bounded time; every answer must be a
documented one (200/207 with every item's result, or 202 with a status URL), every batch must
end final in the store, and the rows in the table must be exactly the items reported
succeeded.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest

from batchops.registration import register_batch
from batchops.runtime import Runtime, get_runtime
from batchops.tables import batches, utcnow
from tests.test_api import (  # noqa: F401 - fixtures
    poll_until_finished,
    start_api,
    table_rows,
)

pytestmark = pytest.mark.usefixtures("prefect_server")

CLIENTS = 8
SECONDS = 12.0
ITEMS = 10


def _batch(numbers: itertools.count[int]) -> dict[str, Any]:
    ops = []
    for _ in range(ITEMS):
        n = next(numbers)
        ops.append({"id": f"u{n}", "method": "POST", "path": "/users",
                    "body": {"email": f"crowd{n}@example.com", "name": f"Crowd {n}"}})
    return {"mode": "sync", "operations": ops}


def test_concurrent_sync_clients_get_documented_answers_and_leave_no_batch_behind(
        start_api: Callable[..., httpx.Client], database_url: str) -> None:  # noqa: F811
    api = start_api(database_url=database_url)
    numbers = itertools.count(1)
    lock = threading.Lock()
    answers: list[httpx.Response] = []
    failures: list[str] = []
    stop_at = time.monotonic() + SECONDS

    def client() -> None:
        with httpx.Client(base_url=str(api.base_url), timeout=90) as http:
            while time.monotonic() < stop_at:
                with lock:
                    body = _batch(numbers)
                try:
                    answer = http.post("/batches", json=body)
                except httpx.HTTPError as exc:  # a reset connection is a failure too
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    answers.append(answer)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert not failures, failures[:5]
    codes = Counter(a.status_code for a in answers)
    assert set(codes) <= {200, 207, 202}, (codes, [a.text for a in answers
                                                   if a.status_code >= 300 and
                                                   a.status_code != 207][:3])
    assert len(answers) >= CLIENTS, codes

    succeeded = 0
    for answer in answers:
        body = answer.json()
        if answer.status_code == 202:
            assert answer.headers["Location"] == body["status_url"]
            final = poll_until_finished(api, body["status_url"])[-1]
            assert final["status"] == "completed", final
            succeeded += final["succeeded"]
            continue
        assert body["status"] == "completed", body
        assert body["summary"]["total"] == ITEMS
        assert len(body["results"]) == ITEMS
        assert all(r["state"] in ("succeeded", "failed") for r in body["results"])
        succeeded += body["summary"]["succeeded"]

    runtime = get_runtime()
    statuses = Counter(b["status"] for b in table_rows(runtime, "batches"))
    assert statuses == {"completed": len(answers)}, statuses
    assert len(table_rows(runtime, "users")) == succeeded == len(answers) * ITEMS


def test_a_sync_batch_that_waits_for_a_busy_api_answers_202_and_runs_when_a_thread_frees(
    start_api: Callable[..., httpx.Client],  # noqa: F811
    database_url: str,
) -> None:
    api = start_api(database_url=database_url, sync_workers=1)
    slow = {"mode": "sync", "operations": [
        {"id": "slow", "method": "POST", "path": "/emails",
         "body": {"to": "a@example.com", "send_latency": 3}}]}
    answers: dict[str, httpx.Response] = {}
    busy = threading.Thread(target=lambda: answers.setdefault(
        "slow", api.post("/batches", json=slow, headers={"Prefer": "wait=60"})))
    busy.start()
    deadline = time.monotonic() + 60
    while not any(b["status"] == "processing" for b in table_rows(get_runtime(), "batches")):
        assert time.monotonic() < deadline, "the slow batch did not start"
        time.sleep(0.05)
    # the only sync thread is now busy with the slow batch (3 s)
    answer = api.post("/batches", headers={"Prefer": "wait=0.5"}, json={
        "mode": "sync", "operations": [{"id": "u1", "method": "POST", "path": "/users",
                                        "body": {"email": "waited@example.com"}}]})
    busy.join(60)

    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "queued"
    final = poll_until_finished(api, answer.json()["status_url"])[-1]
    assert (final["status"], final["succeeded"]) == ("completed", 1)
    assert answers["slow"].status_code == 200, answers["slow"].text
    assert [u["email"] for u in table_rows(get_runtime(), "users")] == ["waited@example.com"]


def test_a_batch_waiting_for_a_thread_runs_once_when_the_reaper_also_wants_it(
        runtime: Runtime) -> None:
    """The API's thread and the reaper each take a queued batch by a conditional update:
    whichever comes first runs it, the other leaves it."""
    store, lifecycle = runtime.store, runtime.lifecycle
    for reaper_first in (True, False):
        batch_id, _ = register_batch(runtime, [{"method": "POST", "path": "/users",
                                                "body": {"email": f"{reaper_first}@x.org"}}])
        with store.engine.begin() as conn:  # registered long ago: stale for the reaper
            conn.execute(batches.update().where(batches.c.id == batch_id)
                         .values(created_at=utcnow() - timedelta(hours=1)))
        if reaper_first:
            assert lifecycle.recover(batch_id, "queued", timedelta(seconds=60))
            assert not lifecycle.take(batch_id)
        else:
            assert lifecycle.take(batch_id)
            assert not lifecycle.recover(batch_id, "queued", timedelta(seconds=60))


def test_concurrent_requests_with_one_idempotency_key_make_one_batch(
    start_api: Callable[..., httpx.Client],  # noqa: F811
    database_url: str,
) -> None:
    api = start_api(database_url=database_url)
    body = _batch(itertools.count(1))
    answers: list[httpx.Response] = []
    go = threading.Barrier(CLIENTS)

    def client() -> None:
        with httpx.Client(base_url=str(api.base_url), timeout=90) as http:
            go.wait()
            answers.append(http.post("/batches", json=body,
                                     headers={"Idempotency-Key": "one-crowd-key"}))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert sorted(a.status_code for a in answers) == [200] * CLIENTS, [a.text for a in answers]
    assert len({a.json()["batch_id"] for a in answers}) == 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == CLIENTS - 1
    runtime = get_runtime()
    assert len(table_rows(runtime, "batches")) == 1
    assert len(table_rows(runtime, "users")) == ITEMS
