"""The sql target on real databases (SQLite and PostgreSQL): per-item results and table rows."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from batchops.demo.resources import demo_resources
from batchops.jsonable import row_to_json
from batchops.runtime import Runtime
from batchops.schemas import ItemResult
from batchops.targets import ChunkContext
from batchops.targets.sql import SqlTarget
from batchops.validation import validate_operations


def target_of(runtime: Runtime) -> SqlTarget:
    target = runtime.targets["sql"]
    assert isinstance(target, SqlTarget)
    return target


def execute(runtime: Runtime, raw_ops: list[dict[str, Any]],
            chunk_size: int = 500) -> list[ItemResult]:
    """Validate the operations and run them in chunks, in one transaction (as a flow would)."""
    planned = validate_operations(raw_ops, runtime.router, 100_000)
    results: list[ItemResult] = []
    with runtime.store.engine.begin() as conn:
        for start in range(0, len(planned), chunk_size):
            results += target_of(runtime).execute_on(conn, planned[start:start + chunk_size])
    assert [r.index for r in results] == list(range(len(raw_ops)))
    return results


def rows(runtime: Runtime, table: str) -> list[dict[str, Any]]:
    with runtime.store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(
            sa.text(f"SELECT * FROM {table} ORDER BY id")).mappings()]


def insert_rows(runtime: Runtime, table: str, values: list[dict[str, Any]]) -> None:
    cols = list(values[0])
    with runtime.store.engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {table} ({', '.join(cols)}) VALUES "
                             f"({', '.join(':' + c for c in cols)})"), values)


def outcome(r: ItemResult) -> tuple[Any, ...]:
    return (r.status, r.state.value, r.error.code if r.error else None, r.result)


class StatementCounter:
    """Counts the statements sent to the database (savepoints included)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.count = 0

    def _seen(self, *args: Any) -> None:
        self.count += 1

    def __enter__(self) -> StatementCounter:
        sa.event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._seen)


def unique_message(dialect: str, column: str, value: Any) -> str:
    if dialect == "sqlite":
        return f"UNIQUE constraint failed: users.{column}"
    constraint = "users_pkey" if column == "id" else f"users_{column}_key"
    return (f'duplicate key value violates unique constraint "{constraint}" '
            f"(Key ({column})=({value}) already exists.)")


# -- inserts ----------------------------------------------------------------------------------

def test_bulk_insert_with_one_percent_duplicates_fails_exactly_the_duplicates(
        runtime: Runtime) -> None:
    insert_rows(runtime, "users", [{"id": 9000, "email": "taken@x.io", "name": "Old"}])
    n = 2000
    emails = [f"user{i}@x.io" for i in range(n)]
    duplicates: dict[int, str] = {}
    for i in range(50, n, 100):  # 1 %: an email used earlier in the batch, even in an earlier chunk
        emails[i] = emails[i - 437 if i > 437 else i - 37]
        duplicates[i] = emails[i]
    for i in (777, 1999):  # and one already in the table
        emails[i] = duplicates[i] = "taken@x.io"
    ops = [{"method": "POST", "path": "/users",
            "body": {"id": i + 1, "email": emails[i], "name": f"N{i}"}} for i in range(n)]

    with StatementCounter(runtime.store.engine) as counter:
        results = execute(runtime, ops)

    dialect = runtime.store.engine.dialect.name
    for i, r in enumerate(results):
        if i in duplicates:
            assert outcome(r) == (409, "failed", "unique_violation", None), i
            assert r.error is not None
            assert r.error.message == unique_message(dialect, "email", duplicates[i])
        else:
            assert outcome(r) == (201, "succeeded", None,
                                  {"id": i + 1, "email": emails[i], "name": f"N{i}"}), i
    assert len(duplicates) == 22
    expected = [{"id": i + 1, "email": emails[i], "name": f"N{i}"}
                for i in range(n) if i not in duplicates]
    assert rows(runtime, "users") == [*expected, {"id": 9000, "email": "taken@x.io",
                                                  "name": "Old"}]
    # Conflicts were found set-wise: a few statements per chunk and per duplicate, not per row.
    assert counter.count < 200


