"""The sql target: declared tables as REST resources, written collect-then-batch.

A chunk is cut into *runs*: consecutive operations on one resource with one method (and, where
a statement needs it, one set of columns, and each record at most once). Each run is one bulk
statement inside a savepoint:

* ``POST``   multi-row ``INSERT … ON CONFLICT DO NOTHING RETURNING *`` — the rows that came
  back went in, the others are the conflicts, re-tried one by one to get the database's reason
  (when a later row of the run took a key a skipped row holds, the run is cut after the skipped
  row, so its reason is the one it meets in batch order). Rows that name neither the primary
  key nor a unique column cannot conflict set-wise: a plain multi-row ``INSERT … RETURNING *``;
* ``PUT``    multi-row ``INSERT … ON CONFLICT (pk) DO UPDATE … RETURNING *``;
* ``PATCH``  ``UPDATE … FROM (VALUES …) RETURNING *`` (PostgreSQL), per row on SQLite;
* ``DELETE`` ``DELETE … WHERE pk IN (…) RETURNING pk``;
* ``GET``    ``SELECT … WHERE pk IN (…)``.

When a bulk statement fails (foreign key, check, a value the database refuses), the run is
bisected, each half in its own savepoint, down to the single items that fail. Runs execute in
batch order, and a ``PUT``/``PATCH`` run that could trade unique values between rows runs item
by item, so the outcome equals executing the operations one by one in batch order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from itertools import groupby
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, RowMapping

from batchops.engine import shared_engine
from batchops.errors import ConfigurationError, TransientError, is_transient
from batchops.jsonable import row_to_json
from batchops.planning import PAGE_ROWS
from batchops.resources import Resource
from batchops.schemas import ItemResult, PlannedOperation
from batchops.targets import ChunkContext

__all__ = ["SqlTarget", "classify_db_error", "split_runs"]


def _insert(conn: Connection, table: sa.Table) -> Any:
    name = conn.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise ConfigurationError(f"the sql target does not support the {name!r} dialect")


def classify_db_error(exc: sa.exc.DBAPIError) -> tuple[int, str, str]:
    """(item status, error code, message) for a statement the database refused."""
    orig = exc.orig
    pgcode = getattr(orig, "pgcode", None) or ""
    diag = getattr(orig, "diag", None)
    if diag is not None and diag.message_primary:
        message = diag.message_primary + (f" ({diag.message_detail})" if diag.message_detail
                                          else "")
    else:
        message = str(orig).strip().splitlines()[0] if orig is not None else str(exc)
    text = str(orig)
    if pgcode == "23505" or "UNIQUE constraint failed" in text:
        return 409, "unique_violation", message
    if isinstance(exc, sa.exc.IntegrityError) or pgcode.startswith("23"):
        return 409, "constraint_violation", message
    return 422, "invalid_value", message


def _raise_if_transient(exc: sa.exc.DBAPIError) -> None:
    if is_transient(exc):  # lost, busy, or refusing writes for now (read-only): retried
        raise TransientError(f"database unavailable: {str(exc.orig).strip()}") from exc


def split_runs(items: Sequence[PlannedOperation],
               resources: dict[str, Resource]) -> Iterator[list[PlannedOperation]]:
    """Consecutive operations that one bulk statement can execute, in batch order, in pages
    of at most :data:`~batchops.planning.PAGE_ROWS`."""
    run: list[PlannedOperation] = []
    signature: tuple[Any, ...] | None = None
    seen: set[str] = set()
    for op in items:
        assert op.resource is not None
        pk = op.params.get(resources[op.resource].primary_key)
        cols = tuple(sorted(op.body)) if op.method in ("POST", "PATCH") and op.body else ()
        sig = (op.resource, op.method, cols)
        repeat = op.method in ("PUT", "PATCH") and pk in seen
        if run and (sig != signature or repeat or len(run) >= PAGE_ROWS):
            yield run
            run, seen = [], set()
        run.append(op)
        signature = sig
        if pk is not None:
            seen.add(pk)
    if run:
        yield run


class _SplitRun(Exception):
    """Raised inside a run's savepoint: undo it and run ``run[:at]``, then ``run[at:]``."""

    def __init__(self, at: int) -> None:
        super().__init__(at)
        self.at = at


