"""Bulk syncs: rows changed since a watermark, from a table or a CSV directory, as batches.

A sync (``settings.syncs[name]``, a :class:`~batchops.settings.SyncSpec`) reads its source in
the order of a *position* — ``(cursor, primary key)`` of a table's rows, ``(modification
time, name)`` of a directory's CSV files — and turns every row into an operation on its target
resource (``PUT /{resource}/{key}`` by default, an upsert). Its *watermark* is the position of
the last row applied; a run reads what lies after it.

One batch at a time, so a run that stops anywhere leaves nothing twice and nothing lost:

1. the batch's range is fixed first — from the watermark to the position of its last row, at
   most ``batch_rows`` rows further — and stored, with the id the batch will have, as the
   sync's *pending* batch;
2. the rows of that range are registered as that batch (streamed: memory stays flat);
3. the batch runs (``process_batch``);
4. only once it has completed does the watermark move to the end of the range.

A run that finds a pending batch finishes it — registers it if step 2 never committed,
resumes it from its completed chunks otherwise — instead of reading its rows into a new batch.
A cancelled batch is dropped; the next run reads its range again. Items that failed (a
constraint, a bad value) do not hold the watermark back: they are in the batch's results, and
``retry-failed`` re-runs them. Rows whose cursor is NULL are never read.

Positions are compared as pairs, so rows sharing a cursor value are neither skipped nor read
twice when a batch ends among them. Rows written later with a cursor value at or below the
watermark (a long transaction committing late) are not seen: give the cursor column a value
at commit time, or let the source lag behind.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator, Mapping
from contextlib import AbstractContextManager, closing, contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from batchops.csvio import CsvImport, line_of, open_operations
from batchops.engine import shared_engine
from batchops.errors import BadRequest, BatchInProgress, BatchNotFound, ConfigurationError
from batchops.jsonable import json_value
from batchops.registration import new_batch_id, register_batch
from batchops.resources import Resource
from batchops.runtime import Runtime
from batchops.schemas import BatchState, BatchSummary
from batchops.settings import SyncSpec
from batchops.store import Store
from batchops.tables import metadata, utcnow

__all__ = [
    "BulkSync",
    "Position",
    "SyncBatch",
    "SyncState",
    "SyncSummary",
    "WatermarkMove",
    "read_sync_state",
    "sync_watermarks",
]

sync_watermarks = sa.Table(
    "sync_watermarks",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("watermark", sa.JSON),  # {"cursor", "key"} of the last row applied; null: none yet
    sa.Column("pending_batch_id", sa.String(64)),
    sa.Column("pending_watermark", sa.JSON),  # where the watermark goes once that batch completes
    sa.Column("version", sa.Integer, nullable=False, server_default="0"),  # optimistic lock
    sa.Column("rows_synced", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("synced_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

_ROWS_PER_READ = 2000  # rows fetched from a source table at a time


# -- models ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    """Where a row stands in a sync's order: its cursor value, then its key."""

    cursor: Any
    key: Any

    def as_json(self) -> dict[str, Any]:
        return {"cursor": json_value(self.cursor), "key": json_value(self.key)}


class SyncState(BaseModel):
    """A sync's stored state: its watermark and the batch it has in flight."""

    name: str
    watermark: dict[str, Any] | None = None
    pending_batch_id: str | None = None
    pending_watermark: dict[str, Any] | None = None
    version: int = 0
    rows_synced: int = 0
    synced_at: datetime | None = None


class SyncBatch(BaseModel):
    """The batch a sync run processes next."""

    sync_name: str
    batch_id: str
    total: int
    resumed: bool  # the pending batch of an earlier run, not new rows


class WatermarkMove(BaseModel):
    """What finishing a sync batch did to the watermark."""

    advanced: bool  # False: the batch was cancelled (dropped) or has not completed
    watermark: dict[str, Any] | None


class SyncSummary(BaseModel):
    """One sync's part of a bulk-sync run."""

    sync_name: str
    batches: list[str] = []
    rows: int = 0
    succeeded: int = 0
    failed: int = 0
    watermark: dict[str, Any] | None = None

    def with_batch(self, batch: SyncBatch, summary: BatchSummary,
                   move: WatermarkMove) -> SyncSummary:
        return self.model_copy(update={
            "batches": [*self.batches, batch.batch_id],
            "rows": self.rows + summary.total,
            "succeeded": self.succeeded + summary.succeeded,
            "failed": self.failed + summary.failed,
            "watermark": move.watermark,
        })