def test_skipped_insert_reports_its_own_conflict_not_a_later_rows(runtime: Runtime) -> None:
    # Item 1 collides on the email of item 0; item 2 (same run as item 1) then takes item 1's
    # id. One by one, item 1 fails on the email — item 2 did not exist yet.
    results = execute(runtime, [
        {"method": "POST", "path": "/users", "body": {"id": 1, "email": "a@x.io", "name": "A"}},
        {"method": "POST", "path": "/users", "body": {"id": 2, "email": "a@x.io"}},
        {"method": "POST", "path": "/users", "body": {"id": 2, "email": "b@x.io"}},
    ])
    dialect = runtime.store.engine.dialect.name
    assert outcome(results[1]) == (409, "failed", "unique_violation", None)
    assert results[1].error is not None
    assert results[1].error.message == unique_message(dialect, "email", "a@x.io")
    assert outcome(results[2]) == (201, "succeeded", None,
                                   {"id": 2, "email": "b@x.io", "name": None})
    assert rows(runtime, "users") == [{"id": 1, "email": "a@x.io", "name": "A"},
                                      {"id": 2, "email": "b@x.io", "name": None}]


def test_inserts_without_an_id_go_in_once_each(runtime: Runtime) -> None:
    # Nothing to match the returned rows on but their contents, which the database may store
    # differently (SQLite reads numbers back at ten decimal places; a naive timestamp comes back
    # with a zone).
    results = execute(runtime, [
        {"method": "POST", "path": "/orders", "body": {"status": "new", "total": "0.1234567891"}},
        {"method": "POST", "path": "/orders", "body": {"status": "new", "total": "2.0000000001"}},
        {"method": "POST", "path": "/outbox", "body": {
            "recipient": "a@x.io", "subject": "s", "body": "b",
            "started_at": "2024-05-01T10:00:00"}},
        {"method": "POST", "path": "/outbox", "body": {
            "recipient": "b@x.io", "subject": "s", "body": "b",
            "started_at": "2024-05-01T11:00:00+02:00"}},
    ])
    assert [r.status for r in results] == [201, 201, 201, 201]
    orders, outbox = rows(runtime, "orders"), rows(runtime, "outbox")
    assert len(orders) == 2
    assert len(outbox) == 2
    assert [r.result["id"] for r in results[:2]] == [o["id"] for o in orders]
    assert [r.result["id"] for r in results[2:]] == [o["id"] for o in outbox]
    assert [r.result["recipient"] for r in results[2:]] == ["a@x.io", "b@x.io"]


# -- constraint failures inside a bulk run ------------------------------------------------------

@pytest.fixture
def lines_runtime(configure: Any, database_url: str) -> Iterator[Runtime]:
    """The runtime with a ``lines`` resource whose table has checks the spec does not know."""
    specs = {name: spec.model_dump() for name, spec in demo_resources().items()}
    specs["lines"] = {"columns": {
        "id": {"type": "integer", "nullable": False},
        "order_id": {"type": "integer"},  # NOT NULL and a foreign key in the table only
        "qty": {"type": "bigint"},  # a 32-bit integer in the table only
        "note": {"type": "text"},
    }}
    runtime = configure(database_url=database_url, resources=json.dumps(specs))
    lines = sa.Table(
        "lines", sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("order_id", sa.Integer, sa.ForeignKey(runtime.resources["orders"].table.c.id),
                  nullable=False),
        sa.Column("qty", sa.Integer, sa.CheckConstraint("qty > 0", name="lines_qty_positive")),
        sa.Column("note", sa.Text),
    )
    engine = runtime.store.engine
    lines.create(engine)
    try:
        yield runtime
    finally:
        lines.drop(engine)


