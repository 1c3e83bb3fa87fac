"""The process_batch flow end to end: real Prefect test server, real SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.sorting import TaskRunSort

from batchops.errors import BatchTooLarge, ValidationFailed
from batchops.registration import register_batch
from batchops.runtime import Runtime
from batchops.schemas import BatchState, ItemResult, ItemState
from flows.process_batch import process_batch

pytestmark = pytest.mark.usefixtures("prefect_server")


def run(runtime: Runtime, ops: list[dict[str, Any]], **kwargs: Any) -> tuple[str, list[ItemResult]]:
    batch_id, _ = register_batch(runtime, ops, max_operations=100_000, **kwargs)
    process_batch(batch_id=batch_id)
    return batch_id, list(runtime.store.results.of_batch(batch_id))


def rows(runtime: Runtime, table: str) -> list[dict[str, Any]]:
    with runtime.store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(
            sa.text(f"SELECT * FROM {table} ORDER BY id")).mappings()]


def user(i: int, email: str | None = None) -> dict[str, Any]:
    return {"id": f"op{i}", "method": "POST", "path": "/users",
            "body": {"id": i, "email": email or f"user{i}@example.com", "name": f"User {i}"}}


def test_small_batch_succeeds_and_writes_every_row(runtime: Runtime) -> None:
    batch_id, results = run(runtime, [user(i) for i in range(1, 6)])

    assert [r.status for r in results] == [201] * 5
    assert results[0].result == {"id": 1, "email": "user1@example.com", "name": "User 1"}
    assert [u["email"] for u in rows(runtime, "users")] == [
        f"user{i}@example.com" for i in range(1, 6)]
    status = runtime.store.status(batch_id)
    assert (status.status, status.total, status.succeeded, status.failed, status.progress) == (
        BatchState.COMPLETED, 5, 5, 0, 1.0)
    assert status.started_at is not None and status.finished_at is not None


def test_thousand_item_batch_records_every_item_in_order(runtime: Runtime) -> None:
    batch_id, results = run(runtime, [user(i) for i in range(1000)])

    assert [r.index for r in results] == list(range(1000))
    assert all(r.state is ItemState.SUCCEEDED for r in results)
    assert len(rows(runtime, "users")) == 1000
    assert runtime.store.get_batch(batch_id).completed == 1000


def test_partial_failure_fails_exactly_the_bad_items(runtime: Runtime) -> None:
    ops = [user(i) for i in range(600)]
    dupes = {150, 420, 599}
    for i in dupes:  # reuse an earlier row's email: a unique violation, in another chunk too
        ops[i] = user(i, email=f"user{i - 100}@example.com")

    batch_id, results = run(runtime, ops)

    failed = {r.index for r in results if r.state is ItemState.FAILED}
    assert failed == dupes
    for r in results:
        if r.index in dupes:
            assert (r.status, r.error and r.error.code) == (409, "unique_violation")
            assert "email" in (r.error.message if r.error else "")
    summary = runtime.store.status(batch_id)
    assert (summary.status, summary.succeeded, summary.failed) == (BatchState.COMPLETED, 597, 3)
    assert len(rows(runtime, "users")) == 597


def test_validation_reports_every_error_and_runs_nothing(runtime: Runtime) -> None:
    ops = [
        user(1),
        {"id": "bad-method", "method": "FETCH", "path": "/users"},
        {"id": "escape", "method": "GET", "path": "/users/../secrets"},
        {"id": "host", "method": "POST", "path": "http://evil.example/users", "body": {}},
        {"id": "unknown", "method": "POST", "path": "/nowhere", "body": {}},
        {"id": "column", "method": "POST", "path": "/users",
         "body": {"id": 7, "email": "x@example.com", "nickname": "x"}},
        {"id": "type", "method": "POST", "path": "/users", "body": {"id": "seven", "email": 5}},
        {"id": "missing", "method": "POST", "path": "/users", "body": {"id": 8}},
        {"id": "op1", "method": "DELETE", "path": "/users/1"},  # duplicate id
    ]
    with pytest.raises(ValidationFailed) as caught:
        register_batch(runtime, ops)

    errors = {(e.index, e.field) for e in caught.value.errors}
    assert {(1, "method"), (2, "path"), (3, "path"), (4, "path"), (5, "body.nickname"),
            (6, "body.id"), (6, "body.email"), (7, "body.email"), (8, "id")} <= errors
    assert all(e.message for e in caught.value.errors)
    assert caught.value.code == "validation_failed"
    assert rows(runtime, "users") == []
    with runtime.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM batches")).scalar() == 0


def test_more_than_the_limit_is_rejected(runtime: Runtime) -> None:
    with pytest.raises(BatchTooLarge) as caught:
        register_batch(runtime, [user(i) for i in range(1001)])
    assert (caught.value.code, caught.value.http_status, caught.value.limit) == (
        "batch_too_large", 413, 1000)
    _, total = register_batch(runtime, [user(i) for i in range(1000)])
    assert total == 1000


def test_mixed_resource_batch(runtime: Runtime) -> None:
    with runtime.store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO products (id, name, price) VALUES (456, 'lamp', 9.5)"))
    ops = [
        {"id": "u", "method": "POST", "path": "/users",
         "body": {"email": "ann@example.com", "name": "Ann"}},
        {"id": "o", "method": "PUT", "path": "/orders/123",
         "body": {"status": "paid", "total": 12.5}},
        {"id": "p", "method": "DELETE", "path": "/products/456"},
        {"id": "o2", "method": "PATCH", "path": "/orders/123", "body": {"status": "shipped"}},
        {"id": "g", "method": "GET", "path": "/orders/123"},
        {"id": "p2", "method": "DELETE", "path": "/products/456"},
    ]
    _, results = run(runtime, ops)

    by_id = {r.id: r for r in results}
    assert by_id["u"].status == 201 and by_id["u"].result["email"] == "ann@example.com"
    assert isinstance(by_id["u"].result["id"], int)
    assert (by_id["o"].status, by_id["o"].result) == (
        201, {"id": 123, "status": "paid", "total": 12.5})
    assert by_id["p"].status == 204
    assert by_id["o2"].result == {"id": 123, "status": "shipped", "total": 12.5}
    assert by_id["g"].result == {"id": 123, "status": "shipped", "total": 12.5}
    assert (by_id["p2"].status, by_id["p2"].error and by_id["p2"].error.code) == (
        404, "not_found")
    assert rows(runtime, "products") == []
    assert [(o["id"], o["status"]) for o in rows(runtime, "orders")] == [(123, "shipped")]


def test_same_record_across_chunks_keeps_batch_order(configure, database_url: str) -> None:
    runtime = configure(database_url=database_url, chunk_size=2)
    ops = [user(1), user(2), user(3),
           {"method": "PATCH", "path": "/users/1", "body": {"name": "first"}},
           {"method": "DELETE", "path": "/users/2"},
           {"method": "PATCH", "path": "/users/1", "body": {"name": "second"}},
           user(4, email="user2@example.com")]  # free only after the DELETE
    _, results = run(runtime, ops)

    assert [r.status for r in results] == [201, 201, 201, 200, 204, 200, 201]
    assert {u["id"]: u["name"] for u in rows(runtime, "users")} == {
        1: "second", 3: "User 3", 4: "User 4"}


def test_idempotent_replay_within_and_across_batches(runtime: Runtime) -> None:
    op = {"method": "POST", "path": "/users", "idempotencyKey": "create-ann",
          "body": {"id": 1, "email": "ann@example.com"}}
    _, first = run(runtime, [op])
    _, second = run(runtime, [op, {**op, "id": "again"}])

    assert (first[0].status, first[0].replayed) == (201, False)
    assert [(r.status, r.replayed, r.result) for r in second] == [
        (201, True, first[0].result), (201, True, first[0].result)]
    assert len(rows(runtime, "users")) == 1


def test_same_key_with_a_different_payload_fails_and_does_not_run(runtime: Runtime) -> None:
    run(runtime, [{"method": "POST", "path": "/users", "idempotency_key": "k1",
                   "body": {"id": 1, "email": "ann@example.com"}}])
    _, results = run(runtime, [{"method": "POST", "path": "/users", "idempotency_key": "k1",
                                "body": {"id": 2, "email": "bob@example.com"}}])

    assert (results[0].status, results[0].error and results[0].error.code) == (
        409, "idempotency_key_reused")
    assert [u["id"] for u in rows(runtime, "users")] == [1]


def test_failed_items_are_not_cached_and_run_again(runtime: Runtime) -> None:
    op = {"method": "POST", "path": "/users", "idempotency_key": "k-fail",
          "body": {"id": 2, "email": "taken@example.com"}}
    run(runtime, [user(1, email="taken@example.com")])
    _, failed = run(runtime, [op])
    assert failed[0].error is not None and failed[0].error.code == "unique_violation"

    with runtime.store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM users"))
    _, retried = run(runtime, [op])
    assert (retried[0].status, retried[0].replayed) == (201, False)


def test_expired_idempotency_records_run_again(configure, database_url: str) -> None:
    runtime = configure(database_url=database_url, idempotency_retention_hours=1)
    op = {"method": "PUT", "path": "/orders/5", "idempotency_key": "k-exp",
          "body": {"status": "new"}}
    run(runtime, [op])
    with runtime.store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE idempotency_records SET expires_at = created_at"))
    _, again = run(runtime, [op])
    assert (again[0].status, again[0].replayed) == (200, False)


@pytest.mark.parametrize("concurrency", [3, 10])
def test_concurrency_limit_is_respected_for_5000_emails(configure, database_url: str,
                                                        concurrency: int) -> None:
    runtime = configure(database_url=database_url)
    ops = [{"id": f"m{i}", "method": "POST", "path": "/emails",
            "body": {"to": f"reader{i}@example.com", "name": f"Reader {i}",
                     "send_latency": 0.003}} for i in range(5000)]
    _, results = run(runtime, ops, concurrency=concurrency)

    assert len(results) == 5000 and all(r.status == 201 for r in results)
    assert results[42].result["recipient"] == "reader42@example.com"
    assert results[42].result["subject"] == "Welcome, Reader 42!"
    outbox = rows(runtime, "outbox")
    assert len(outbox) == 5000
    # In-flight sends seen from the rows: the most start/finish intervals overlapping at once.
    events = sorted([(o["started_at"], 1) for o in outbox] + [(o["finished_at"], -1)
                                                              for o in outbox])
    in_flight = peak = 0
    for _, step in events:
        in_flight += step
        peak = max(peak, in_flight)
    assert 2 <= peak <= concurrency


def test_handler_errors_become_item_results(runtime: Runtime) -> None:
    ops = [{"method": "POST", "path": "/emails", "body": {"to": "a@example.com"}},
           {"method": "POST", "path": "/emails",
            "body": {"to": "b@example.com", "template": "nope"}},
           {"method": "POST", "path": "/emails",
            "body": {"to": "c@example.com", "template": "promo"}}]  # needs $code
    batch_id, results = run(runtime, ops)

    assert [(r.status, r.error and r.error.code) for r in results] == [
        (201, None), (422, "unknown_template"), (422, "missing_template_var")]
    assert runtime.store.status(batch_id).status is BatchState.COMPLETED


def test_flow_run_task_runs_and_artifacts_show_every_item(runtime: Runtime) -> None:
    ops = [user(i) for i in range(700)] + [user(700, email="user1@example.com")]
    batch_id, _ = register_batch(runtime, ops)
    state = process_batch(batch_id=batch_id, return_state=True)
    assert state.is_completed()
    flow_run_id = UUID(runtime.store.get_batch(batch_id).flow_run_id or "")

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=100,
            sort=TaskRunSort.EXPECTED_START_TIME_ASC)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
                any_=[flow_run_id])))

    assert flow_run.name == f"batch-{batch_id}"
    chunk_names = sorted(t.name for t in task_runs if t.name.startswith("chunk"))
    assert chunk_names == ["chunk 0 (items 0-499)", "chunk 1 (items 500-700)"]
    by_type: dict[str, list[Any]] = {}
    for a in artifacts:
        by_type.setdefault(a.type or "", []).append(a)
    assert by_type["progress"][-1].data == 100.0
    table = by_type["table"][0].data
    table_rows = __import__("json").loads(table) if isinstance(table, str) else table
    assert len(table_rows) == 701
    last = table_rows[-1]
    assert (last["index"], last["state"], last["status"]) == (700, "failed", 409)
    assert last["error"].startswith("unique_violation")
    assert "| 701 | 700 | 1 |" in by_type["markdown"][0].data


def test_flow_started_with_operations_registers_its_own_batch(runtime: Runtime) -> None:
    summary = process_batch(operations=[user(1), user(2)], concurrency=2)
    assert (summary.total, summary.succeeded, summary.failed) == (2, 2, 0)
    assert len(rows(runtime, "users")) == 2