# -- the stored state --------------------------------------------------------------------------


def read_sync_state(store: Store, name: str) -> SyncState:
    """The sync's state; an empty one for a sync that never ran."""
    with store.read() as conn:
        row = conn.execute(sync_watermarks.select().where(sync_watermarks.c.name == name)
                           ).mappings().first()
    if row is None:
        return SyncState(name=name)
    return SyncState.model_validate({k: v for k, v in row.items() if k != "updated_at"})


def _ensure_state_row(conn: Connection, name: str) -> None:
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    conn.execute(insert(sync_watermarks).values(name=name, updated_at=utcnow())
                 .on_conflict_do_nothing(index_elements=["name"]))


def _update_state(conn: Connection, state: SyncState, **values: Any) -> bool:
    """Change the state if nobody has since it was read (its ``version``)."""
    t = sync_watermarks.c
    return conn.execute(sync_watermarks.update().where(
        t.name == state.name, t.version == state.version,
    ).values(version=t.version + 1, updated_at=utcnow(), **values)).rowcount == 1


# -- sources -----------------------------------------------------------------------------------


class _Source(Protocol):
    """What a sync reads: positions, where its next range ends, the operations of a range."""

    def position(self, data: Mapping[str, Any]) -> Position: ...

    def range_end(self, after: Position | None, rows: int) -> Position | None: ...

    def operations(self, after: Position | None,
                   upto: Position) -> AbstractContextManager[Iterator[Any]]: ...


def _from_json(column: sa.ColumnElement[Any], value: Any) -> Any:
    """A stored position value back as the Python type the column binds."""
    try:
        python_type = column.type.python_type
    except NotImplementedError:
        return value
    if value is None or isinstance(value, python_type):
        return value
    if python_type is datetime:
        return datetime.fromisoformat(value)
    if python_type is date:
        return date.fromisoformat(value)
    if python_type is Decimal:
        return Decimal(str(value))
    return python_type(value)


class _TableSource:
    """Rows of a table, in ``(cursor, primary key)`` order."""

    def __init__(self, name: str, spec: SyncSpec, resource: Resource, default_url: str) -> None:
        assert spec.table is not None
        self.spec = spec
        self.resource = resource
        url = spec.source_url or default_url
        # Another database gets no pool (and none of the store's SQLite settings): a sync
        # opens a few connections per batch.
        self.engine = (shared_engine(url) if url == default_url
                       else sa.create_engine(url, poolclass=sa.pool.NullPool))
        schema, _, table_name = spec.table.rpartition(".")
        try:
            with self.engine.connect().execution_options(read_only=True) as conn:
                self.table = sa.Table(table_name, sa.MetaData(), schema=schema or None,
                                      autoload_with=conn)
        except sa.exc.NoSuchTableError:
            raise ConfigurationError(f"sync {name!r}: the source has no table "
                                     f"{spec.table!r}") from None
        names = [c.name for c in self.table.columns]
        columns = set(names)
        for role, column in (("cursor", spec.cursor), ("primary_key", spec.primary_key)):
            if column not in columns:
                raise ConfigurationError(f"sync {name!r}: {spec.table} has no {role} column "
                                         f"{column!r}")
        targets = resource.spec.columns
        if spec.columns is None:
            self.mapping = {c: c for c in names if c in targets}
        else:
            unknown = [c for c in spec.columns if c not in columns]
            not_targets = [c for c in spec.columns.values() if c not in targets]
            if unknown or not_targets:
                raise ConfigurationError(
                    f"sync {name!r}: columns maps unknown columns (source {unknown}, "
                    f"{resource.name} {not_targets})")
            self.mapping = dict(spec.columns)
        pk = resource.primary_key
        # The target record's key: the source column mapped onto its primary key, else the
        # source's own primary key.
        self.key_column = next((s for s, t in self.mapping.items() if t == pk), spec.primary_key)
        self.cursor = self.table.c[spec.cursor]
        self.pk = self.table.c[spec.primary_key]

    def position(self, data: Mapping[str, Any]) -> Position:
        return Position(_from_json(self.cursor, data["cursor"]), _from_json(self.pk, data["key"]))

    def _after(self, pos: Position | None) -> sa.ColumnElement[bool]:
        if pos is None:
            return self.cursor.is_not(None)
        return sa.or_(self.cursor > pos.cursor,
                      sa.and_(self.cursor == pos.cursor, self.pk > pos.key))

    def _upto(self, pos: Position) -> sa.ColumnElement[bool]:
        return sa.or_(self.cursor < pos.cursor,
                      sa.and_(self.cursor == pos.cursor, self.pk <= pos.key))

    def range_end(self, after: Position | None, rows: int) -> Position | None:
        """The position of the ``rows``-th row after ``after`` (or of the last one)."""
        query = sa.select(self.cursor, self.pk).where(self._after(after))
        with self.engine.connect().execution_options(read_only=True) as conn:
            row = conn.execute(query.order_by(self.cursor, self.pk)
                               .offset(rows - 1).limit(1)).first()
            if row is None:
                row = conn.execute(query.order_by(self.cursor.desc(), self.pk.desc())
                                   .limit(1)).first()
        return None if row is None else Position(row[0], row[1])

    def _operation(self, row: Mapping[Any, Any]) -> dict[str, Any]:
        pk = self.resource.primary_key
        key = row[self.key_column]
        body = {t: json_value(row[s]) for s, t in self.mapping.items() if t != pk}
        op: dict[str, Any] = {"id": str(row[self.spec.primary_key]), "method": self.spec.method}
        if self.spec.method == "POST":
            op["path"] = f"/{self.resource.name}"
            body[pk] = json_value(key)
        else:
            op["path"] = f"/{self.resource.name}/{quote(str(key), safe='')}"
        op["body"] = body
        return op

    @contextmanager
    def operations(self, after: Position | None, upto: Position) -> Iterator[Iterator[Any]]:
        """The operations of the rows in ``(after, upto]``, in order, fetched page by page."""
        wanted = {self.spec.primary_key, self.key_column, *self.mapping}
        query = (sa.select(*[self.table.c[c] for c in sorted(wanted)])
                 .where(self._after(after), self._upto(upto))
                 .order_by(self.cursor, self.pk))
        with self.engine.connect().execution_options(
                read_only=True, stream_results=True, yield_per=_ROWS_PER_READ) as conn:
            yield (self._operation(row) for row in conn.execute(query).mappings())