def test_constraint_failures_in_a_bulk_run_fail_exactly_the_bad_items(
        lines_runtime: Runtime) -> None:
    runtime = lines_runtime
    dialect = runtime.store.engine.dialect.name
    insert_rows(runtime, "orders", [{"id": i, "status": "new"} for i in (1, 2, 3)])
    n = 300
    body = [{"id": i + 1, "order_id": i % 3 + 1, "qty": 1, "note": f"n{i}"} for i in range(n)]
    body[17]["order_id"] = 999  # no such order
    body[150]["qty"] = 0  # check constraint
    body[251]["order_id"] = None  # not null in the table
    body[200]["qty"] = 2**40  # out of the table's range on PostgreSQL; SQLite stores it
    ops = [{"method": "POST", "path": "/lines", "body": b} for b in body]

    with StatementCounter(runtime.store.engine) as counter:
        results = execute(runtime, ops)

    expected_failures = {
        17: (409, "constraint_violation",
             "FOREIGN KEY constraint failed" if dialect == "sqlite"
             else 'violates foreign key constraint'),
        150: (409, "constraint_violation",
              "CHECK constraint failed" if dialect == "sqlite"
              else 'violates check constraint "lines_qty_positive"'),
        251: (409, "constraint_violation",
              "NOT NULL constraint failed: lines.order_id" if dialect == "sqlite"
              else 'null value in column "order_id"'),
    }
    if dialect == "postgresql":
        expected_failures[200] = (422, "invalid_value", "integer out of range")
    for i, r in enumerate(results):
        if i in expected_failures:
            status, code, words = expected_failures[i]
            assert (r.status, r.state.value) == (status, "failed"), i
            assert r.error is not None
            assert r.error.code == code
            assert words in r.error.message
        else:
            assert outcome(r) == (201, "succeeded", None, body[i]), i
    assert rows(runtime, "lines") == [b for i, b in enumerate(body) if i not in expected_failures]
    # Bisection: a few statements per bad item and level (log2 of the run); savepoints item by
    # item would take three statements per row.
    assert counter.count < n


# -- PUT, PATCH, DELETE ---------------------------------------------------------------------

def test_put_creates_then_updates(runtime: Runtime) -> None:
    results = execute(runtime, [
        {"method": "PUT", "path": "/users/7", "body": {"email": "p@x.io", "name": "P"}},
        {"method": "PUT", "path": "/users/8", "body": {"email": "r@x.io"}},
        {"method": "PUT", "path": "/users/7", "body": {"email": "q@x.io"}},
    ])
    assert [outcome(r) for r in results] == [
        (201, "succeeded", None, {"id": 7, "email": "p@x.io", "name": "P"}),
        (201, "succeeded", None, {"id": 8, "email": "r@x.io", "name": None}),
        # PUT replaces the record: the name it does not send is cleared.
        (200, "succeeded", None, {"id": 7, "email": "q@x.io", "name": None}),
    ]
    again = execute(runtime, [
        {"method": "PUT", "path": "/users/7", "body": {"id": 7, "email": "q@x.io", "name": "Q"}}])
    assert outcome(again[0]) == (200, "succeeded", None, {"id": 7, "email": "q@x.io", "name": "Q"})
    assert rows(runtime, "users") == [{"id": 7, "email": "q@x.io", "name": "Q"},
                                      {"id": 8, "email": "r@x.io", "name": None}]


def test_patch_of_a_missing_row_is_not_found(runtime: Runtime) -> None:
    insert_rows(runtime, "users", [{"id": 1, "email": "a@x.io", "name": "A"}])
    results = execute(runtime, [
        {"method": "PATCH", "path": "/users/2", "body": {"name": "B"}},
        {"method": "PATCH", "path": "/users/1", "body": {"name": "A2"}},
    ])
    assert outcome(results[0]) == (404, "failed", "not_found", None)
    assert results[0].error is not None
    assert "users" in results[0].error.message
    assert outcome(results[1]) == (200, "succeeded", None,
                                   {"id": 1, "email": "a@x.io", "name": "A2"})
    assert rows(runtime, "users") == [{"id": 1, "email": "a@x.io", "name": "A2"}]


def test_delete_twice_in_one_run_is_204_then_404(runtime: Runtime) -> None:
    insert_rows(runtime, "users", [{"id": 1, "email": "a@x.io", "name": "A"},
                                   {"id": 2, "email": "b@x.io", "name": "B"}])
    results = execute(runtime, [
        {"method": "DELETE", "path": "/users/1"},
        {"method": "DELETE", "path": "/users/1"},
        {"method": "DELETE", "path": "/users/3"},
    ])
    assert [outcome(r) for r in results] == [
        (204, "succeeded", None, None),
        (404, "failed", "not_found", None),
        (404, "failed", "not_found", None),
    ]
    assert rows(runtime, "users") == [{"id": 2, "email": "b@x.io", "name": "B"}]


