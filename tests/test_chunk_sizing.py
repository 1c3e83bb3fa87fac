"""Chunks sized by work: few task runs per batch, statements in pages of 500 rows, progress
that moves during a long chunk."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)

from batchops.registration import register_batch
from batchops.runtime import Runtime
from batchops.schemas import BatchState, ItemState
from batchops.targets.sql import split_runs
from batchops.validation import validate_operations
from flows.process_batch import process_batch

pytestmark = pytest.mark.usefixtures("prefect_server")


def user(i: int) -> dict[str, Any]:
    return {"id": f"u{i}", "method": "POST", "path": "/users",
            "body": {"id": i, "email": f"user{i}@example.com"}}


def email(i: int, latency: float = 0.002) -> dict[str, Any]:
    return {"id": f"e{i}", "method": "POST", "path": "/emails",
            "body": {"to": f"r{i}@example.com", "send_latency": latency}}


def chunk_sizes(runtime: Runtime, batch_id: str) -> list[int]:
    return [ref.end - ref.start for ref, _ in runtime.store.chunks.plan(batch_id)]


def test_a_large_sql_batch_runs_in_a_few_chunk_task_runs(runtime: Runtime) -> None:
    batch_id, _ = register_batch(runtime, [user(i) for i in range(12_000)],
                                 max_operations=100_000)
    state = process_batch(batch_id=batch_id, return_state=True)

    assert state.is_completed()
    flow_run_id = UUID(runtime.store.get_batch(batch_id).flow_run_id or "")
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run_id])), limit=200)
    chunk_runs = [t for t in task_runs if t.name.startswith("chunk")]
    # 4 chunk threads: about 4 chunks per thread, not one per 500 items (24).
    assert 2 <= len(chunk_runs) <= 16
    assert all(t.state is not None and t.state.is_completed() for t in chunk_runs)
    status = runtime.store.status(batch_id)
    assert (status.status, status.succeeded, status.failed) == (BatchState.COMPLETED, 12_000, 0)
    with runtime.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar() == 12_000


def test_a_streamed_batch_gets_chunks_of_about_two_seconds_of_work(runtime: Runtime) -> None:
    # A generator (a CSV import streams like this): the size is not known up front, so each
    # chunk is cut at about 2 s of estimated work: 1,000 handler calls, 10,000 sql writes.
    def ops() -> Iterator[dict[str, Any]]:
        yield from (email(i) for i in range(2_500))

    emails, _ = register_batch(runtime, ops(), max_operations=100_000)
    users, _ = register_batch(runtime, (user(i) for i in range(25_000)),
                              max_operations=100_000)

    assert chunk_sizes(runtime, emails) == [1_000, 1_000, 500]
    assert chunk_sizes(runtime, users) == [10_000, 10_000, 5_000]


def test_a_fixed_chunk_size_still_wins(configure, database_url: str) -> None:
    runtime: Runtime = configure(database_url=database_url, chunk_size=300)
    batch_id, _ = register_batch(runtime, [user(i) for i in range(1_000)])

    assert chunk_sizes(runtime, batch_id) == [300, 300, 300, 100]


def test_sql_statements_take_pages_of_at_most_500_rows(runtime: Runtime) -> None:
    planned = validate_operations([user(i) for i in range(1_200)], runtime.router, 10_000)

    pages = list(split_runs(planned, runtime.resources))

    assert [len(p) for p in pages] == [500, 500, 200]
    assert [op.index for p in pages for op in p] == list(range(1_200))


def test_progress_moves_during_a_long_chunk(runtime: Runtime) -> None:
    # Three chunks (500, 500, 200 items) of 10 ms sends, three items of each in flight: each
    # chunk takes seconds, so the progress artifact must move from the chunks' checkpoints
    # before any chunk ends, not only to the sums of whole chunks.
    batch_id, _ = register_batch(runtime, [email(i, latency=0.01) for i in range(1_200)],
                                 concurrency=10, max_operations=10_000)
    assert chunk_sizes(runtime, batch_id) == [500, 500, 200]
    seen: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        key = f"batch-{batch_id}-progress"
        with get_client(sync_client=True) as client:
            while not stop.is_set():
                found = client.read_artifacts(
                    artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
                seen.extend(float(a.data) for a in found  # type: ignore[arg-type]
                            if isinstance(a.data, (int, float)))
                stop.wait(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        state = process_batch(batch_id=batch_id, return_state=True)
    finally:
        stop.set()
        watcher.join()

    assert state.is_completed()
    results = list(runtime.store.results.of_batch(batch_id))
    assert [r.state for r in results] == [ItemState.SUCCEEDED] * 1_200
    whole_chunks = {100.0 * n / 1_200 for n in (0, 200, 500, 700, 1_000, 1_200)}
    between = sorted({round(v, 3) for v in seen} - {round(v, 3) for v in whole_chunks})
    assert between, f"progress only moved at chunk ends: {sorted(set(seen))}"
    assert seen == sorted(seen), "progress went backwards"
