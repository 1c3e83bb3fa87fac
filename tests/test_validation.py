"""Validation and planning: every error at once, and chunks ordered only where they must be."""

from __future__ import annotations

from typing import Any

import pytest

from batchops.errors import BatchTooLarge, ValidationFailed
from batchops.planning import ChunkSizing, chunk_operations
from batchops.resources import build_resources
from batchops.routing import Router
from batchops.settings import Settings
from batchops.validation import validate_operations


@pytest.fixture(scope="module")
def router() -> Router:
    from batchops.handlers import load_handler_modules, registry

    settings = Settings(database_url="sqlite://", demo=True)
    load_handler_modules(settings.handler_modules)
    return Router(build_resources(settings.resources), registry.all())


def errors_of(router: Router, ops: list[Any]) -> set[tuple[int | None, str]]:
    with pytest.raises(ValidationFailed) as caught:
        validate_operations(ops, router, 1000)
    return {(e.index, e.field) for e in caught.value.errors}


def test_camel_case_aliases_and_numeric_ids_are_accepted(router: Router) -> None:
    [op] = validate_operations([{"id": 7, "method": "put", "path": "/orders/1",
                                 "idempotencyKey": "k", "body": {"status": "new"}}], router, 10)
    assert (op.id, op.method, op.idempotency_key, op.target, op.resource, op.params) == (
        "7", "PUT", "k", "sql", "orders", {"id": "1"})


def test_shape_errors_name_the_field(router: Router) -> None:
    assert errors_of(router, [
        {"method": "POST"},                                   # no path
        "not an object",
        {"method": "GET", "path": "/users/1", "extra": 1},    # unknown member
        {"method": "GET", "path": "/users/x"},                # key is not an integer
        {"method": "GET", "path": "/users/1", "body": {"a": 1}},
        {"method": "PATCH", "path": "/users/1", "body": {}},
        {"method": "PUT", "path": "/users", "body": {"email": "a@b.c"}},  # PUT on collection
        {"method": "PATCH", "path": "/users/1", "body": {"id": 2}},       # pk differs
        {"method": "POST", "path": "/users?x=1", "body": {"email": "a@b.c"}},
        {"method": "POST", "path": "/users/%2e%2e/x", "body": {}},
        {"method": "POST", "path": "//evil.example/users", "body": {}},
    ]) == {(0, "path"), (1, "operation"), (2, "extra"), (3, "path"), (4, "body"), (5, "body"),
           (6, "path"), (7, "body.id"), (8, "path"), (9, "path"), (10, "path")}


def test_handler_bodies_are_checked_against_their_model(router: Router) -> None:
    assert errors_of(router, [{"method": "POST", "path": "/emails", "body": {"to": "nope"}},
                              {"method": "POST", "path": "/emails", "body": {}}]) == {
        (0, "body.to"), (1, "body.to")}


def test_reusing_a_key_in_one_batch_with_another_payload_is_an_error(router: Router) -> None:
    ops = [{"method": "DELETE", "path": "/users/1", "idempotency_key": "k"},
           {"method": "DELETE", "path": "/users/2", "idempotency_key": "k"},
           {"method": "DELETE", "path": "/users/1", "idempotency_key": "k"}]
    assert errors_of(router, ops) == {(1, "idempotency_key")}


def test_the_limit_is_checked_before_validating_everything(router: Router) -> None:
    with pytest.raises(BatchTooLarge):
        validate_operations(({"method": "GET", "path": "/users/1"} for _ in range(11)),
                            router, 10)


def test_chunks_wait_only_for_chunks_touching_the_same_records(router: Router) -> None:
    ops = validate_operations([
        {"method": "POST", "path": "/users", "body": {"id": 1, "email": "a@x.io"}},   # chunk 0
        {"method": "POST", "path": "/users", "body": {"id": 2, "email": "b@x.io"}},
        {"method": "POST", "path": "/users", "body": {"id": 3, "email": "c@x.io"}},   # chunk 1
        {"method": "PUT", "path": "/orders/9", "body": {"status": "x"}},
        {"method": "PATCH", "path": "/users/1", "body": {"name": "n"}},             # chunk 2
        {"method": "POST", "path": "/emails", "body": {"to": "a@x.io"}},
        {"method": "POST", "path": "/users", "body": {"id": 4, "email": "c@x.io"}},   # chunk 3
        {"method": "DELETE", "path": "/products/1"},
    ], router, 100)
    plans = list(chunk_operations("b", ops, ChunkSizing(items=2), router.resources))
    assert [p.depends_on for p in plans] == [[], [], [0], [1]]
    assert [(p.ref.start, p.ref.end) for p in plans] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert len({p.ref.cache_token for p in plans}) == 4


def _ledger(dialect_url: str) -> Router:
    from batchops.settings import ResourceSpec

    spec = ResourceSpec(columns={"id": {"type": "bigint", "nullable": False},
                                 "amount": {"type": "numeric", "precision": 6, "scale": 2},
                                 "free": {"type": "numeric"}})
    return Router(build_resources({"ledger": spec}, dialect_url), [])


def messages_of(router: Router, ops: list[Any]) -> list[str]:
    with pytest.raises(ValidationFailed) as caught:
        validate_operations(ops, router, 1000)
    return [e.message for e in caught.value.errors]


@pytest.mark.parametrize("url", ["sqlite://", "postgresql://db/x"])
def test_bigint_columns_hold_64_bit_integers(url: str) -> None:
    router = _ledger(url)
    ok = [{"method": "PUT", "path": f"/ledger/{key}", "body": {"amount": 1}}
          for key in (2**63 - 1, -(2**63))]
    assert len(validate_operations(ok, router, 10)) == 2

    [message] = messages_of(router, [{"method": "GET", "path": f"/ledger/{2**63}"}])
    assert f"from {-(2**63)} to {2**63 - 1}" in message


@pytest.mark.parametrize("url", ["sqlite://", "postgresql://db/x"])
def test_a_declared_precision_and_scale_bound_numeric_values(url: str) -> None:
    router = _ledger(url)
    fits = ["9999.99", 1234, "-0.5", "0012.30"]
    assert len(validate_operations([{"method": "PUT", "path": f"/ledger/{i}",
                                     "body": {"amount": v}} for i, v in enumerate(fits)],
                                   router, 10)) == 4

    for value in ("10000", 12345.6, "1.234", 10**30):
        [message] = messages_of(router, [{"method": "PUT", "path": "/ledger/1",
                                          "body": {"amount": value}}])
        assert "numeric(6, 2) holds at most 4 digit(s) before the point and 2 after" in message


def test_an_undeclared_numeric_takes_what_the_database_stores_exactly() -> None:
    exact_on_both = {"method": "PUT", "path": "/ledger/1", "body": {"free": "12345.678"}}
    huge = {"method": "PUT", "path": "/ledger/1", "body": {"free": 10**30}}
    for url in ("sqlite://", "postgresql://db/x"):
        assert validate_operations([exact_on_both], _ledger(url), 10)
    assert validate_operations([huge], _ledger("postgresql://db/x"), 10)
    [message] = messages_of(_ledger("sqlite://"), [huge])
    assert "cannot be stored exactly" in message
