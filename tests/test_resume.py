"""A run that dies halfway, run again: completed chunks are not executed again."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from uuid import UUID

import pytest
import sqlalchemy as sa
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import TaskRunSort

from batchops.registration import register_batch
from batchops.runtime import Runtime
from batchops.schemas import BatchState, ItemState
from flows.process_batch import process_batch
from tests.faults import arm_user_insert_fault, disarm_fault, remove_fault

pytestmark = pytest.mark.usefixtures("prefect_server")

@pytest.fixture
def pg_runtime(configure, pg_database: str) -> Iterator[Runtime]:  # type: ignore[no-untyped-def]
    from tests.conftest import _truncate_pg

    _truncate_pg(pg_database)
    runtime: Runtime = configure(database_url=pg_database, chunk_retries=1,
                                 chunk_retry_backoff_seconds=0)
    with runtime.store.engine.begin() as conn:
        arm_user_insert_fault(conn)
    yield runtime
    with runtime.store.engine.begin() as conn:
        remove_fault(conn)


def _task_runs(flow_run_id: str) -> dict[str, tuple[str, int]]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])),
            limit=100, sort=TaskRunSort.EXPECTED_START_TIME_ASC)
    return {r.name: (r.state.name if r.state else "", r.run_count) for r in runs
            if r.name.startswith("chunk")}


def test_rerun_after_mid_batch_failure_writes_every_row_exactly_once(
        pg_runtime: Runtime) -> None:
    runtime = pg_runtime
    ops = [{"method": "POST", "path": "/users", "idempotency_key": f"user-{i}",
            "body": {"id": i, "email": f"user{i}@example.com"}} for i in range(2000)]
    batch_id, _ = register_batch(runtime, ops, max_operations=10_000)

    first = process_batch(batch_id=batch_id, return_state=True)

    assert first.is_failed()
    batch = runtime.store.get_batch(batch_id)
    # A lost connection is transient: the batch is left processing, for the reaper to resume
    # once its heartbeat is stale, with the error that stopped it.
    assert batch.status == BatchState.PROCESSING.value and "chunk 2" in (batch.error or "")
    assert batch.completed == 1500
    assert [b for b, _, _ in runtime.store.stale_batches(timedelta(0))] == [batch_id]
    first_runs = _task_runs(batch.flow_run_id or "")
    assert first_runs["chunk 2 (items 1000-1499)"] == ("Failed", 2)  # retried once
    with runtime.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar() == 1500

    with runtime.store.engine.begin() as conn:
        disarm_fault(conn)
    second = process_batch(batch_id=batch_id, return_state=True)

    assert second.is_completed()
    second_runs = _task_runs(runtime.store.get_batch(batch_id).flow_run_id or "")
    assert second_runs["chunk 2 (items 1000-1499)"][0] == "Completed"
    assert sorted(name for name, (state, _) in second_runs.items() if state == "Cached") == [
        "chunk 0 (items 0-499)", "chunk 1 (items 500-999)", "chunk 3 (items 1500-1999)"]
    status = runtime.store.status(batch_id)
    assert (status.status, status.total, status.succeeded, status.failed) == (
        BatchState.COMPLETED, 2000, 2000, 0)
    results = list(runtime.store.results.of_batch(batch_id))
    assert [r.index for r in results] == list(range(2000))
    assert all(r.state is ItemState.SUCCEEDED and not r.replayed for r in results)
    with runtime.store.engine.connect() as conn:
        ids = [r[0] for r in conn.execute(sa.text("SELECT id FROM users ORDER BY id"))]
    assert ids == list(range(2000))