@dataclass(frozen=True)
class _CsvFile:
    path: Path
    position: Position

    def estimated_rows(self) -> int:
        """Lines after the header (a cell spanning lines counts more than once)."""
        with self.path.open("rb") as fh:
            lines = sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))
        return max(lines, 1)


class _CsvDirectorySource:
    """Rows of the CSV files in a directory, file by file in ``(mtime, name)`` order.

    A file is read whole; a file changed after it was synced is read again. Files should
    appear whole (written elsewhere, then renamed into the directory).
    """

    def __init__(self, name: str, spec: SyncSpec, runtime: Runtime) -> None:
        assert spec.csv_dir is not None
        self.directory = spec.csv_dir
        if not self.directory.is_dir():
            raise ConfigurationError(f"sync {name!r}: {self.directory} is not a directory")
        try:
            self.csv = CsvImport.for_route(runtime.router, spec.resource, spec.method)
        except BadRequest as exc:
            raise ConfigurationError(f"sync {name!r}: {exc.message}") from None

    def position(self, data: Mapping[str, Any]) -> Position:
        return Position(int(data["cursor"]), str(data["key"]))

    def _files(self, after: Position | None, upto: Position | None = None) -> list[_CsvFile]:
        files = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.is_file() and entry.name.lower().endswith(".csv"):
                    pos = Position(entry.stat().st_mtime_ns, entry.name)
                    if ((after is None or (pos.cursor, pos.key) > (after.cursor, after.key))
                            and (upto is None or (pos.cursor, pos.key) <= (upto.cursor,
                                                                           upto.key))):
                        files.append(_CsvFile(Path(entry.path), pos))
        return sorted(files, key=lambda f: (f.position.cursor, f.position.key))

    def range_end(self, after: Position | None, rows: int) -> Position | None:
        """The last of the files after ``after`` that fit in ``rows`` rows (at least one)."""
        end: Position | None = None
        total = 0
        for file in self._files(after):
            total += file.estimated_rows()
            if end is not None and total > rows:
                break
            end = file.position
        return end

    def _file_operations(self, files: list[_CsvFile]) -> Generator[dict[str, Any], None, None]:
        for file in files:
            with open_operations(file.path, csv=self.csv) as ops:
                for op in ops:
                    # Ids name the file and the line, unique across the batch's files.
                    op["id"] = f"{file.path.name} line {line_of(op['id'])}"
                    yield op

    @contextmanager
    def operations(self, after: Position | None, upto: Position) -> Iterator[Iterator[Any]]:
        """The operations of the rows of the files in ``(after, upto]``, file by file."""
        with closing(self._file_operations(self._files(after, upto))) as ops:
            yield ops


