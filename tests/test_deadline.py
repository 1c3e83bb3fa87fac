"""Deadline per batch: once it passes no item starts, the rest are skipped, a retry runs them."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from batchops.registration import register_batch
from batchops.runtime import Runtime
from batchops.schemas import BatchState, ItemState
from flows.process_batch import process_batch
from tests.test_api import api, start_api  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("prefect_server")

# The item is checked against the deadline, then the handler stamps its start: microseconds.
CLOCK_SLACK = timedelta(milliseconds=50)


def emails(n: int, latency: float) -> list[dict[str, Any]]:
    return [{"id": f"m{i}", "method": "POST", "path": "/emails",
             "body": {"to": f"r{i}@x.io", "send_latency": latency}} for i in range(n)]


def outbox_starts(runtime: Runtime) -> list[datetime]:
    outbox = runtime.resources["outbox"].table
    with runtime.store.engine.connect() as conn:
        starts = conn.execute(sa.select(outbox.c.started_at)).scalars().all()
    return [s if s.tzinfo else s.replace(tzinfo=UTC) for s in starts]


def test_deadline_skips_the_rest_and_a_retry_runs_them(configure: Callable[..., Runtime],
                                                        database_url: str) -> None:
    runtime = configure(database_url=database_url, chunk_size=5)
    batch_id, _ = register_batch(runtime, emails(40, 0.2), concurrency=2)

    process_batch(batch_id=batch_id, deadline_seconds=1.0)  # counted from the run's start

    status = runtime.store.status(batch_id)
    assert status.status is BatchState.COMPLETED
    assert status.deadline_at is not None
    assert status.succeeded > 0 and status.skipped > 0 and status.failed == 0
    assert (status.completed, status.succeeded + status.skipped, status.progress) == (
        40, 40, 1.0)
    results = list(runtime.store.results.of_batch(batch_id))
    skipped = [r for r in results if r.state is ItemState.SKIPPED]
    assert len(skipped) == status.skipped
    assert all(r.status == 504 and r.error is not None and r.error.code == "deadline_exceeded"
               and r.attempts == 0 for r in skipped)
    assert [r.index for r in runtime.store.results.of_batch(batch_id, state=ItemState.SKIPPED)] == [
        r.index for r in skipped]
    # Exactly the items that ran sent an email, and none of them started after the deadline.
    starts = outbox_starts(runtime)
    assert len(starts) == status.succeeded
    assert max(starts) <= status.deadline_at + CLOCK_SLACK

    assert runtime.lifecycle.retry(batch_id) == status.skipped
    retried = runtime.store.status(batch_id)
    assert (retried.status, retried.skipped, retried.completed) == (
        BatchState.QUEUED, 0, status.succeeded)
    assert retried.deadline_at is not None and retried.deadline_at > status.deadline_at
    process_batch(batch_id=batch_id, deadline_seconds=120)

    final = runtime.store.status(batch_id)
    assert (final.status, final.succeeded, final.failed, final.skipped) == (
        BatchState.COMPLETED, 40, 0, 0)
    assert len(outbox_starts(runtime)) == 40  # the first run's sends were not repeated


def test_a_deadline_passed_before_the_run_starts_nothing(runtime: Runtime) -> None:
    batch_id, _ = register_batch(runtime, emails(12, 0.0), deadline_seconds=0.001)
    time.sleep(0.01)
    summary = process_batch(batch_id=batch_id)

    assert (summary.total, summary.succeeded, summary.failed, summary.skipped) == (12, 0, 0, 12)
    assert runtime.store.status(batch_id).status is BatchState.COMPLETED
    assert outbox_starts(runtime) == []


def test_a_batch_without_deadline_has_none(runtime: Runtime) -> None:
    batch_id, _ = register_batch(runtime, emails(2, 0.0))
    summary = process_batch(batch_id=batch_id)
    assert (summary.succeeded, summary.skipped) == (2, 0)
    assert runtime.store.status(batch_id).deadline_at is None


def test_api_deadline_answers_207_with_skipped_items(api: httpx.Client) -> None:  # noqa: F811
    answer = api.post("/batches", json={
        "operations": emails(30, 0.3), "mode": "sync", "concurrency": 1,
        "deadline_seconds": 1.5})

    assert answer.status_code == 207, answer.text
    body = answer.json()
    assert body["status"] == "completed"
    summary = body["summary"]
    assert summary["total"] == 30 and summary["failed"] == 0 and summary["skipped"] > 0
    assert summary["succeeded"] + summary["skipped"] == 30
    skipped = [r for r in body["results"] if r["state"] == "skipped"]
    assert len(skipped) == summary["skipped"]
    assert all(r["status"] == 504 and r["error"]["code"] == "deadline_exceeded"
               and "result" not in r for r in skipped)
    status = api.get(f"/batches/{body['batch_id']}/status").json()
    assert (status["skipped"], status["progress"]) == (summary["skipped"], 1.0)
    assert status["deadline_at"] is not None

    invalid = api.post("/batches", json={"operations": emails(1, 0.0), "deadline_seconds": 0})
    assert invalid.status_code == 422
    assert [e["field"] for e in invalid.json()["error"]["errors"]] == ["deadline_seconds"]
