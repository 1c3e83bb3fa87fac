"""Cancelling a batch stops starting items and gives every item a result; retrying runs only
the failed items, as a new run."""

from __future__ import annotations

import json
import threading
import time
from uuid import UUID

import pytest
import sqlalchemy as sa
from prefect import get_client

from batchops.cancellation import cancel_batch
from batchops.devtools.upstream import UpstreamConfig, running_upstream
from batchops.errors import BatchFinished, BatchInProgress
from batchops.registration import register_batch
from batchops.runtime import Runtime
from batchops.schemas import BatchState, ItemState
from flows.process_batch import process_batch

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_retry_runs_only_the_failed_items(runtime: Runtime) -> None:
    with runtime.store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users (id, email) VALUES (100, 'u3@x.io'), "
                             "(101, 'u7@x.io')"))
    ops = [{"method": "POST", "path": "/users", "body": {"id": i, "email": f"u{i}@x.io"}}
           for i in range(10)]
    batch_id, _ = register_batch(runtime, ops)
    process_batch(batch_id=batch_id)
    first = runtime.store.status(batch_id)
    assert (first.succeeded, first.failed) == (8, 2)

    with runtime.store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM users WHERE id >= 100"))
    assert runtime.lifecycle.retry(batch_id) == 2
    assert runtime.store.status(batch_id).status is BatchState.QUEUED
    process_batch(batch_id=batch_id)

    status = runtime.store.status(batch_id)
    assert (status.status, status.total, status.completed, status.succeeded, status.failed) == (
        BatchState.COMPLETED, 10, 10, 10, 0)
    # Had the 8 successes run again, their inserts would now be 409 conflicts.
    results = list(runtime.store.results.of_batch(batch_id))
    assert [r.status for r in results] == [201] * 10
    with runtime.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar() == 10


def test_a_running_batch_cannot_be_retried(runtime: Runtime) -> None:
    batch_id, _ = register_batch(runtime, [{"method": "GET", "path": "/users/1"}])
    with pytest.raises(BatchInProgress):
        runtime.lifecycle.retry(batch_id)


def test_cancel_before_the_run_executes_nothing_and_records_every_item_cancelled(
        runtime: Runtime) -> None:
    batch_id, _ = register_batch(runtime, [{"method": "POST", "path": "/users",
                                            "body": {"id": i, "email": f"u{i}@x.io"}}
                                           for i in range(3)])
    cancel_batch(runtime, batch_id)

    status = runtime.store.status(batch_id)
    assert (status.status, status.completed, status.skipped) == (BatchState.CANCELLED, 3, 3)
    assert status.finished_at is not None
    state = process_batch(batch_id=batch_id, return_state=True)
    assert state.is_cancelled()
    results = list(runtime.store.results.of_batch(batch_id))
    assert [(r.state, r.status, r.error.code if r.error else None, r.attempts)
            for r in results] == [(ItemState.SKIPPED, 499, "cancelled", 0)] * 3
    with runtime.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar() == 0


def test_cancel_of_a_finished_batch_is_refused_and_changes_nothing(runtime: Runtime) -> None:
    batch_id, _ = register_batch(runtime, [{"method": "GET", "path": "/users/1"}])
    process_batch(batch_id=batch_id)

    with pytest.raises(BatchFinished, match="completed"):
        cancel_batch(runtime, batch_id)
    assert runtime.store.status(batch_id).status is BatchState.COMPLETED
    # Cancelling a cancelled batch answers it as it is.
    other, _ = register_batch(runtime, [{"method": "GET", "path": "/users/1"}])
    cancel_batch(runtime, other)
    cancel_batch(runtime, other)
    assert runtime.store.status(other).status is BatchState.CANCELLED


def test_cancel_mid_run_stops_starting_items_and_records_the_rest_cancelled(
        configure, database_url: str) -> None:
    runtime: Runtime = configure(database_url=database_url, chunk_size=100)
    ops = [{"id": f"m{i}", "method": "POST", "path": "/emails",
            "body": {"to": f"r{i}@x.io", "send_latency": 0.02}} for i in range(200)]
    batch_id, _ = register_batch(runtime, ops, concurrency=1)
    sent_at_cancel: list[int] = []

    def cancel_after_a_few_items() -> None:
        deadline = time.monotonic() + 60
        while _outbox(runtime) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        cancel_batch(runtime, batch_id)
        sent_at_cancel.append(_outbox(runtime))

    canceller = threading.Thread(target=cancel_after_a_few_items)
    canceller.start()
    state = process_batch(batch_id=batch_id, return_state=True)
    canceller.join()

    assert state.is_cancelled()
    status = runtime.store.status(batch_id)
    assert status.status is BatchState.CANCELLED and status.finished_at is not None
    # Both chunks were running (concurrency 1: one item at a time, 20 ms each): about 25 more
    # items in the half second a chunk takes to notice, not the 190 left.
    assert sent_at_cancel[0] <= status.succeeded < sent_at_cancel[0] + 60
    assert (status.completed, status.succeeded + status.skipped, status.failed) == (200, 200, 0)
    results = list(runtime.store.results.of_batch(batch_id))
    assert [r.index for r in results] == list(range(200))
    succeeded = [r for r in results if r.state is ItemState.SUCCEEDED]
    assert len(succeeded) == status.succeeded == _outbox(runtime)
    assert all((r.status, r.error.code if r.error else None) == (499, "cancelled")
               for r in results if r.state is not ItemState.SUCCEEDED)