def test_several_patches_of_one_record_in_one_chunk_apply_in_order(runtime: Runtime) -> None:
    insert_rows(runtime, "users", [{"id": 1, "email": "a@x.io", "name": "Ann"},
                                   {"id": 2, "email": "b@x.io", "name": "Bob"}])
    results = execute(runtime, [
        {"method": "PATCH", "path": "/users/1", "body": {"name": "N1"}},
        {"method": "PATCH", "path": "/users/2", "body": {"name": "M1"}},
        {"method": "PATCH", "path": "/users/1", "body": {"name": "N2"}},
        {"method": "PATCH", "path": "/users/1", "body": {"email": "z@x.io"}},
        # b@x.io is still Bob's here; a@x.io was freed by the PATCH before.
        {"method": "PATCH", "path": "/users/1", "body": {"email": "b@x.io"}},
        {"method": "PATCH", "path": "/users/2", "body": {"email": "a@x.io"}},
        {"method": "PATCH", "path": "/users/1", "body": {"name": "N3", "email": "b@x.io"}},
    ])
    dialect = runtime.store.engine.dialect.name
    assert [outcome(r) for r in results] == [
        (200, "succeeded", None, {"id": 1, "email": "a@x.io", "name": "N1"}),
        (200, "succeeded", None, {"id": 2, "email": "b@x.io", "name": "M1"}),
        (200, "succeeded", None, {"id": 1, "email": "a@x.io", "name": "N2"}),
        (200, "succeeded", None, {"id": 1, "email": "z@x.io", "name": "N2"}),
        (409, "failed", "unique_violation", None),
        (200, "succeeded", None, {"id": 2, "email": "a@x.io", "name": "M1"}),
        (200, "succeeded", None, {"id": 1, "email": "b@x.io", "name": "N3"}),
    ]
    assert results[4].error is not None
    assert results[4].error.message == unique_message(dialect, "email", "b@x.io")
    assert rows(runtime, "users") == [{"id": 1, "email": "b@x.io", "name": "N3"},
                                      {"id": 2, "email": "a@x.io", "name": "M1"}]


def test_a_unique_value_freed_later_in_a_patch_run_is_not_taken_early(runtime: Runtime) -> None:
    # One by one, PATCH u2 → e1 fails because u1 still holds e1; u1 lets it go one item later.
    # A set-wise UPDATE over a table this size need not visit the rows in batch order.
    n = 3000
    insert_rows(runtime, "users", [{"id": i, "email": f"e{i}", "name": None}
                                   for i in range(1, n + 1)])
    with runtime.store.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("ANALYZE users")
    ops: list[dict[str, Any]] = []
    for i in range(1, 251):
        ops += [{"method": "PATCH", "path": f"/users/{2 * i}", "body": {"email": f"e{2 * i - 1}"}},
                {"method": "PATCH", "path": f"/users/{2 * i - 1}", "body": {"email": f"f{i}"}}]
    results = execute(runtime, ops)
    assert [r.status for r in results[0::2]] == [409] * 250
    assert [r.status for r in results[1::2]] == [200] * 250
    table = {r["id"]: r["email"] for r in rows(runtime, "users")}
    assert all(table[2 * i] == f"e{2 * i}" and table[2 * i - 1] == f"f{i}"
               for i in range(1, 251))


# -- values -----------------------------------------------------------------------------------

def test_a_numeric_total_round_trips(runtime: Runtime) -> None:
    results = execute(runtime, [
        {"method": "POST", "path": "/orders", "body": {"id": 1, "status": "new", "total": 12.5}},
        {"method": "PUT", "path": "/orders/2", "body": {"total": "0.10"}},
        {"method": "PATCH", "path": "/orders/2", "body": {"total": "99.99"}},
        {"method": "GET", "path": "/orders/1"},
        {"method": "PUT", "path": "/orders/3", "body": {"total": "1234567.25"}},
    ])
    assert [r.result for r in results] == [
        {"id": 1, "status": "new", "total": 12.5},
        {"id": 2, "status": None, "total": 0.1},
        {"id": 2, "status": None, "total": 99.99},
        {"id": 1, "status": "new", "total": 12.5},
        {"id": 3, "status": None, "total": 1234567.25},
    ]
    with runtime.store.engine.connect() as conn:
        totals = conn.execute(sa.select(runtime.resources["orders"].table.c.total)
                              .order_by("id")).scalars().all()
    assert totals == [Decimal("12.5"), Decimal("99.99"), Decimal("1234567.25")]


