"""The reaper's housekeeping: expired idempotency records and leftover claims are deleted,
what is still in use stays. On SQLite and PostgreSQL, through the reaper flow on the Prefect
test server."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from batchops.batch_requests import BatchRequests, batch_requests
from batchops.registration import register_batch
from batchops.runtime import Runtime
from batchops.schemas import BatchState, ItemResult, ItemState, PlannedOperation
from batchops.tables import idempotency_records, item_claims
from flows.process_batch import process_batch
from flows.reaper import reap_stale_batches

pytestmark = pytest.mark.usefixtures("prefect_server")


def _users(tag: str, n: int) -> list[dict[str, Any]]:
    return [{"method": "POST", "path": "/users", "idempotency_key": f"{tag}-{i}",
             "body": {"email": f"{tag}-{i}@example.com"}} for i in range(n)]


def _operations(runtime: Runtime, batch_id: str) -> list[PlannedOperation]:
    [(ref, _)] = runtime.store.chunks.plan(batch_id)
    return runtime.store.chunks.operations(batch_id, ref.chunk_index)


def _keys(runtime: Runtime, table: sa.Table) -> set[str]:
    with runtime.store.read() as conn:
        return set(conn.execute(sa.select(table.c.key)).scalars())


def test_the_reaper_purges_expired_records_and_claims_of_long_finished_batches(
        runtime: Runtime) -> None:
    store = runtime.store
    done, _ = register_batch(runtime, _users("done", 2))
    waiting, _ = register_batch(runtime, _users("waiting", 2))
    for batch_id in (done, waiting):  # both claimed their keys; `done` then died and failed
        store.idempotency.claim("default", batch_id, _operations(runtime, batch_id),
                         timedelta(seconds=60))
    runtime.lifecycle.start(done, None)
    runtime.lifecycle.finish(done, BatchState.FAILED, "chunk 0: the database went away")
    ops = _operations(runtime, done)
    with store.engine.begin() as conn:
        for op, retention in zip(ops, (timedelta(seconds=-1), timedelta(hours=1)), strict=True):
            store.idempotency.save(conn, "default", done, [(op, ItemResult(
                id=op.id, index=op.index, status=201, state=ItemState.SUCCEEDED))], retention)
    requests = BatchRequests(store, timedelta(hours=1))
    with store.engine.begin() as conn:
        assert requests.claim(conn, "default", "fresh-request", "h1", done, "async") is None
        assert BatchRequests(store, timedelta(seconds=-1)).claim(
            conn, "default", "old-request", "h2", waiting, "async") is None
    time.sleep(0.2)

    assert reap_stale_batches(stale_after_seconds=0.1) == []

    assert _keys(runtime, idempotency_records) == {"done-1"}  # done-0 had expired
    assert _keys(runtime, item_claims) == {"waiting-0", "waiting-1"}  # still queued: kept
    assert _keys(runtime, batch_requests) == {"fresh-request"}
    # A key whose record expired is new again: the next batch executes it.
    again, _ = register_batch(runtime, _users("done", 1))
    process_batch(batch_id=again)
    [result] = store.results.of_batch(again)
    assert (result.state, result.replayed) == (ItemState.SUCCEEDED, False)