def _outbox(runtime: Runtime) -> int:
    with runtime.store.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM outbox")).scalar_one())


def test_cancel_stops_requests_to_the_upstream_within_a_second(
        configure, database_url: str) -> None:
    with running_upstream(UpstreamConfig(latency_ms=200)) as (url, upstream):
        runtime: Runtime = configure(database_url=database_url, chunk_size=100,
                                     upstreams=json.dumps({"crm": {
                                         "prefix": "/crm", "base_url": url}}))
        ops = [{"id": f"c{i}", "method": "POST", "path": "/crm/contacts",
                "body": {"name": f"Contact {i}"}} for i in range(400)]
        batch_id, _ = register_batch(runtime, ops, concurrency=10)
        cancelled_at: list[float] = []

        def cancel_after_sixty_requests() -> None:
            deadline = time.monotonic() + 60
            while sum(upstream.attempts.values()) < 60 and time.monotonic() < deadline:
                time.sleep(0.01)
            cancel_batch(runtime, batch_id)
            cancelled_at.append(time.monotonic() - upstream.started)

        canceller = threading.Thread(target=cancel_after_sixty_requests)
        canceller.start()
        state = process_batch(batch_id=batch_id, return_state=True)
        canceller.join()
        requests = list(upstream.requests)

    assert state.is_cancelled(), state
    late = [r.at - cancelled_at[0] for r in requests if r.at > cancelled_at[0] + 1.0]
    assert late == [], f"{len(late)} requests reached the upstream over 1 s after the cancel"
    assert len(requests) < 60 + 10 * 6  # 10 in flight, at most 1 s at 200 ms each
    status = runtime.store.status(batch_id)
    assert status.status is BatchState.CANCELLED and status.finished_at is not None
    results = list(runtime.store.results.of_batch(batch_id))
    assert [r.index for r in results] == list(range(400))
    executed = {r.key for r in requests if r.outcome == "executed"}
    succeeded = {f"{batch_id}:{r.index}" for r in results if r.state is ItemState.SUCCEEDED}
    assert succeeded == executed  # what reached the upstream, and nothing else, succeeded
    assert {(r.state, r.status, r.error.code if r.error else None) for r in results
            if r.state is not ItemState.SUCCEEDED} == {(ItemState.SKIPPED, 499, "cancelled")}
    assert (status.succeeded, status.skipped, status.completed) == (
        len(executed), 400 - len(executed), 400)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(status.flow_run_id or ""))
    assert run.state is not None and run.state.is_cancelled()


def test_a_run_cancelled_in_prefect_is_not_run_again_by_the_reaper(runtime: Runtime) -> None:
    from prefect.states import Cancelled

    from flows.reaper import reap_stale_batches

    batch_id, _ = register_batch(runtime, [{"method": "POST", "path": "/users",
                                            "body": {"id": i, "email": f"u{i}@x.io"}}
                                           for i in range(3)])
    with get_client(sync_client=True) as client:
        # Its run was cancelled in Prefect where nothing could tell the batch (the worker died
        # with it, or the run was cancelled before a worker took it).
        run = client.create_flow_run(process_batch, parameters={"batch_id": batch_id},
                                     state=Cancelled(message="cancelled in the UI"))
    assert runtime.lifecycle.start(batch_id, str(run.id))
    time.sleep(0.3)

    assert reap_stale_batches(stale_after_seconds=0.2) == []

    status = runtime.store.status(batch_id)
    assert (status.status, status.completed, status.skipped) == (BatchState.CANCELLED, 3, 3)
    assert status.finished_at is not None
    assert {r.error.code for r in runtime.store.results.of_batch(batch_id) if r.error} == {
        "cancelled"}
    with runtime.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar() == 0
    assert reap_stale_batches(stale_after_seconds=0.2) == []  # and it stays so
