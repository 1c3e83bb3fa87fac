"""Dependencies between operations: ``depends_on``, ``$ref`` to earlier results, waves."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from batchops.errors import ValidationFailed
from batchops.registration import register_batch
from batchops.runtime import Runtime
from batchops.schemas import BatchState, ItemResult, ItemState
from flows.process_batch import process_batch
from tests.test_api import api, start_api  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("prefect_server")


def email(op_id: str, latency: float = 0.0, *, to: Any = None, template: str = "welcome",
          depends_on: list[str] | None = None, **vars: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"id": op_id, "method": "POST", "path": "/emails",
                          "body": {"to": to or f"{op_id}@x.io", "send_latency": latency,
                                   "template": template}}
    if vars:
        op["body"]["vars"] = vars
    if depends_on:
        op["depends_on"] = depends_on
    return op


def user(i: int, op_id: str | None = None) -> dict[str, Any]:
    return {"id": op_id or f"u{i}", "method": "POST", "path": "/users",
            "body": {"id": i, "email": f"user{i}@x.io", "name": f"User {i}"}}


def run(runtime: Runtime, ops: list[dict[str, Any]], **kwargs: Any,
        ) -> tuple[str, dict[str, ItemResult]]:
    batch_id, _ = register_batch(runtime, ops, **kwargs)
    process_batch(batch_id=batch_id)
    return batch_id, {r.id or str(r.index): r for r in runtime.store.results.of_batch(batch_id)}


def sends(runtime: Runtime) -> dict[str, tuple[datetime, datetime]]:
    """Recipient → (started, finished) of every email sent."""
    outbox = runtime.resources["outbox"].table
    with runtime.store.engine.connect() as conn:
        rows = conn.execute(sa.select(outbox.c.recipient, outbox.c.started_at,
                                      outbox.c.finished_at)).all()

    def aware(t: datetime) -> datetime:
        return t if t.tzinfo else t.replace(tzinfo=UTC)

    return {r.recipient: (aware(r.started_at), aware(r.finished_at)) for r in rows}


def test_within_a_chunk_dependents_wait_and_independent_items_run_in_parallel(
        runtime: Runtime) -> None:
    ops = [email("a", 0.6), email("b", 0.1, depends_on=["a"]), email("c", 0.6),
           email("d", 0.6), email("e", 0.1, depends_on=["b", "c"])]
    batch_id, results = run(runtime, ops, concurrency=4)

    assert all(r.state is ItemState.SUCCEEDED for r in results.values())
    t = sends(runtime)
    assert t["b@x.io"][0] >= t["a@x.io"][1]  # b started once a had finished
    assert t["e@x.io"][0] >= max(t["b@x.io"][1], t["c@x.io"][1])
    # a, c and d depend on nothing: they ran at the same time.
    assert max(t[k][0] for k in ("a@x.io", "c@x.io", "d@x.io")) < min(
        t[k][1] for k in ("a@x.io", "c@x.io", "d@x.io"))
    assert runtime.store.status(batch_id).status is BatchState.COMPLETED


def test_across_chunks_a_dependent_waits_for_its_dependency(
        configure: Callable[..., Runtime], database_url: str) -> None:
    runtime = configure(database_url=database_url, chunk_size=2)
    # "late" is in chunk 2, its dependency in chunk 0; chunk 1 is independent.
    ops = [email("first", 0.8), email("x1"), email("x2"), email("x3"),
           email("late", depends_on=["first"])]
    _, results = run(runtime, ops, concurrency=8)

    assert all(r.state is ItemState.SUCCEEDED for r in results.values())
    t = sends(runtime)
    assert t["late@x.io"][0] >= t["first@x.io"][1]
    assert t["x2@x.io"][0] < t["first@x.io"][1]  # the independent chunk did not wait


def test_refs_take_values_from_earlier_results_in_this_and_earlier_chunks(
        configure: Callable[..., Runtime], database_url: str) -> None:
    runtime = configure(database_url=database_url, chunk_size=3)
    ops = [
        user(7),
        {"id": "o1", "method": "PUT", "path": "/orders/1",
         "body": {"status": {"$ref": "u7.result.email"}, "total": 3}},
        email("greet", to={"$ref": "u7.result.email"}, name={"$ref": "u7.result.name"}),
        # Chunk 1: an order whose id is the user's, and one named after the first order.
        {"id": "o2", "method": "POST", "path": "/orders",
         "body": {"id": {"$ref": "u7.result.id"}, "status": "new"}},
        {"id": "p1", "method": "POST", "path": "/products",
         "body": {"id": 5, "name": {"$ref": "o1.result.status"}, "price": 1}},
    ]
    batch_id, results = run(runtime, ops)

    assert {k: r.status for k, r in results.items()} == {
        "u7": 201, "o1": 201, "greet": 201, "o2": 201, "p1": 201}
    assert results["o2"].result["id"] == 7
    assert results["p1"].result["name"] == "user7@x.io"
    assert results["greet"].result["recipient"] == "user7@x.io"
    with runtime.store.engine.connect() as conn:
        orders = conn.execute(sa.text("SELECT id, status FROM orders ORDER BY id")).all()
        subject = conn.execute(sa.text("SELECT subject FROM outbox")).scalar_one()
    assert [tuple(o) for o in orders] == [(1, "user7@x.io"), (7, "new")]
    assert subject == "Welcome, User 7!"
    # The stored operation keeps its reference (a retry resolves it again).
    [stored] = [op for op in runtime.store.chunks.operations(batch_id, 1) if op.id == "o2"]
    assert stored.body == {"id": {"$ref": "u7.result.id"}, "status": "new"}


def test_a_failed_dependency_fails_its_dependents_and_a_retry_runs_them(
        configure: Callable[..., Runtime], database_url: str) -> None:
    runtime = configure(database_url=database_url, chunk_size=3)
    with runtime.store.engine.begin() as conn:  # u1's email is taken: its insert fails
        conn.execute(sa.text("INSERT INTO users (id, email) VALUES (100, 'user1@x.io')"))
    ops = [
        user(1),
        email("welcome", to={"$ref": "u1.result.email"}),
        email("free"),  # independent: runs
        email("after", depends_on=["welcome"]),  # another chunk, a dependent's dependent
        email("bad", template="nope"),
        email("after-bad", depends_on=["bad"]),
    ]
    batch_id, results = run(runtime, ops)

    assert (results["u1"].status, results["u1"].error and results["u1"].error.code) == (
        409, "unique_violation")
    for name in ("welcome", "after", "after-bad"):
        r = results[name]
        assert (r.state, r.status, r.error and r.error.code) == (
            ItemState.FAILED, 424, "dependency_failed"), name
    assert "'u1'" in (results["welcome"].error.message if results["welcome"].error else "")
    assert results["free"].state is ItemState.SUCCEEDED
    assert set(sends(runtime)) == {"free@x.io"}
    status = runtime.store.status(batch_id)
    assert (status.status, status.succeeded, status.failed) == (BatchState.COMPLETED, 1, 5)

    with runtime.store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM users WHERE id = 100"))
    assert runtime.lifecycle.retry(batch_id) == 5
    process_batch(batch_id=batch_id)
    again = {r.id: r for r in runtime.store.results.of_batch(batch_id)}
    assert {k: r.status for k, r in again.items()} == {
        "u1": 201, "welcome": 201, "free": 201, "after": 201, "bad": 422, "after-bad": 424}
    assert set(sends(runtime)) == {"free@x.io", "user1@x.io", "after@x.io"}


def test_a_ref_that_does_not_resolve_fails_its_item(runtime: Runtime) -> None:
    ops = [user(1), email("missing", to={"$ref": "u1.result.phone"}),
           email("wrong-type", to={"$ref": "u1.result.id"}),
           email("ok", to={"$ref": "u1.result.email"})]
    _, results = run(runtime, ops)

    missing, wrong = results["missing"], results["wrong-type"]
    assert (missing.status, missing.error and missing.error.code) == (422, "ref_unresolved")
    assert "phone" in (missing.error.message if missing.error else "")
    assert (wrong.status, wrong.error and wrong.error.code) == (422, "invalid_value")
    assert results["ok"].status == 201


def test_unknown_ids_later_ids_and_cycles_are_validation_errors(runtime: Runtime) -> None:
    ops = [
        email("a", depends_on=["c"]),             # a → c → b → a
        email("b", depends_on=["a", "nobody"]),
        email("c", depends_on=["b"]),
        email("self", depends_on=["self"]),
        email("early", to={"$ref": "late.result.recipient"}),  # names a later operation
        email("late"),
        email("ghost", to={"$ref": "ghost-op.result.email"}),
        email("malformed", to={"$ref": "no-result-part"}),
    ]
    with pytest.raises(ValidationFailed) as caught:
        register_batch(runtime, ops)

    errors = {(e.id, e.field): e.message for e in caught.value.errors}
    assert set(errors) == {("a", "depends_on"), ("b", "depends_on"), ("self", "depends_on"),
                           ("early", "body.to"), ("ghost", "body.to"),
                           ("malformed", "body.to")}
    assert errors[("a", "depends_on")] == "dependency cycle: 'a' → 'c' → 'b' → 'a'"
    assert "'nobody'" in errors[("b", "depends_on")]
    assert "itself" in errors[("self", "depends_on")]
    assert "later" in errors[("early", "body.to")]
    assert "'ghost-op'" in errors[("ghost", "body.to")]
    with runtime.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM batches")).scalar() == 0


def test_api_runs_dependencies_and_rejects_cycles(api: httpx.Client) -> None:  # noqa: F811
    answer = api.post("/batches", json={"mode": "sync", "operations": [
        {"id": "u1", "method": "POST", "path": "/users",
         "body": {"id": 1, "email": "ann@x.io", "name": "Ann"}},
        {"id": "o1", "method": "POST", "path": "/orders",
         "body": {"id": {"$ref": "u1.result.id"}, "status": "new"}},
        {"id": "dup", "method": "POST", "path": "/users", "body": {"id": 2, "email": "ann@x.io"}},
        {"id": "o2", "method": "POST", "path": "/orders", "dependsOn": ["dup"],
         "body": {"id": 2, "status": "new"}},
    ]})
    assert answer.status_code == 207, answer.text
    items = {r["id"]: r for r in answer.json()["results"]}
    assert (items["o1"]["status"], items["o1"]["result"]["id"]) == (201, 1)
    assert (items["dup"]["status"], items["o2"]["status"]) == (409, 424)
    assert items["o2"]["error"]["code"] == "dependency_failed"

    refused = api.post("/batches", json={"operations": [
        {"id": "a", "method": "GET", "path": "/users/1", "depends_on": ["b"]},
        {"id": "b", "method": "GET", "path": "/users/1", "depends_on": ["a"]},
        {"id": "c", "method": "GET", "path": "/users/1", "depends_on": ["zz"]},
    ]})
    assert refused.status_code == 422
    listed = [(e["index"], e["id"], e["field"]) for e in refused.json()["error"]["errors"]]
    assert listed == [(0, "a", "depends_on"), (2, "c", "depends_on")]