# -- a sync ------------------------------------------------------------------------------------


class BulkSync:
    """One configured sync: its next batch, and its watermark once a batch has run."""

    def __init__(self, runtime: Runtime, name: str) -> None:
        spec = runtime.settings.bulk_sync.syncs.get(name)
        if spec is None:
            known = ", ".join(sorted(runtime.settings.bulk_sync.syncs)) or "none"
            raise ConfigurationError(f"no sync named {name!r} is configured (syncs: {known})")
        self.runtime = runtime
        self.name = name
        self.spec = spec

    @cached_property
    def source(self) -> _Source:
        if self.spec.csv_dir is not None:
            return _CsvDirectorySource(self.name, self.spec, self.runtime)
        resource = self.runtime.resources.get(self.spec.resource)
        if resource is None:
            known = ", ".join(sorted(self.runtime.resources)) or "none"
            raise ConfigurationError(f"sync {self.name!r}: no resource {self.spec.resource!r} "
                                     f"(resources: {known})")
        return _TableSource(self.name, self.spec, resource, self.runtime.settings.database_url)

    def state(self) -> SyncState:
        return read_sync_state(self.runtime.store, self.name)

    def next_batch(self) -> SyncBatch | None:
        """The pending batch of an earlier run, or the next rows as a new batch; ``None``
        when nothing changed since the watermark."""
        store = self.runtime.store
        while True:
            state = self.state()
            if state.pending_batch_id is None:
                return self._register_next(state)
            try:
                batch = store.get_batch(state.pending_batch_id)
            except BatchNotFound:
                # The run that fixed the range stopped before its batch was registered.
                return self._register(state, state.pending_batch_id, resumed=True)
            if batch.status in (BatchState.COMPLETED.value, BatchState.CANCELLED.value):
                self.advance(batch.id)  # that run stopped before moving the watermark
                continue
            return SyncBatch(sync_name=self.name, batch_id=batch.id, total=batch.total,
                             resumed=True)

    def _register_next(self, state: SyncState) -> SyncBatch | None:
        after = None if state.watermark is None else self.source.position(state.watermark)
        end = self.source.range_end(after, self.spec.batch_rows)
        if end is None:
            return None
        batch_id = new_batch_id()
        with self.runtime.store.engine.begin() as conn:
            _ensure_state_row(conn, self.name)
            claimed = _update_state(conn, state, pending_batch_id=batch_id,
                                    pending_watermark=end.as_json())
        if not claimed:
            raise BatchInProgress(f"sync {self.name!r} is being run by another flow run")
        return self._register(state.model_copy(update={"pending_watermark": end.as_json()}),
                              batch_id, resumed=False)

    def _register(self, state: SyncState, batch_id: str, *, resumed: bool) -> SyncBatch:
        assert state.pending_watermark is not None
        source = self.source
        after = None if state.watermark is None else source.position(state.watermark)
        upto = source.position(state.pending_watermark)
        settings = self.runtime.settings
        with source.operations(after, upto) as ops:
            _, total = register_batch(self.runtime, ops, batch_id=batch_id,
                                      concurrency=self.spec.concurrency,
                                      max_operations=settings.api.max_import_rows, source="sync")
        return SyncBatch(sync_name=self.name, batch_id=batch_id, total=total, resumed=resumed)

    def advance(self, batch_id: str) -> WatermarkMove:
        """After ``batch_id`` ran: completed, the watermark moves to the end of its range;
        cancelled, the batch is dropped (its range is read again); otherwise nothing changes."""
        state = self.state()
        if state.pending_batch_id != batch_id:
            return WatermarkMove(advanced=False, watermark=state.watermark)
        batch = self.runtime.store.get_batch(batch_id)
        if batch.status == BatchState.COMPLETED.value:
            values: dict[str, Any] = {
                "watermark": state.pending_watermark, "pending_batch_id": None,
                "pending_watermark": None, "rows_synced": state.rows_synced + batch.total,
                "synced_at": utcnow()}
        elif batch.status == BatchState.CANCELLED.value:
            values = {"pending_batch_id": None, "pending_watermark": None}
        else:
            return WatermarkMove(advanced=False, watermark=state.watermark)
        with self.runtime.store.engine.begin() as conn:
            if not _update_state(conn, state, **values):
                raise BatchInProgress(f"sync {self.name!r} is being run by another flow run")
        watermark = values.get("watermark", state.watermark)
        return WatermarkMove(advanced="watermark" in values, watermark=watermark)
