"""Cancelling a batch stops new chunks; retrying runs only the failed items, as a new run."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from batchops.errors import BatchInProgress
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
    assert runtime.store.prepare_retry(batch_id) == 2
    assert runtime.store.status(batch_id).status is BatchState.QUEUED
    process_batch(batch_id=batch_id)

    status = runtime.store.status(batch_id)
    assert (status.status, status.total, status.completed, status.succeeded, status.failed) == (
        BatchState.COMPLETED, 10, 10, 10, 0)
    # Had the 8 successes run again, their inserts would now be 409 conflicts.
    results = list(runtime.store.iter_results(batch_id))
    assert [r.status for r in results] == [201] * 10
    with runtime.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar() == 10


def test_a_running_batch_cannot_be_retried(runtime: Runtime) -> None:
    batch_id, _ = register_batch(runtime, [{"method": "GET", "path": "/users/1"}])
    with pytest.raises(BatchInProgress):
        runtime.store.prepare_retry(batch_id)


def test_cancel_before_the_run_executes_nothing(runtime: Runtime) -> None:
    batch_id, _ = register_batch(runtime, [{"method": "POST", "path": "/users",
                                            "body": {"id": 1, "email": "a@x.io"}}])
    assert runtime.store.cancel(batch_id).status == BatchState.CANCELLED.value
    process_batch(batch_id=batch_id)
    status = runtime.store.status(batch_id)
    assert (status.status, status.completed) == (BatchState.CANCELLED, 0)
    with runtime.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar() == 0


def test_cancel_mid_run_stops_new_chunks_and_keeps_finished_results(
        configure, database_url: str) -> None:
    runtime: Runtime = configure(database_url=database_url, chunk_size=20)
    ops = [{"id": f"m{i}", "method": "POST", "path": "/emails",
            "body": {"to": f"r{i}@x.io", "send_latency": 0.02}} for i in range(200)]
    batch_id, _ = register_batch(runtime, ops, concurrency=1)

    def cancel_after_first_chunk() -> None:
        deadline = time.monotonic() + 60
        while runtime.store.get_batch(batch_id).completed < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        runtime.store.cancel(batch_id)

    canceller = threading.Thread(target=cancel_after_first_chunk)
    canceller.start()
    process_batch(batch_id=batch_id)
    canceller.join()

    status = runtime.store.status(batch_id)
    assert status.status is BatchState.CANCELLED
    assert 20 <= status.completed < 200
    results = list(runtime.store.iter_results(batch_id))
    assert len(results) == status.completed
    assert all(r.state is ItemState.SUCCEEDED for r in results)
    with runtime.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM outbox")).scalar() == status.completed
