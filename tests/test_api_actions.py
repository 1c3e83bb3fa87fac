"""Cancel, retry, NDJSON events and CSV import over HTTP: real uvicorn, Prefect, runner, PG."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

import httpx
import pytest
import sqlalchemy as sa

from batchops.runtime import get_runtime
from tests.conftest import _truncate_pg
from tests.test_api import (  # noqa: F401  (fixtures)
    assert_error,
    deployment_runner,
    poll_until_finished,
    start_api,
    user,
)


@pytest.fixture
def pg_api(start_api: Callable[..., httpx.Client],  # noqa: F811
           deployment_runner: str) -> httpx.Client:  # noqa: F811
    """The API on the PostgreSQL database the deployment runner uses, emptied."""
    _truncate_pg(deployment_runner)
    return start_api(database_url=deployment_runner, chunk_size=50)


def email(i: int, latency: float = 0.0) -> dict[str, Any]:
    return {"id": f"m{i}", "method": "POST", "path": "/emails",
            "body": {"to": f"reader{i}@example.com", "send_latency": latency}}


def count(table: str) -> int:
    with get_runtime().store.engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


def test_cancel_mid_run_stops_starting_items_and_every_item_gets_a_result(
        pg_api: httpx.Client) -> None:
    answer = pg_api.post("/batches", json={"operations": [email(i, 0.01) for i in range(600)],
                                           "concurrency": 2, "mode": "async"})
    assert answer.status_code == 202, answer.text
    status_url = answer.json()["status_url"]
    deadline = time.monotonic() + 60
    while pg_api.get(status_url).json()["completed"] < 50 and time.monotonic() < deadline:
        time.sleep(0.05)

    cancelled = pg_api.post(f"/batches/{answer.json()['batch_id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    sent_at_cancel = count("outbox")
    final = _until_finished_at_is_set(pg_api, status_url)
    assert final["status"] == "cancelled"
    # Two items at a time, 10 ms each: about 100 more in the half second a chunk takes to
    # notice, not the 550 left.
    assert sent_at_cancel <= final["succeeded"] < sent_at_cancel + 200
    assert (final["completed"], final["succeeded"] + final["skipped"]) == (600, 600)
    assert count("outbox") == final["succeeded"]
    items = pg_api.get(f"/batches/{final['batch_id']}/results",
                       params={"limit": 1000}).json()["items"]
    assert [i["index"] for i in items] == list(range(600))
    assert {(i["state"], i["status"], (i.get("error") or {}).get("code")) for i in items
            if i["state"] != "succeeded"} == {("skipped", 499, "cancelled")}
    assert _flow_run_state(final["flow_run_id"]) == "CANCELLED"


def test_a_flow_run_cancelled_in_prefect_cancels_its_batch_for_good(
        pg_api: httpx.Client) -> None:
    from prefect import get_client
    from prefect.states import Cancelling

    from flows.reaper import reap_stale_batches

    answer = pg_api.post("/batches", json={"operations": [email(i, 0.01) for i in range(600)],
                                           "concurrency": 2, "mode": "async"})
    assert answer.status_code == 202, answer.text
    status_url = answer.json()["status_url"]
    deadline = time.monotonic() + 60
    while pg_api.get(status_url).json()["completed"] < 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    flow_run_id = pg_api.get(status_url).json()["flow_run_id"]

    # What `prefect flow-run cancel` and Cancel in the UI do: the runner stops the run.
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(UUID(flow_run_id), Cancelling(message="cancelled in the UI"))
    final = _until_finished_at_is_set(pg_api, status_url)

    assert final["status"] == "cancelled"
    assert (final["completed"], final["succeeded"] + final["skipped"]) == (600, 600)
    assert 50 <= final["succeeded"] < 600
    items = pg_api.get(f"/batches/{final['batch_id']}/results",
                       params={"limit": 1000}).json()["items"]
    assert [i["index"] for i in items] == list(range(600))
    assert {(i["state"], (i.get("error") or {}).get("code")) for i in items
            if i["state"] != "succeeded"} == {("skipped", "cancelled")}
    assert _flow_run_state(flow_run_id) == "CANCELLED"
    # The run was killed: the sends in flight, and those whose outcome was still on its way
    # to the store, may have happened without a recorded success (their results say so).
    sent = count("outbox")
    assert final["succeeded"] <= sent <= final["succeeded"] + 20
    time.sleep(0.3)
    assert reap_stale_batches(stale_after_seconds=0.2) == []  # the reaper leaves it cancelled
    assert pg_api.get(status_url).json()["status"] == "cancelled"
    assert count("outbox") == sent  # nothing ran after the run was stopped


def test_a_sync_batch_cancelled_in_prefect_stops_and_its_run_ends_cancelled(
        pg_api: httpx.Client) -> None:
    from prefect import get_client
    from prefect.states import Cancelling

    # A sync batch whose wait is over (202) runs on in the API's embedded worker.
    answer = pg_api.post("/batches", json={"operations": [email(i, 0.1) for i in range(80)],
                                           "concurrency": 1}, headers={"Prefer": "wait=0"})
    assert answer.status_code == 202, answer.text
    status_url = answer.json()["status_url"]
    deadline = time.monotonic() + 60
    while pg_api.get(status_url).json()["completed"] < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    flow_run_id = pg_api.get(status_url).json()["flow_run_id"]
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(UUID(flow_run_id)).deployment_id is not None
        # What `prefect flow-run cancel` and Cancel in the UI do.
        client.set_flow_run_state(UUID(flow_run_id), Cancelling(message="cancelled in the UI"))
    cancelled_at = time.monotonic()
    final = _until_finished_at_is_set(pg_api, status_url)

    assert final["status"] == "cancelled"
    assert final["completed"] == 80 and 5 <= final["succeeded"] < 80
    # The worker reads cancels once a second; an item takes 0.1 s: at most ~2 s of items
    # start after the cancel.
    assert final["succeeded"] <= count("outbox") <= final["succeeded"] + 1
    assert time.monotonic() - cancelled_at < 30
    items = pg_api.get(f"/batches/{final['batch_id']}/results",
                       params={"limit": 100}).json()["items"]
    assert {(i["state"], (i.get("error") or {}).get("code")) for i in items
            if i["state"] != "succeeded"} == {("skipped", "cancelled")}
    deadline = time.monotonic() + 30
    while _flow_run_state(flow_run_id) != "CANCELLED" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _flow_run_state(flow_run_id) == "CANCELLED"


def _until_finished_at_is_set(client: httpx.Client, status_url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = client.get(status_url).json()
        if status["finished_at"] is not None:
            return dict(status)
        time.sleep(0.1)
    raise AssertionError(f"the batch did not finish: {status}")


def _flow_run_state(flow_run_id: str) -> str:
    from prefect import get_client

    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(UUID(flow_run_id))
            if (run.state and run.state.is_final()) or time.monotonic() > deadline:
                return run.state.type.value if run.state else ""
            time.sleep(0.1)


def test_retry_runs_only_the_failed_items_as_a_new_flow_run(pg_api: httpx.Client) -> None:
    with get_runtime().store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users (id, email) VALUES (900, 'user2@example.com')"))
    first = pg_api.post("/batches", json={"operations": [user(i) for i in range(1, 6)]})
    assert first.status_code == 207, first.text
    batch_id = first.json()["batch_id"]
    first_run = pg_api.get(f"/batches/{batch_id}/status").json()["flow_run_id"]

    assert_error(pg_api.post(f"/batches/{batch_id}/cancel"), 409, "batch_finished")
    with get_runtime().store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM users WHERE id = 900"))
    retried = pg_api.post(f"/batches/{batch_id}/retry")
    assert retried.status_code == 202, retried.text
    readings = poll_until_finished(pg_api, retried.json()["status_url"])

    assert readings[-1]["status"] == "completed"
    assert (readings[-1]["succeeded"], readings[-1]["failed"]) == (5, 0)
    assert readings[-1]["flow_run_id"] != first_run
    # Had the 4 first successes run again, they would be 409 conflicts now.
    items = pg_api.get(f"/batches/{batch_id}/results").json()["items"]
    assert [i["status"] for i in items] == [201] * 5
    again = pg_api.post(f"/batches/{batch_id}/retry")
    assert (again.status_code, again.json()["status"]) == (200, "completed")


def test_events_stream_every_item_in_order_and_resume_after_an_index(
        pg_api: httpx.Client) -> None:
    answer = pg_api.post("/batches", json={"operations": [email(i) for i in range(300)]},
                         headers={"Prefer": "respond-async"})
    assert answer.status_code == 202, answer.text
    batch_id = answer.json()["batch_id"]

    with pg_api.stream("GET", f"/batches/{batch_id}/events") as stream:
        assert stream.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in stream.iter_lines() if line]
    assert [e["index"] for e in lines[:-1]] == list(range(300))
    assert lines[-1] == {"event": "end", "status": "completed", "last": 299}
    assert all(e["status"] == 201 for e in lines[:-1])

    resumed = pg_api.get(f"/batches/{batch_id}/events", params={"after": 250})
    indexes = [json.loads(line).get("index") for line in resumed.text.splitlines()]
    assert indexes == [*range(251, 300), None]


def test_csv_import_with_bad_rows_gives_results_with_input_line_numbers(
        pg_api: httpx.Client) -> None:
    rows = ["id,email,name"] + [f"{i},user{i}@example.com,User {i}" for i in range(1, 5001)]
    rows[1001] = "1001,user7@example.com,=HYPERLINK(1)"  # duplicate email, on line 1002
    rows[4001] = "4001,user8@example.com,Dup"              # line 4002
    answer = pg_api.post("/batches/import", params={"resource": "users", "method": "POST"},
                         content="\n".join(rows) + "\n",
                         headers={"Content-Type": "text/csv"})
    assert answer.status_code == 202, answer.text
    readings = poll_until_finished(pg_api, answer.json()["status_url"])
    assert (readings[-1]["status"], readings[-1]["succeeded"], readings[-1]["failed"]) == (
        "completed", 4998, 2)

    download = pg_api.get(f"/batches/{answer.json()['batch_id']}/results",
                          params={"format": "csv", "state": "failed"})
    assert download.status_code == 200
    failed = list(csv.DictReader(io.StringIO(download.text)))
    assert [(r["row"], r["state"], r["status"], r["error_code"]) for r in failed] == [
        ("1002", "failed", "409", "unique_violation"),
        ("4002", "failed", "409", "unique_violation")]
    assert count("users") == 4998


def test_csv_import_as_multipart_and_invalid_rows(pg_api: httpx.Client) -> None:
    good = "email,name\nann@example.com,Ann\nbob@example.com,Bob\n"
    answer = pg_api.post("/batches/import", params={"resource": "users", "method": "POST"},
                         files={"file": ("users.csv", good, "text/csv")})
    assert answer.status_code == 202, answer.text
    assert poll_until_finished(pg_api, answer.json()["status_url"])[-1]["succeeded"] == 2

    bad = "id,email\n1,a@example.com\nseven,b@example.com\n3,\n"
    error = assert_error(pg_api.post("/batches/import",
                                     params={"resource": "users", "method": "POST"},
                                     content=bad, headers={"Content-Type": "text/csv"}),
                         422, "validation_failed")
    assert {(e["id"], e["field"]) for e in error["errors"]} >= {("line 3", "body.id")}
    assert_error(pg_api.post("/batches/import", params={"resource": "nope", "method": "POST"},
                             content=good, headers={"Content-Type": "text/csv"}),
                 400, "bad_request")
