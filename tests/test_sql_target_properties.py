"""Property: the sql target's batched execution equals running the items one by one.

Random batches of mixed operations on the demo ``users`` and ``orders`` tables — with colliding
primary keys and unique emails, swaps of emails between users, repeated writes to one record —
are executed three ways on the same starting rows:

* by a naive reference written here: one plain SQL statement per item in its own savepoint;
* by ``SqlTarget.execute_on`` on the whole batch in one transaction;
* by ``SqlTarget.execute_on`` on consecutive slices of the batch, each committed on its own
  (a batch cut into chunks).

Every item's outcome (state, HTTP status, error code, row; for a conflict the database's own
message) and the final rows of both tables must be the same. Runs on SQLite and PostgreSQL
(the ``runtime`` fixture).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from itertools import pairwise
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Connection, Engine

from batchops.runtime import Runtime
from batchops.schemas import ItemResult
from batchops.targets.sql import SqlTarget
from batchops.validation import validate_operations

USER_IDS = st.integers(min_value=1, max_value=6)
ORDER_IDS = st.integers(min_value=1, max_value=5)
EMAILS = ["a@x.io", "b@x.io", "c@x.io", "d@x.io"]
NAMES = st.sampled_from([None, "Ann", "Bob", "Cy"])
STATUSES = st.sampled_from([None, "new", "paid"])
TOTALS = st.one_of(
    st.sampled_from([None, 0, 1, 12.5, "12.50", "0.1", 99.99, 1000, "3.25", -7]),
    st.decimals(min_value=-1000, max_value=1000, places=2).map(str),
    st.decimals(min_value=0, max_value=100, places=2).map(float),
)
COLUMNS = {"users": ("id", "email", "name"), "orders": ("id", "status", "total")}


# -- operations -----------------------------------------------------------------------------

def _user_body(draw: st.DrawFn, method: str, shape: frozenset[str], key: int) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if "id" in shape:
        body["id"] = key
    if "email" in shape:
        body["email"] = draw(st.sampled_from(EMAILS))
    if "name" in shape:
        body["name"] = draw(NAMES)
    return body


def _order_body(draw: st.DrawFn, method: str, shape: frozenset[str], key: int) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if "id" in shape:
        body["id"] = key
    if "status" in shape:
        body["status"] = draw(STATUSES)
    if "total" in shape:
        body["total"] = draw(TOTALS)
    return body


# Column sets each method may send (validation demands email for POST/PUT on users, and a
# non-empty body for PATCH; POST always names its id so the outcome does not hang on sequences).
SHAPES: dict[tuple[str, str], list[frozenset[str]]] = {
    ("users", "POST"): [frozenset({"id", "email", "name"}), frozenset({"id", "email"})],
    ("users", "PUT"): [frozenset({"email", "name"}), frozenset({"email"}),
                       frozenset({"id", "email", "name"})],
    ("users", "PATCH"): [frozenset({"email"}), frozenset({"name"}), frozenset({"email", "name"}),
                         frozenset({"id"})],
    ("orders", "POST"): [frozenset({"id", "status", "total"}), frozenset({"id", "total"}),
                         frozenset({"id"})],
    ("orders", "PUT"): [frozenset({"status", "total"}), frozenset({"total"}), frozenset()],
    ("orders", "PATCH"): [frozenset({"status"}), frozenset({"total"}),
                          frozenset({"status", "total"})],
}


ALL_METHODS = ("POST", "POST", "PUT", "PATCH", "PATCH", "DELETE", "GET")


@st.composite
def segments(draw: st.DrawFn, methods: tuple[str, ...]) -> list[dict[str, Any]]:
    """A few operations of one method on one resource (what the target makes one run of)."""
    resource = draw(st.sampled_from(["users", "users", "orders"]))
    method = draw(st.sampled_from(methods))
    keys = USER_IDS if resource == "users" else ORDER_IDS
    make_body = _user_body if resource == "users" else _order_body
    shapes = SHAPES.get((resource, method), [])
    # Mostly one column set per segment (one bulk statement), sometimes mixed.
    fixed_shape = draw(st.sampled_from(shapes)) if shapes and draw(st.booleans()) else None
    # Often a segment keeps returning to two or three records: conflicts within one run.
    local = draw(st.lists(keys, min_size=1, max_size=3, unique=True))
    nearby = st.sampled_from(local) if draw(st.booleans()) else keys
    ops = []
    for _ in range(draw(st.integers(min_value=1, max_value=7))):
        key = draw(nearby)
        op: dict[str, Any] = {"method": method}
        if method == "POST":
            op["path"] = f"/{resource}"
        else:
            op["path"] = f"/{resource}/{key}"
        if shapes:
            shape = fixed_shape if fixed_shape is not None else draw(st.sampled_from(shapes))
            op["body"] = make_body(draw, method, shape, key)
        ops.append(op)
    return ops


@st.composite
def batches(draw: st.DrawFn, methods: tuple[str, ...] = ALL_METHODS) -> list[dict[str, Any]]:
    ops = [op for seg in draw(st.lists(segments(methods), min_size=1, max_size=8)) for op in seg]
    for i, op in enumerate(ops):
        op["id"] = f"op{i}"
    return ops


@dataclass
class Seed:
    users: dict[int, tuple[str, str | None]]
    orders: dict[int, tuple[str | None, Any]]


@st.composite
def seeds(draw: st.DrawFn) -> Seed:
    user_ids = draw(st.lists(USER_IDS, unique=True, max_size=4))
    emails = draw(st.permutations(EMAILS))
    users = {uid: (emails[i], draw(NAMES)) for i, uid in enumerate(user_ids)}
    order_ids = draw(st.lists(ORDER_IDS, unique=True, max_size=3))
    orders = {oid: (draw(STATUSES), draw(TOTALS)) for oid in order_ids}
    return Seed(users, orders)


@st.composite
def cut_points(draw: st.DrawFn, size: int) -> list[int]:
    """Where to cut a batch of ``size`` items into consecutive chunks."""
    if size < 2:
        return []
    return sorted(set(draw(st.lists(st.integers(min_value=1, max_value=size - 1), max_size=4))))


# -- the naive reference --------------------------------------------------------------------

def _numeric_sql(column: str) -> str:
    # Every value goes in as text and the database parses it, on both backends.
    return f"CAST(:{column} AS NUMERIC)" if column == "total" else f":{column}"


def _bind(body: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if v is None else str(v)) if k == "total" else v for k, v in body.items()}


@dataclass
class Outcome:
    """One item's outcome, comparable between the reference and the target."""

    index: int
    id: str | None
    state: str
    status: int
    code: str | None
    row: dict[str, Any] | None

    def __repr__(self) -> str:
        what = self.code if self.code else self.row
        return f"<{self.id} {self.state} {self.status} {what}>"