def _row_json(row: Mapping[Any, Any]) -> dict[str, Any]:
    # A row of a table selected by its columns is keyed by column name.
    return row_to_json(cast("Mapping[str, Any]", row))


def _dict_rows(result: sa.CursorResult[Any]) -> list[dict[str, Any]]:
    """A result's rows as plain dicts (much cheaper than ``RowMapping`` on hot paths)."""
    keys = [str(k) for k in result.keys()]  # noqa: SIM118 - a Result, not a dict
    return [dict(zip(keys, row, strict=True)) for row in result]


def _first_shadowed_skip(rows: Sequence[dict[str, Any]], went_in: Sequence[Any],
                         columns: Sequence[str]) -> int | None:
    """The first skipped row that shares a key or unique value with a later inserted row."""
    last_taken: dict[tuple[str, Any], int] = {}
    for i, (row, got) in enumerate(zip(rows, went_in, strict=True)):
        if got is not None:
            for c in columns:
                if row[c] is not None:
                    last_taken[(c, row[c])] = i
    for i, (row, got) in enumerate(zip(rows, went_in, strict=True)):
        if got is None and any(last_taken.get((c, row[c]), -1) > i
                               for c in columns if row[c] is not None):
            return i
    return None


class SqlTarget:
    """Executes operations on declared tables; see the module docstring for the statements."""

    name = "sql"

    def __init__(self, resources: dict[str, Resource], store_url: str) -> None:
        self.resources = resources
        self._constraint_cache: dict[tuple[sa.URL, str], dict[str, str]] = {}
        self._insert_sql_cache: dict[tuple[str, tuple[str, ...], int], str] = {}
        self.store_url = store_url

    def database_url(self, op: PlannedOperation) -> str:
        assert op.resource is not None
        return self.resources[op.resource].database_url or self.store_url

    async def execute(self, items: Sequence[PlannedOperation],
                      ctx: ChunkContext) -> list[ItemResult]:
        results: list[ItemResult] = []
        for url, group in groupby(items, key=self.database_url):
            ops = list(group)
            if url == self.store_url and ctx.store_connection is not None:
                results += self.execute_on(ctx.store_connection, ops)
            else:
                try:
                    with shared_engine(url).begin() as conn:
                        results += self.execute_on(conn, ops)
                except sa.exc.DBAPIError as exc:
                    _raise_if_transient(exc)
                    raise
        return results

    def execute_on(self, conn: Connection, items: Sequence[PlannedOperation]) -> list[ItemResult]:
        """Execute ``items`` in the open transaction ``conn`` (savepoints inside)."""
        results: list[ItemResult] = []
        try:
            for run in split_runs(items, self.resources):
                assert run[0].resource is not None
                resource = self.resources[run[0].resource]
                if run[0].method in ("PUT", "PATCH") and self._may_trade_unique_values(
                        conn, resource, run):
                    for op in run:
                        results += self._guarded(conn, resource, [op])
                else:
                    results += self._guarded(conn, resource, run)
        except sa.exc.DBAPIError as exc:
            _raise_if_transient(exc)
            raise
        return results

    # -- one run ------------------------------------------------------------------------

    def _guarded(self, conn: Connection, res: Resource,
                 run: list[PlannedOperation]) -> list[ItemResult]:
        try:
            with conn.begin_nested():
                return self._bulk(conn, res, run)
        except _SplitRun as split:
            return (self._guarded(conn, res, run[:split.at])
                    + self._guarded(conn, res, run[split.at:]))
        except (sa.exc.IntegrityError, sa.exc.DataError) as exc:
            if len(run) == 1:
                status, code, message = classify_db_error(exc)
                return [ItemResult.fail(run[0], status, code, message)]
            mid = len(run) // 2
            return self._guarded(conn, res, run[:mid]) + self._guarded(conn, res, run[mid:])

    def _bulk(self, conn: Connection, res: Resource,
              run: list[PlannedOperation]) -> list[ItemResult]:
        method = run[0].method
        if method == "POST":
            return self._post(conn, res, run)
        if method == "PUT":
            return self._put(conn, res, run)
        if method == "PATCH":
            return self._patch(conn, res, run)
        if method == "DELETE":
            return self._delete(conn, res, run)
        return self._get(conn, res, run)

    def _keys(self, res: Resource, run: list[PlannedOperation]) -> list[Any]:
        return [res.coerce_key(op.params[res.primary_key]) for op in run]

    def _post(self, conn: Connection, res: Resource,
              run: list[PlannedOperation]) -> list[ItemResult]:
        t = res.table
        rows = [res.coerce_row(op.body or {}) for op in run]
        # Conflicts can only come from the primary key or unique columns, so only rows that
        # name one can be skipped; match the returned rows to the given ones on those.
        match_on = [c for c in (res.primary_key, *res.unique_columns) if c in rows[0]]
        if not match_on:
            # Nothing to conflict on but a generated key: a plain insert (a rare collision
            # with a generated key fails the statement and is bisected). The rows cannot be
            # matched on their contents, which the database may store less precisely.
            returned = _dict_rows(conn.execute(t.insert().returning(*t.c), rows))
            return [ItemResult.ok(op, 201, _row_json(got))
                    for op, got in zip(run, returned, strict=True)]
        returned = self._insert_skipping_conflicts(conn, res, rows)
        went_in: list[dict[str, Any] | None] = []
        position = 0  # walk both lists in order
        for row in rows:
            got = returned[position] if position < len(returned) else None
            if got is not None and all(got[c] == row[c] for c in match_on):
                went_in.append(got)
                position += 1
            else:
                went_in.append(None)
        cut = _first_shadowed_skip(rows, went_in, match_on)
        if cut is not None:
            # A later row of the run took a value the skipped row holds: retried now, the
            # skipped row would meet that later row and the database would give another
            # reason. Undo the run, then run the items up to the skipped one, and the rest.
            raise _SplitRun(cut + 1)
        skipped = [(i, rows[i]) for i, got in enumerate(went_in) if got is None]
        reasons = self._conflict_reasons(conn, res, skipped, match_on) if skipped else {}
        results = []
        for i, (op, row, got) in enumerate(zip(run, rows, went_in, strict=True)):
            if got is not None:
                results.append(ItemResult.ok(op, 201, _row_json(got)))
            elif i in reasons:
                results.append(ItemResult.fail(op, 409, "unique_violation", reasons[i]))
            else:
                results.append(self._post_one(conn, t, op, row))
        return results

    def _insert_skipping_conflicts(self, conn: Connection, res: Resource,
                                   rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``INSERT … ON CONFLICT DO NOTHING RETURNING *`` of ``rows`` (one set of columns):
        the rows that went in, in the order given.

        On PostgreSQL, for tables without JSON columns, the statement is rendered once per
        table, columns and row count and sent with the values flattened into one tuple:
        SQLAlchemy compiles its ``ON CONFLICT`` insert anew on every execution (the dialect's
        ``Insert`` has no cache key) and builds a parameter dict per row, which cost more than
        the database's own work on a chunk. The values are already coerced to the types
        psycopg2 adapts natively (JSON would need SQLAlchemy's serializer, so it takes the
        general path); errors are wrapped by SQLAlchemy as for any statement.
        """
        t = res.table
        if conn.dialect.name != "postgresql" or res.has_json_columns:
            stmt = _insert(conn, t).on_conflict_do_nothing().returning(*t.c)
            return _dict_rows(conn.execute(stmt, rows))
        columns = tuple(rows[0])
        sql = self._pg_insert_sql(conn, t, columns, len(rows))
        return _dict_rows(conn.exec_driver_sql(
            sql, tuple([row[c] for row in rows for c in columns])))

    def _pg_insert_sql(self, conn: Connection, t: sa.Table, columns: tuple[str, ...],
                       count: int) -> str:
        key = (t.name, columns, count)
        sql = self._insert_sql_cache.get(key)
        if sql is None:
            quote = conn.dialect.identifier_preparer.quote

            def ident(name: str) -> str:
                return quote(name).replace("%", "%%")  # psycopg2 formats the statement

            table = conn.dialect.identifier_preparer.format_table(t).replace("%", "%%")
            one = "(" + ", ".join(["%s"] * len(columns)) + ")"
            sql = (f"INSERT INTO {table} ({', '.join(ident(c) for c in columns)}) VALUES "
                   f"{', '.join([one] * count)} ON CONFLICT DO NOTHING "
                   f"RETURNING {', '.join(ident(c.name) for c in t.c)}")
            if len(self._insert_sql_cache) >= 64:
                self._insert_sql_cache.clear()
            self._insert_sql_cache[key] = sql
        return sql

    def _conflict_reasons(self, conn: Connection, res: Resource,
                          skipped: list[tuple[int, dict[str, Any]]],
                          columns: list[str]) -> dict[int, str]:
        """The database's reason for each skipped row, found set-wise with one query.

        A row that collides on exactly one key or unique column gets the message the database
        gives for that constraint; anything less clear-cut is left to a one-row retry.
        """
        t = res.table
        names = self._unique_constraints(conn, res)
        plain = [c for c in columns if c in names
                 and res.spec.columns[c].type in ("integer", "text")]
        if len(plain) < len(columns):
            return {}  # a column whose constraint or value rendering is not known here
        wanted = {c: {row[c] for _, row in skipped if row[c] is not None} for c in plain}
        conditions = [t.c[c].in_(list(v)) for c, v in wanted.items() if v]
        if not conditions:
            return {}
        taken: set[tuple[str, Any]] = set()
        for holder in conn.execute(sa.select(*(t.c[c] for c in plain))
                                   .where(sa.or_(*conditions))).mappings():
            taken.update((c, holder[c]) for c in plain)
        reasons: dict[int, str] = {}
        for i, row in skipped:
            hits = [c for c in columns if row[c] is not None and (c, row[c]) in taken]
            if len(hits) == 1 and hits[0] in plain:
                col = hits[0]
                if conn.dialect.name == "postgresql":
                    reasons[i] = (f'duplicate key value violates unique constraint '
                                  f'"{names[col]}" (Key ({col})=({row[col]}) already exists.)')
                else:
                    reasons[i] = f"UNIQUE constraint failed: {t.name}.{col}"
        return reasons

    def _unique_constraints(self, conn: Connection, res: Resource) -> dict[str, str]:
        """Single-column unique constraints of the table: column → constraint name."""
        key = (conn.engine.url, res.table.name)  # a URL is hashable; rendering it is not free
        found = self._constraint_cache.get(key)
        if found is None:
            inspector = sa.inspect(conn)
            found = {}
            pk = inspector.get_pk_constraint(res.table.name)
            if len(pk.get("constrained_columns") or []) == 1 and pk.get("name"):
                found[pk["constrained_columns"][0]] = str(pk["name"])
            for uc in inspector.get_unique_constraints(res.table.name):
                if len(uc["column_names"]) == 1 and uc.get("name"):
                    found.setdefault(uc["column_names"][0], str(uc["name"]))
            for ix in inspector.get_indexes(res.table.name):
                if ix.get("unique") and len(ix["column_names"]) == 1 and ix.get("name"):
                    found.setdefault(str(ix["column_names"][0]), str(ix["name"]))
            if conn.dialect.name == "sqlite":
                found[res.primary_key] = "primary key"  # SQLite names the column, not this
            self._constraint_cache[key] = found
        return found

    def _post_one(self, conn: Connection, t: sa.Table, op: PlannedOperation,
                  row: dict[str, Any]) -> ItemResult:
        """A row the bulk insert skipped: insert it alone to learn the database's reason."""
        try:
            with conn.begin_nested():
                got = conn.execute(t.insert().returning(*t.c), row).mappings().one()
            return ItemResult.ok(op, 201, _row_json(got))
        except sa.exc.IntegrityError as exc:
            status, code, message = classify_db_error(exc)
            return ItemResult.fail(op, status, code, message)

    def _put(self, conn: Connection, res: Resource,
             run: list[PlannedOperation]) -> list[ItemResult]:
        t, pk = res.table, res.primary_key
        keys = self._keys(res, run)
        existing = set(conn.execute(sa.select(t.c[pk]).where(t.c[pk].in_(keys))).scalars())
        blank = {c: None for c in res.spec.columns if c != pk}
        rows = [blank | res.coerce_row(op.body or {}) | {pk: key}
                for op, key in zip(run, keys, strict=True)]
        stmt = _insert(conn, t)
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c[pk]], set_={c: stmt.excluded[c] for c in blank}
        ).returning(*t.c)
        by_key = {r[pk]: r for r in _dict_rows(conn.execute(stmt, rows))}
        return [ItemResult.ok(op, 200 if key in existing else 201, _row_json(by_key[key]))
                for op, key in zip(run, keys, strict=True)]

    def _patch(self, conn: Connection, res: Resource,
               run: list[PlannedOperation]) -> list[ItemResult]:
        t, pk = res.table, res.primary_key
        keys = self._keys(res, run)
        rows = [{k: v for k, v in res.coerce_row(op.body or {}).items() if k != pk}
                for op in run]
        cols = list(rows[0])
        found: dict[Any, RowMapping] = {}
        if not cols:
            found = {r[pk]: r for r in conn.execute(
                sa.select(t).where(t.c[pk].in_(keys))).mappings()}
        elif conn.dialect.name == "postgresql":
            values = sa.values(sa.column("_batchops_key", t.c[pk].type),
                               *(sa.column(c, t.c[c].type) for c in cols), name="v").data(
                [(key, *(row[c] for c in cols)) for key, row in zip(keys, rows, strict=True)])
            stmt = (t.update().values({c: sa.cast(values.c[c], t.c[c].type) for c in cols})
                    .where(t.c[pk] == values.c["_batchops_key"]).returning(*t.c))
            found = {r[pk]: r for r in conn.execute(stmt).mappings()}
        else:
            for key, row in zip(keys, rows, strict=True):
                got = conn.execute(t.update().where(t.c[pk] == key).values(row)
                                   .returning(*t.c)).mappings().first()
                if got is not None:
                    found[key] = got
        return [ItemResult.ok(op, 200, _row_json(found[key])) if key in found
                else self._not_found(op, res)
                for op, key in zip(run, keys, strict=True)]

    def _delete(self, conn: Connection, res: Resource,
                run: list[PlannedOperation]) -> list[ItemResult]:
        t, pk = res.table, res.primary_key
        keys = self._keys(res, run)
        deleted = set(conn.execute(
            t.delete().where(t.c[pk].in_(keys)).returning(t.c[pk])).scalars())
        results = []
        for op, key in zip(run, keys, strict=True):
            if key in deleted:
                deleted.discard(key)  # a second DELETE of the same row finds nothing
                results.append(ItemResult.ok(op, 204))
            else:
                results.append(self._not_found(op, res))
        return results

    def _get(self, conn: Connection, res: Resource,
             run: list[PlannedOperation]) -> list[ItemResult]:
        t, pk = res.table, res.primary_key
        keys = self._keys(res, run)
        found = {r[pk]: r for r in conn.execute(sa.select(t).where(t.c[pk].in_(keys))).mappings()}
        return [ItemResult.ok(op, 200, _row_json(found[key])) if key in found
                else self._not_found(op, res) for op, key in zip(run, keys, strict=True)]

    @staticmethod
    def _not_found(op: PlannedOperation, res: Resource) -> ItemResult:
        key = op.params.get(res.primary_key)
        return ItemResult.fail(op, 404, "not_found", f"no {res.name} with "
                               f"{res.primary_key} {key!r}")

    def _may_trade_unique_values(self, conn: Connection, res: Resource,
                                 run: list[PlannedOperation]) -> bool:
        """Could this run's rows swap unique values, so that order would matter?"""
        t, pk = res.table, res.primary_key
        for col in res.unique_columns:
            owners: dict[Any, Any] = {}
            for op in run:
                if op.body is not None and op.body.get(col) is not None:
                    value = res.coerce_row({col: op.body[col]})[col]
                    if value in owners:
                        return True
                    owners[value] = res.coerce_key(op.params[pk])
            if not owners:
                continue
            holders = conn.execute(sa.select(t.c[pk], t.c[col]).where(
                t.c[col].in_(list(owners)))).all()
            if any(owners.get(value) != key for key, value in holders):
                return True
        return False