@pytest.fixture
def typed_runtime(configure: Any, database_url: str) -> Iterator[Runtime]:
    """The runtime with ``things`` (a column of every type but JSON) and ``docs`` (with a
    JSON column): PostgreSQL inserts into the first take the pre-rendered statement."""
    specs = {name: spec.model_dump() for name, spec in demo_resources().items()}
    typed = {"id": {"type": "integer", "nullable": False},
             "label": {"type": "text", "unique": True}, "amount": {"type": "numeric"},
             "ratio": {"type": "float"},
             "active": {"type": "boolean"}, "seen_at": {"type": "timestamp"},
             "day": {"type": "date"}}
    specs["things"] = {"create": True, "columns": typed}
    specs["docs"] = {"create": True, "columns": {**typed, "extra": {"type": "json"}}}
    runtime = configure(database_url=database_url, resources=json.dumps(specs))
    try:
        yield runtime
    finally:
        for name in ("things", "docs"):
            runtime.resources[name].table.drop(runtime.store.engine, checkfirst=True)


@pytest.mark.parametrize("resource", ["things", "docs"])
def test_inserted_rows_of_every_column_type_are_answered_as_stored(typed_runtime: Runtime,
                                                                    resource: str) -> None:
    runtime = typed_runtime
    full = {"label": "a", "amount": "12.50", "ratio": 0.25, "active": True,
            "seen_at": "2024-05-01T10:00:00+02:00", "day": "2024-05-01"}
    bodies: list[dict[str, Any]] = [
        {"id": 1, **full},
        {"id": 2, **full, "label": "b", "amount": 3, "ratio": "1.5", "active": "false",
         "seen_at": None, "day": None},
        {"id": 3, **full},  # label "a" again: the conflict, found set-wise
        {"id": 4, **full, "label": None, "amount": None, "ratio": None, "active": None},
    ]
    if resource == "docs":
        bodies[0]["extra"] = {"k": [1, "two", None]}
        bodies[1]["extra"] = None
        bodies[2]["extra"] = {}
        bodies[3]["extra"] = [1, 2]
    results = execute(runtime, [{"method": "POST", "path": f"/{resource}", "body": b}
                                for b in bodies])

    assert [(r.status, r.error.code if r.error else None) for r in results] == [
        (201, None), (201, None), (409, "unique_violation"), (201, None)]
    table = runtime.resources[resource].table
    with runtime.store.engine.connect() as conn:
        stored = {row["id"]: row_to_json(row)
                  for row in conn.execute(sa.select(table).order_by(table.c.id)).mappings()}
    assert sorted(stored) == [1, 2, 4]
    for r in results:
        if r.result is not None:
            assert r.result == stored[r.result["id"]]
    first, second, fourth = stored[1], stored[2], stored[4]
    assert (first["amount"], first["ratio"], first["active"], first["day"]) == (
        12.5, 0.25, True, "2024-05-01")
    assert (second["amount"], second["ratio"], second["active"], second["seen_at"],
            second["day"]) == (3, 1.5, False, None, None)
    assert (fourth["label"], fourth["amount"], fourth["ratio"], fourth["active"]) == (
        None, None, None, None)
    assert first["seen_at"] is not None and first["seen_at"].startswith("2024-05-01")
    if resource == "docs":
        assert (first["extra"], fourth["extra"]) == ({"k": [1, "two", None]}, [1, 2])


def test_execute_commits_through_its_own_transaction(runtime: Runtime) -> None:
    planned = validate_operations(
        [{"method": "POST", "path": "/users", "body": {"id": 1, "email": "a@x.io"}},
         {"method": "POST", "path": "/users", "body": {"id": 2, "email": "a@x.io"}}],
        runtime.router, 10)
    results = asyncio.run(target_of(runtime).execute(
        planned, ChunkContext(batch_id="b1", concurrency=1)))
    assert [(r.status, r.error.code if r.error else None) for r in results] == [
        (201, None), (409, "unique_violation")]
    assert rows(runtime, "users") == [{"id": 1, "email": "a@x.io", "name": None}]