def _normal_row(row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    out = dict(row)
    if out.get("total") is not None:
        out["total"] = Decimal(str(out["total"])).normalize()
    return out


def _db_message(exc: sa.exc.IntegrityError) -> tuple[str, str | None]:
    """The database's own words: (primary message, detail)."""
    diag = getattr(exc.orig, "diag", None)
    if diag is not None:
        return diag.message_primary, diag.message_detail
    return str(exc.orig).strip(), None


def reference_execute(conn: Connection, ops: list[dict[str, Any]]) -> tuple[list[Outcome],
                                                                             list[Any]]:
    """Each operation alone, in batch order: one statement in one savepoint."""
    outcomes: list[Outcome] = []
    messages: list[Any] = []
    for index, op in enumerate(ops):
        method, path, body = op["method"], op["path"], op.get("body") or {}
        table = path.split("/")[1]
        key = int(path.split("/")[2]) if method != "POST" else None
        status, row, code, message = 0, None, None, None
        try:
            with conn.begin_nested():
                if method == "POST":
                    cols = list(body)
                    got = conn.execute(sa.text(
                        f"INSERT INTO {table} ({', '.join(cols)}) VALUES "
                        f"({', '.join(_numeric_sql(c) for c in cols)}) RETURNING *"),
                        _bind(body)).mappings().one()
                    status, row = 201, got
                elif method == "PUT":
                    # PUT replaces the whole record: columns it does not name become null.
                    values = {c: body.get(c) for c in COLUMNS[table] if c != "id"}
                    exists = conn.execute(sa.text(f"SELECT 1 FROM {table} WHERE id = :key"),
                                          {"key": key}).first()
                    if exists:
                        sets = ", ".join(f"{c} = {_numeric_sql(c)}" for c in values)
                        row = conn.execute(sa.text(
                            f"UPDATE {table} SET {sets} WHERE id = :key RETURNING *"),
                            {**_bind(values), "key": key}).mappings().one()
                        status = 200
                    else:
                        cols = ["id", *values]
                        row = conn.execute(sa.text(
                            f"INSERT INTO {table} ({', '.join(cols)}) VALUES "
                            f"({', '.join(_numeric_sql(c) for c in cols)}) RETURNING *"),
                            {**_bind(values), "id": key}).mappings().one()
                        status = 201
                elif method == "PATCH":
                    values = {c: v for c, v in body.items() if c != "id"}
                    if values:
                        sets = ", ".join(f"{c} = {_numeric_sql(c)}" for c in values)
                        row = conn.execute(sa.text(
                            f"UPDATE {table} SET {sets} WHERE id = :key RETURNING *"),
                            {**_bind(values), "key": key}).mappings().first()
                    else:
                        row = conn.execute(sa.text(f"SELECT * FROM {table} WHERE id = :key"),
                                           {"key": key}).mappings().first()
                    status = 200
                elif method == "DELETE":
                    gone = conn.execute(sa.text(f"DELETE FROM {table} WHERE id = :key "
                                                "RETURNING id"), {"key": key}).first()
                    status, row = (204, None) if gone else (404, None)
                    if not gone:
                        code = "not_found"
                else:
                    row = conn.execute(sa.text(f"SELECT * FROM {table} WHERE id = :key"),
                                       {"key": key}).mappings().first()
                    status = 200
                if method in ("PATCH", "GET") and row is None:
                    status, code = 404, "not_found"
        except sa.exc.IntegrityError as exc:
            pgcode = getattr(exc.orig, "pgcode", None)
            unique = pgcode == "23505" or "UNIQUE constraint failed" in str(exc.orig)
            status, row = 409, None
            code = "unique_violation" if unique else "constraint_violation"
            message = _db_message(exc)
        outcomes.append(Outcome(index, op.get("id"), "failed" if code else "succeeded", status,
                                code, None if code else _normal_row(row)))
        messages.append(message)
    return outcomes, messages


# -- running both ---------------------------------------------------------------------------

def table_state(conn: Connection) -> dict[str, list[dict[str, Any]]]:
    return {
        table: [_normal_row(r) or {} for r in conn.execute(sa.text(
            f"SELECT {', '.join(cols)} FROM {table} ORDER BY id")).mappings()]
        for table, cols in COLUMNS.items()
    }


def reset(engine: Engine, seed: Seed) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM users"))
        conn.execute(sa.text("DELETE FROM orders"))
        for uid, (email, name) in seed.users.items():
            conn.execute(sa.text("INSERT INTO users (id, email, name) VALUES (:i, :e, :n)"),
                         {"i": uid, "e": email, "n": name})
        for oid, (status, total) in seed.orders.items():
            conn.execute(sa.text("INSERT INTO orders (id, status, total) "
                                 "VALUES (:i, :s, CAST(:t AS NUMERIC))"),
                         {"i": oid, "s": status, "t": None if total is None else str(total)})


def outcomes_of(results: list[ItemResult]) -> list[Outcome]:
    return [Outcome(r.index, r.id, r.state.value, r.status, r.error.code if r.error else None,
                    _normal_row(r.result) if r.result is not None else None)
            for r in results]


def check_messages(results: list[ItemResult], messages: list[Any]) -> None:
    """A conflict's message is the database's own (primary message and detail)."""
    for r, expected in zip(results, messages, strict=True):
        if expected is None:
            continue
        assert r.error is not None
        primary, detail = expected
        assert primary in r.error.message, (r, expected)
        if detail:
            assert detail in r.error.message, (r, expected)


@pytest.fixture
def sql_target(runtime: Runtime) -> SqlTarget:
    target = runtime.targets["sql"]
    assert isinstance(target, SqlTarget)
    return target


PROPERTY_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)


def check_equivalence(runtime: Runtime, target: SqlTarget, seed: Seed,
                      raw_ops: list[dict[str, Any]], data: st.DataObject) -> None:
    """The batch run whole, and cut into committed chunks, equals the reference."""
    engine = runtime.store.engine
    planned = validate_operations(raw_ops, runtime.router, 10_000)
    assert len(planned) == len(raw_ops)

    reset(engine, seed)
    with engine.connect() as conn:
        trans = conn.begin()
        expected, messages = reference_execute(conn, raw_ops)
        expected_state = table_state(conn)
        trans.rollback()

    # The whole batch as one chunk.
    with engine.connect() as conn:
        trans = conn.begin()
        results = target.execute_on(conn, planned)
        state = table_state(conn)
        trans.rollback()
    assert [r.index for r in results] == list(range(len(planned)))
    assert outcomes_of(results) == expected
    check_messages(results, messages)
    assert state == expected_state

    # The same batch cut into chunks, each committed on its own.
    cuts = data.draw(cut_points(len(planned)), label="cuts")
    bounds = [0, *cuts, len(planned)]
    chunked: list[ItemResult] = []
    for start, end in pairwise(bounds):
        with engine.begin() as conn:
            chunked += target.execute_on(conn, planned[start:end])
    assert outcomes_of(chunked) == expected
    check_messages(chunked, messages)
    with engine.connect() as conn:
        assert table_state(conn) == expected_state


@settings(PROPERTY_SETTINGS, max_examples=100)
@given(seed=seeds(), raw_ops=batches(), data=st.data())
def test_batched_execution_equals_one_by_one(runtime: Runtime, sql_target: SqlTarget,
                                             seed: Seed, raw_ops: list[dict[str, Any]],
                                             data: st.DataObject) -> None:
    check_equivalence(runtime, sql_target, seed, raw_ops, data)


@settings(PROPERTY_SETTINGS, max_examples=60)
@given(seed=seeds(), raw_ops=batches(methods=("POST",)), data=st.data())
def test_bulk_inserts_with_colliding_keys_equal_one_by_one(
        runtime: Runtime, sql_target: SqlTarget, seed: Seed, raw_ops: list[dict[str, Any]],
        data: st.DataObject) -> None:
    # Runs of inserts that collide on ids and emails among themselves and with existing rows:
    # the set-wise conflict detection, and each skipped row's reason in batch order.
    check_equivalence(runtime, sql_target, seed, raw_ops, data)
