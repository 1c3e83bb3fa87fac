"""The batch store (SQLAlchemy 2 Core): batches, their chunks, idempotency records.

The chunk is the unit of storage as it is of orchestration: a batch's operations are stored
per chunk (one row per chunk, as JSON; chunks are sized by work, see
``batchops.planning.ChunkSizing``), so registering a 100,000-item batch writes a few dozen
rows, and a chunk's item results are written into its row in one update (with its
checkpoint), together with the batch counters in one more, in the chunk's transaction.
Reading results walks the chunks in order.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import TypeAdapter
from sqlalchemy.engine import Connection, Engine

from batchops.errors import BatchFinished, BatchInProgress, BatchNotFound, TransientError
from batchops.progress import RedisProgress
from batchops.schemas import (
    BatchState,
    BatchStatus,
    ChunkRef,
    ItemResult,
    ItemState,
    PlannedOperation,
)

__all__ = ["BatchRecord", "Claims", "IdempotencyRecord", "Store", "create_engine", "metadata",
           "utcnow"]

metadata = sa.MetaData()

batches = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("scope", sa.String(128), nullable=False, server_default="default"),
    sa.Column("source", sa.String(32), nullable=False, server_default="api"),
    sa.Column("total", sa.Integer, nullable=False, server_default="0"),
    sa.Column("completed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("succeeded", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("skipped", sa.Integer, nullable=False, server_default="0"),
    sa.Column("concurrency", sa.Integer, nullable=False),
    sa.Column("chunk_size", sa.Integer, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
    sa.Column("flow_run_id", sa.String(64)),
    sa.Column("error", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True)),
    sa.Column("recoveries", sa.Integer, nullable=False, server_default="0"),
    # No item starts after deadline_at; a retry moves it deadline_seconds past the retry.
    sa.Column("deadline_seconds", sa.Float),
    sa.Column("deadline_at", sa.DateTime(timezone=True)),
)
sa.Index("ix_batches_status_heartbeat", batches.c.status, batches.c.heartbeat_at)

batch_chunks = sa.Table(
    "batch_chunks",
    metadata,
    sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("chunk_index", sa.Integer, primary_key=True),
    sa.Column("start", sa.Integer, nullable=False),
    sa.Column("end", sa.Integer, nullable=False),
    sa.Column("cache_token", sa.String(64), nullable=False),
    sa.Column("depends_on", sa.JSON, nullable=False),
    sa.Column("operations", sa.Text, nullable=False),
    sa.Column("done", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("succeeded", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("skipped", sa.Integer, nullable=False, server_default="0"),
    sa.Column("results", sa.Text),  # JSON array of ItemResult, in index order, once done
    sa.Column("completed_at", sa.DateTime(timezone=True)),
)

idempotency_records = sa.Table(
    "idempotency_records",
    metadata,
    sa.Column("scope", sa.String(128), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("payload_hash", sa.String(64), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("result", sa.JSON),
    sa.Column("batch_id", sa.String(64), nullable=False),
    sa.Column("item_index", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
)
sa.Index("ix_idempotency_expires", idempotency_records.c.expires_at)

# An idempotency key being executed right now, and by which batch: a second batch with the
# same key waits for the first's result instead of sending it again.
item_claims = sa.Table(
    "item_claims",
    metadata,
    sa.Column("scope", sa.String(128), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("batch_id", sa.String(64), nullable=False),
    sa.Column("item_index", sa.Integer, nullable=False),
    sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
)

# Prefect global-concurrency-limit leases a batch's run holds for its upstream requests, with
# their slots and the last time their holder said it is alive: the slots of a limit that no
# live lease accounts for are given back (batchops.limit_leases), and the reaper releases the
# leases of a dead run before the re-run.
limit_leases = sa.Table(
    "limit_leases",
    metadata,
    sa.Column("lease_id", sa.String(36), primary_key=True),
    sa.Column("batch_id", sa.String(64), nullable=False, index=True),
    sa.Column("limit_name", sa.String(255), nullable=False),
    sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("slots", sa.Integer, nullable=False, server_default="0"),
    sa.Column("renewed_at", sa.DateTime(timezone=True)),
)

# Who is reconciling a limit's slots with the leases, until when: one process at a time, or two
# would give back the same slots twice.
limit_reconciliations = sa.Table(
    "limit_reconciliations",
    metadata,
    sa.Column("limit_name", sa.String(255), primary_key=True),
    sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=False),
)

# Each item's outcome as soon as it is known (before its chunk is recorded): a run that
# resumes a crashed chunk answers these items from here instead of executing them again.
item_checkpoints = sa.Table(
    "item_checkpoints",
    metadata,
    sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("generation", sa.Integer, primary_key=True),
    sa.Column("item_index", sa.Integer, primary_key=True),
    sa.Column("result", sa.Text, nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)

_OPS = TypeAdapter(list[PlannedOperation])
_RESULTS = TypeAdapter(list[ItemResult])


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; they were written as UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _deadline_from(now: datetime, seconds: float | None) -> datetime | None:
    return None if seconds is None else now + timedelta(seconds=seconds)


def _count(results: Sequence[ItemResult], *states: ItemState) -> tuple[int, ...]:
    return tuple(sum(1 for r in results if r.state is state) for state in states)


_SQLITE_BUSY_TIMEOUT_MS = 60_000  # a SQLite writer waits this long for the lock


def create_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with the settings batchops needs for the dialect (SQLite: threads, WAL)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 60}, **kwargs
        )

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let pysqlite not issue BEGIN itself, so SAVEPOINTs work; WAL for readers.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across app crashes
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # Writers take the lock up front (IMMEDIATE): two writers never deadlock on an
            # upgrade from read to write. Readers (``read_only``) do not block anyone in WAL.
            if conn.get_execution_options().get("read_only"):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    # No pre-ping (a round trip per checkout): a connection that died raises, the pool drops
    # it, and the chunk task's retry on connection errors runs the chunk again.
    kwargs.setdefault("pool_recycle", 1800)
    return sa.create_engine(url, **kwargs)


@dataclass(frozen=True)
class BatchRecord:
    id: str
    status: str
    scope: str
    total: int
    completed: int
    succeeded: int
    failed: int
    concurrency: int
    chunk_size: int
    generation: int
    flow_run_id: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None = None
    recoveries: int = 0
    skipped: int = 0
    deadline_seconds: float | None = None
    deadline_at: datetime | None = None


@dataclass(frozen=True)
class Claims:
    """Outcome of claiming idempotency keys: ``mine`` to execute, ``busy`` held elsewhere."""

    mine: set[str]
    busy: set[str]


@dataclass(frozen=True)
class IdempotencyRecord:
    key: str
    payload_hash: str
    status: int
    result: Any
    batch_id: str
    item_index: int


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def shared_engine(url: str) -> Engine:
    """One engine (one pool) per database URL in this process."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = create_engine(url)
        return engine


def _checkpoint_json(result: ItemResult) -> str:
    """The item's result with its attempts' errors, which API answers leave out: a run that
    resumes from the checkpoint records the item's dead letter from them."""
    if not result.attempt_errors:
        return result.model_dump_json()
    data = result.model_dump(mode="json")
    data["attempt_errors"] = [e.model_dump(mode="json") for e in result.attempt_errors]
    return json.dumps(data)


class Store:
    """Reads and writes batches; every method is one short transaction unless it takes ``conn``."""

    def __init__(self, url: str, engine: Engine | None = None,
                 progress: RedisProgress | None = None) -> None:
        self.url = url
        self.engine = engine or shared_engine(url)
        self.progress = progress  # status snapshots in Redis (batchops.progress), if set
        self._finish_listeners: list[Callable[[str], None]] = []

    def on_finished(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(batch_id)`` whenever this process has marked a batch finished
        (committed; in the marking thread): the API answers a sync batch then."""
        self._finish_listeners.append(listener)

    def read(self) -> Connection:
        """A connection for reads (on SQLite it does not take the write lock)."""
        return self.engine.connect().execution_options(read_only=True)

    def check_writable(self) -> None:
        """Raise :class:`TransientError` unless the store accepts writes now: an update that
        matches no row, rolled back. A read-only database (a replica, a failover under way,
        ``default_transaction_read_only``) or file refuses it; ``SELECT 1`` would not tell.
        On SQLite a writer holding the lock shows the file is writable: that is ready."""
        try:
            with self.engine.connect() as conn:
                sqlite = conn.dialect.name == "sqlite"
                # On the driver's connection: through SQLAlchemy it would begin a transaction.
                raw: Any = conn.connection.driver_connection
                if sqlite:  # for the lock, a second rather than the writers' minute
                    raw.execute("PRAGMA busy_timeout = 1000")
                try:
                    with conn.begin() as tx:
                        if not sqlite:
                            conn.exec_driver_sql("SET LOCAL lock_timeout = '1s'")
                        conn.execute(batches.update().where(sa.false())
                                     .values(status=batches.c.status))
                        tx.rollback()
                except sa.exc.OperationalError as exc:
                    if not (sqlite and "database is locked" in str(exc.orig)):
                        raise
                finally:
                    if sqlite:
                        raw.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_MS}")
        except sa.exc.DBAPIError as exc:
            message = (str(exc.orig).strip().splitlines() or [""])[0]
            raise TransientError(f"the store refuses writes: {message}") from exc

    # -- schema -------------------------------------------------------------------------

    def migrate(self, tables: Sequence[sa.Table] = ()) -> None:
        """Bring the store's schema to the newest migration (Alembic), then create ``tables``
        of its database if missing — under one lock when processes start at once. A store
        that is current already is left alone (:func:`~batchops.migrate.is_current`)."""
        from batchops.migrate import is_current, upgrade

        if is_current(self.engine, tables):
            return

        def create(conn: Connection) -> None:
            for table in tables:
                table.create(conn, checkfirst=True)

        upgrade(self.engine, then=create)

    # -- registration -------------------------------------------------------------------

    def insert_batch(self, conn: Connection, batch_id: str, *, concurrency: int,
                     chunk_size: int, scope: str, source: str,
                     deadline_seconds: float | None = None) -> None:
        now = utcnow()
        conn.execute(batches.insert().values(
            id=batch_id, status=BatchState.QUEUED.value, scope=scope, source=source, total=0,
            concurrency=concurrency, chunk_size=chunk_size, created_at=now,
            deadline_seconds=deadline_seconds,
            deadline_at=_deadline_from(now, deadline_seconds),
        ))

    def insert_chunk(self, conn: Connection, ref: ChunkRef, ops: Sequence[PlannedOperation],
                     depends_on: Sequence[int]) -> None:
        conn.execute(batch_chunks.insert().values(
            batch_id=ref.batch_id, chunk_index=ref.chunk_index, start=ref.start, end=ref.end,
            cache_token=ref.cache_token, depends_on=list(depends_on),
            operations=_OPS.dump_json(list(ops)).decode(),
        ))

    def set_total(self, conn: Connection, batch_id: str, total: int) -> None:
        conn.execute(batches.update().where(batches.c.id == batch_id).values(total=total))

    # -- reading ------------------------------------------------------------------------

    def get_batch(self, batch_id: str) -> BatchRecord:
        with self.read() as conn:
            row = conn.execute(batches.select().where(batches.c.id == batch_id)).mappings().first()
        if row is None:
            raise BatchNotFound(batch_id)
        data = dict(row)
        data.pop("source", None)
        for name in ("created_at", "started_at", "finished_at", "heartbeat_at", "deadline_at"):
            data[name] = _aware(data[name])
        return BatchRecord(**data)

    def batch_status(self, batch_id: str) -> str:
        """The batch's status column alone (a running chunk asks twice a second)."""
        with self.read() as conn:
            status = conn.execute(sa.select(batches.c.status).where(
                batches.c.id == batch_id)).scalar()
        if status is None:
            raise BatchNotFound(batch_id)
        return str(status)

    def batch_of_flow_run(self, flow_run_id: str) -> str | None:
        """The batch a flow run is (or was last) processing."""
        with self.read() as conn:
            found = conn.execute(sa.select(batches.c.id).where(
                batches.c.flow_run_id == flow_run_id).limit(1)).scalar()
        return None if found is None else str(found)

    def status(self, batch_id: str, ui_url: str | None = None) -> BatchStatus:
        """The batch's status: from the Redis snapshot when there is one, else the database."""
        current = self.progress.read(batch_id) if self.progress is not None else None
        if current is None:
            current = self.stored_status(batch_id)
        if ui_url and current.flow_run_id:
            current.ui_url = f"{ui_url.rstrip('/')}/runs/flow-run/{current.flow_run_id}"
        return current

    def stored_status(self, batch_id: str) -> BatchStatus:
        """The batch's status as the database has it."""
        b = self.get_batch(batch_id)
        return BatchStatus(
            batch_id=b.id, status=BatchState(b.status), total=b.total, completed=b.completed,
            succeeded=b.succeeded, failed=b.failed, skipped=b.skipped,
            deadline_at=b.deadline_at, progress=round(b.completed / b.total, 4) if b.total else 1.0,
            started_at=b.started_at, finished_at=b.finished_at, flow_run_id=b.flow_run_id,
        )

    def publish_status(self, batch_id: str) -> None:
        """Copy the committed status to Redis (when configured); after every change."""
        if self.progress is not None:
            self.progress.publish(self.stored_status(batch_id))

    def chunk_plan(self, batch_id: str) -> list[tuple[ChunkRef, list[int]]]:
        """Every chunk of the batch, in order, with the chunks it must wait for."""
        c = batch_chunks.c
        query = sa.select(c.chunk_index, c.start, c.end, c.cache_token, c.depends_on).where(
            c.batch_id == batch_id)
        with self.read() as conn:
            rows = conn.execute(query.order_by(c.chunk_index)).all()
        return [(ChunkRef(batch_id=batch_id, chunk_index=r.chunk_index, start=r.start, end=r.end,
                          cache_token=r.cache_token), list(r.depends_on)) for r in rows]

    def unrecorded_chunks(self, batch_id: str) -> list[ChunkRef]:
        """The batch's chunks that have no results yet, in order."""
        c = batch_chunks.c
        with self.read() as conn:
            rows = conn.execute(sa.select(c.chunk_index, c.start, c.end, c.cache_token).where(
                c.batch_id == batch_id, c.done.is_(False)).order_by(c.chunk_index)).all()
        return [ChunkRef(batch_id=batch_id, chunk_index=r.chunk_index, start=r.start, end=r.end,
                         cache_token=r.cache_token) for r in rows]

    def chunk_operations(self, batch_id: str, chunk_index: int) -> list[PlannedOperation]:
        with self.read() as conn:
            raw = conn.execute(sa.select(batch_chunks.c.operations).where(
                batch_chunks.c.batch_id == batch_id, batch_chunks.c.chunk_index == chunk_index,
            )).scalar_one()
        return _OPS.validate_json(raw)

    def open_chunk(self, conn: Connection,
                   ref: ChunkRef) -> tuple[list[PlannedOperation], bool, list[ItemResult]]:
        """``(operations, done, results)`` of a chunk, its row locked for ``conn``'s
        transaction so runs of one chunk serialize (PostgreSQL row lock; SQLite's writer lock
        already does): one round trip where reading, locking and looking took three.

        ``results`` are a done chunk's results, or what a chunk reopened for a retry had
        recorded before (empty for a chunk that never completed); a done chunk's operations
        are not parsed (``[]``): it does not run again.
        """
        c = batch_chunks.c
        query = sa.select(c.operations, c.done, c.results).where(
            c.batch_id == ref.batch_id, c.chunk_index == ref.chunk_index)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = conn.execute(query).one()
        done = bool(row.done) and row.results is not None
        ops = [] if done else _OPS.validate_json(row.operations)
        recorded = [] if row.results is None else _RESULTS.validate_json(row.results)
        return ops, done, recorded

    def iter_results(self, batch_id: str, *, state: ItemState | None = None, after: int = -1,
                     limit: int | None = None, chunks_per_read: int = 8) -> Iterator[ItemResult]:
        """Recorded results in index order, ``after`` an index, read a few chunks at a time
        (constant memory for big batches). Items of chunks still running are not listed."""
        c = batch_chunks.c
        emitted = 0
        next_chunk = 0
        while True:
            query = sa.select(c.chunk_index, c.results).where(
                c.batch_id == batch_id, c.chunk_index >= next_chunk, c.end > after + 1,
                c.done.is_(True))
            if state is ItemState.FAILED:
                query = query.where(c.failed > 0)
            elif state is ItemState.SUCCEEDED:
                query = query.where(c.succeeded > 0)
            elif state is ItemState.SKIPPED:
                query = query.where(c.skipped > 0)
            with self.read() as conn:
                rows = conn.execute(query.order_by(c.chunk_index).limit(chunks_per_read)).all()
            if not rows:
                return
            for row in rows:
                for item in _RESULTS.validate_json(row.results):
                    if item.index <= after or (state is not None and item.state != state):
                        continue
                    yield item
                    emitted += 1
                    if limit is not None and emitted >= limit:
                        return
            next_chunk = rows[-1].chunk_index + 1

    # -- recording ----------------------------------------------------------------------

    def record_chunk(self, conn: Connection, ref: ChunkRef, results: Sequence[ItemResult],
                     new: Sequence[ItemResult]) -> None:
        """The chunk's results and checkpoint (one update), the counters (one update).

        ``results`` is every item of the chunk; ``new`` the ones not counted before (all of
        them, except on a retry, where the kept successes were counted already).
        """
        succeeded, skipped = _count(results, ItemState.SUCCEEDED, ItemState.SKIPPED)
        new_succeeded, new_skipped = _count(new, ItemState.SUCCEEDED, ItemState.SKIPPED)
        conn.execute(batch_chunks.update().where(
            batch_chunks.c.batch_id == ref.batch_id, batch_chunks.c.chunk_index == ref.chunk_index,
        ).values(done=True, completed_at=utcnow(), succeeded=succeeded, skipped=skipped,
                 failed=len(results) - succeeded - skipped,
                 results=_RESULTS.dump_json(list(results)).decode()))
        conn.execute(batches.update().where(batches.c.id == ref.batch_id).values(
            completed=batches.c.completed + len(new),
            succeeded=batches.c.succeeded + new_succeeded,
            skipped=batches.c.skipped + new_skipped,
            failed=batches.c.failed + (len(new) - new_succeeded - new_skipped),
            heartbeat_at=utcnow(),
        ))

    def item_results(self, conn: Connection, batch_id: str,
                     indexes: Collection[int]) -> dict[int, ItemResult]:
        """The recorded results of ``indexes`` (items of chunks not recorded are absent)."""
        if not indexes:
            return {}
        c = batch_chunks.c
        rows = conn.execute(sa.select(c.start, c.end, c.results).where(
            c.batch_id == batch_id, c.start <= max(indexes), c.end > min(indexes),
            c.results.is_not(None)).order_by(c.chunk_index)).all()
        found: dict[int, ItemResult] = {}
        for row in rows:
            if any(row.start <= i < row.end for i in indexes):
                found.update((r.index, r) for r in _RESULTS.validate_json(row.results)
                             if r.index in indexes)
        return found

    def set_deadline(self, batch_id: str, seconds: float) -> None:
        """No item of the batch starts later than ``seconds`` from now (and from a retry)."""
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(batches.update().where(batches.c.id == batch_id).values(
                deadline_seconds=seconds, deadline_at=_deadline_from(now, seconds)))

    def mark_started(self, batch_id: str, flow_run_id: str | None) -> bool:
        """Processing under this flow run; ``False`` when the batch was cancelled."""
        with self.engine.begin() as conn:
            started = conn.execute(batches.update().where(
                batches.c.id == batch_id, batches.c.status != BatchState.CANCELLED.value,
            ).values(
                status=BatchState.PROCESSING.value, flow_run_id=flow_run_id,
                started_at=sa.func.coalesce(batches.c.started_at, utcnow()),
                finished_at=None, error=None, heartbeat_at=utcnow(),
            )).rowcount == 1
        self.publish_status(batch_id)
        return started

    def mark_finished(self, batch_id: str, state: BatchState, error: str | None = None) -> None:
        """Final status, when every item has its result. A cancelled batch stays cancelled:
        it gets its ``finished_at``, as its items have their results now too."""
        b = batches.c
        with self.engine.begin() as conn:
            conn.execute(batches.update().where(
                b.id == batch_id, b.status != BatchState.CANCELLED.value,
            ).values(status=state.value, finished_at=utcnow(), error=error))
            conn.execute(batches.update().where(
                b.id == batch_id, b.status == BatchState.CANCELLED.value,
                b.finished_at.is_(None)).values(finished_at=utcnow()))
        for listener in self._finish_listeners:
            listener(batch_id)
        self.publish_status(batch_id)

    def note_error(self, batch_id: str, error: str) -> None:
        """Why the batch's run could not finish, on a batch left for the reaper to resume."""
        with self.engine.begin() as conn:
            conn.execute(batches.update().where(batches.c.id == batch_id).values(error=error))
        self.publish_status(batch_id)

    def cancel(self, batch_id: str) -> str:
        """Queued or processing → cancelled, in one conditional update (a batch finishing
        meanwhile is not cancelled); the status it had. Cancelling a cancelled batch changes
        nothing; a batch that has completed or failed cannot be cancelled (:class:`BatchFinished`).

        Its items that have no result yet get one (``skipped``, ``cancelled``) from whoever
        stops its run — ``finished_at`` is set then (see :mod:`batchops.cancellation`).
        """
        b = batches.c
        active = [BatchState.QUEUED.value, BatchState.PROCESSING.value]
        with self.engine.begin() as conn:
            was = conn.execute(sa.select(b.status).where(b.id == batch_id)
                               .with_for_update()).scalar()
            if was is None:
                raise BatchNotFound(batch_id)
            if was in active:
                conn.execute(batches.update().where(b.id == batch_id, b.status.in_(active))
                             .values(status=BatchState.CANCELLED.value))
        if was in (BatchState.COMPLETED.value, BatchState.FAILED.value):
            raise BatchFinished(f"batch {batch_id} has already {was}")
        self.publish_status(batch_id)
        return str(was)

    def prepare_retry(self, batch_id: str) -> int:
        """Open the batch's failed, skipped (and never-run) items for another run; how many.

        Chunks with failures or skipped items are reopened (their succeeded results are kept
        and not run again), the counters lose the failed and skipped items, the batch is
        queued under a new generation so chunk cache keys change, and a batch with a deadline
        gets a new one, ``deadline_seconds`` from now.
        """
        c = batch_chunks.c
        with self.engine.begin() as conn:
            batch = conn.execute(batches.select().where(batches.c.id == batch_id)
                                 .with_for_update()).mappings().first()
            if batch is None:
                raise BatchNotFound(batch_id)
            if batch["status"] in (BatchState.QUEUED.value, BatchState.PROCESSING.value):
                raise BatchInProgress(f"batch {batch_id} is {batch['status']}; retry it once it "
                                      "has finished")
            failed, skipped = (int(n) for n in conn.execute(sa.select(
                sa.func.coalesce(sa.func.sum(c.failed), 0),
                sa.func.coalesce(sa.func.sum(c.skipped), 0),
            ).where(c.batch_id == batch_id, c.done.is_(True))).one())
            to_run = int(batch["total"]) - int(batch["completed"]) + failed + skipped
            if to_run == 0:
                return 0  # every item succeeded: nothing to run, nothing changes
            conn.execute(batch_chunks.update().where(
                c.batch_id == batch_id, c.done.is_(True), (c.failed > 0) | (c.skipped > 0),
            ).values(done=False))
            self._carry_checkpoints(conn, batch_id, int(batch["generation"]))
            conn.execute(batches.update().where(batches.c.id == batch_id).values(
                status=BatchState.QUEUED.value, generation=batches.c.generation + 1,
                heartbeat_at=utcnow(),
                completed=batches.c.completed - failed - skipped,
                failed=batches.c.failed - failed, skipped=batches.c.skipped - skipped,
                deadline_at=_deadline_from(utcnow(), batch["deadline_seconds"]),
                finished_at=None, error=None,
            ))
        self.publish_status(batch_id)
        return to_run

    def _carry_checkpoints(self, conn: Connection, batch_id: str, generation: int) -> None:
        """A retry's new generation keeps the successes that a chunk which could not finish
        had checkpointed (they are not executed again); its other checkpoints go, so their
        items run again, and so do any of older generations."""
        t = item_checkpoints
        rows = conn.execute(sa.select(t.c.item_index, t.c.result).where(
            t.c.batch_id == batch_id, t.c.generation == generation)).all()
        drop = [i for i, raw in rows
                if ItemResult.model_validate_json(raw).state is not ItemState.SUCCEEDED]
        conn.execute(t.delete().where(t.c.batch_id == batch_id, t.c.generation != generation))
        for start in range(0, len(drop), 1000):
            conn.execute(t.delete().where(t.c.batch_id == batch_id, t.c.generation == generation,
                                          t.c.item_index.in_(drop[start:start + 1000])))
        if len(drop) < len(rows):
            conn.execute(t.update().where(t.c.batch_id == batch_id, t.c.generation == generation)
                         .values(generation=generation + 1))

    def set_flow_run_id(self, batch_id: str, flow_run_id: str) -> None:
        """The flow run that will process a queued batch (so its UI link shows at once)."""
        with self.engine.begin() as conn:
            conn.execute(batches.update().where(batches.c.id == batch_id)
                         .values(flow_run_id=flow_run_id))
        self.publish_status(batch_id)

    # -- idempotency --------------------------------------------------------------------

    def idempotency_lookup(self, conn: Connection, scope: str,
                           keys: Sequence[str]) -> dict[str, IdempotencyRecord]:
        """Unexpired records for ``keys`` (expired ones count as absent)."""
        if not keys:
            return {}
        t = idempotency_records
        rows = conn.execute(sa.select(t).where(
            t.c.scope == scope, t.c.key.in_(list(set(keys))), t.c.expires_at > utcnow(),
        )).mappings()
        return {
            r["key"]: IdempotencyRecord(r["key"], r["payload_hash"], r["status"], r["result"],
                                        r["batch_id"], r["item_index"])
            for r in rows
        }

    def idempotency_save(self, conn: Connection, scope: str, batch_id: str,
                         entries: Sequence[tuple[PlannedOperation, ItemResult]],
                         retention: timedelta) -> None:
        """Remember succeeded items by key (an expired record is replaced)."""
        if not entries:
            return
        now = utcnow()
        t = idempotency_records
        keys = [op.idempotency_key for op, _ in entries]
        conn.execute(t.delete().where(t.c.scope == scope, t.c.key.in_(keys),
                                      t.c.expires_at <= now))
        # A key saved already (by the chunk's checkpoint writer, or by a batch that ran it
        # first) keeps its first record.
        conn.execute(_dialect_insert(conn)(t).on_conflict_do_nothing(), [
            {"scope": scope, "key": op.idempotency_key, "payload_hash": op.payload_hash,
             "status": r.status, "result": r.result, "batch_id": batch_id,
             "item_index": r.index, "created_at": now, "expires_at": now + retention}
            for op, r in entries
        ])




    # -- claims, checkpoints, heartbeats ------------------------------------------------

    def lock_keys(self, conn: Connection, scope: str, keys: Sequence[str]) -> None:
        """Serialize transactions over the same idempotency keys until they commit
        (PostgreSQL advisory locks, in one order; SQLite's writer lock already does)."""
        if conn.dialect.name != "postgresql" or not keys:
            return
        conn.execute(sa.text(
            "SELECT pg_advisory_xact_lock(hashtextextended(:scope || chr(31) || k, 0)) "
            "FROM unnest(CAST(:keys AS text[])) AS k ORDER BY k"),
            {"scope": scope, "keys": sorted(set(keys))})

    def claim_keys(self, scope: str, batch_id: str, ops: Sequence[PlannedOperation],
                   stale_after: timedelta) -> Claims:
        """Claim the operations' idempotency keys for this batch.

        A key is ``mine`` when nobody held it, when this batch held it already (a run resuming
        after a crash), or when its holder's heartbeat is older than ``stale_after`` (the
        holder died); otherwise it is ``busy``: another batch is executing it right now.
        """
        by_key = {op.idempotency_key: op for op in ops if op.idempotency_key is not None}
        if not by_key:
            return Claims(set(), set())
        t = item_claims
        now = utcnow()
        rows = [{"scope": scope, "key": k, "batch_id": batch_id, "item_index": op.index,
                 "claimed_at": now} for k, op in by_key.items()]
        with self.engine.begin() as conn:
            insert = _dialect_insert(conn)(t).on_conflict_do_nothing()
            conn.execute(insert, rows)
            holders = conn.execute(
                sa.select(t.c.key, t.c.batch_id, batches.c.heartbeat_at, batches.c.status)
                .select_from(t.outerjoin(batches, batches.c.id == t.c.batch_id))
                .where(t.c.scope == scope, t.c.key.in_(list(by_key)))).all()
            mine, busy = set(), set()
            for key, holder, heartbeat, status in holders:
                if holder == batch_id:
                    mine.add(key)
                    continue
                beat = _aware(heartbeat)
                dead = (status is None or BatchState(status).is_final or beat is None
                        or beat < now - stale_after)
                if dead and conn.execute(t.update().where(
                        t.c.scope == scope, t.c.key == key, t.c.batch_id == holder,
                ).values(batch_id=batch_id, item_index=by_key[key].index,
                         claimed_at=now)).rowcount == 1:
                    mine.add(key)
                else:
                    busy.add(key)
            # A key whose holder released it between the insert (which it refused) and the
            # select has no row now: not claimed, so busy, and the caller looks again
            # (it was dropped before, and its item had no result).
            busy.update(by_key.keys() - mine - busy)
        return Claims(mine, busy)

    def release_claims(self, conn: Connection, scope: str, batch_id: str,
                       keys: Sequence[str]) -> None:
        if keys:
            t = item_claims
            conn.execute(t.delete().where(t.c.scope == scope, t.c.batch_id == batch_id,
                                          t.c.key.in_(list(set(keys)))))

    def save_checkpoints(self, conn: Connection, batch_id: str, generation: int,
                         results: Sequence[ItemResult]) -> None:
        if results:
            now = utcnow()
            conn.execute(item_checkpoints.insert(), [
                {"batch_id": batch_id, "generation": generation, "item_index": r.index,
                 "result": _checkpoint_json(r), "recorded_at": now} for r in results])

    def drop_checkpoints(self, conn: Connection, ref: ChunkRef, generation: int) -> None:
        """The chunk is recorded: its items' checkpoints have served their purpose."""
        t = item_checkpoints
        conn.execute(t.delete().where(t.c.batch_id == ref.batch_id, t.c.generation == generation,
                                      t.c.item_index >= ref.start, t.c.item_index < ref.end))

    def checkpointed_count(self, batch_id: str, generation: int) -> int:
        """How many items of the batch's chunks in flight have a checkpointed outcome."""
        t = item_checkpoints
        with self.read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(t).where(
                t.c.batch_id == batch_id, t.c.generation == generation)).scalar_one())

    def checkpoints(self, conn: Connection, batch_id: str, generation: int,
                    indices: Sequence[int]) -> dict[int, ItemResult]:
        """Outcomes checkpointed by an earlier run of this generation, by item index."""
        if not indices:
            return {}
        t = item_checkpoints
        rows = conn.execute(sa.select(t.c.item_index, t.c.result).where(
            t.c.batch_id == batch_id, t.c.generation == generation,
            t.c.item_index.between(min(indices), max(indices)))).all()
        wanted = set(indices)
        return {i: ItemResult.model_validate_json(r) for i, r in rows if i in wanted}

    def heartbeat(self, batch_id: str) -> None:
        with self.engine.begin() as conn:
            self.heartbeat_in(conn, batch_id)

    def heartbeat_in(self, conn: Connection, batch_id: str) -> None:
        conn.execute(batches.update().where(batches.c.id == batch_id)
                     .values(heartbeat_at=utcnow()))

    def stale_batches(self, stale_after: timedelta, unstarted_after: timedelta | None = None,
                      limit: int = 100) -> list[tuple[str, str, str | None]]:
        """``(id, status, flow run id)`` of batches that may have lost their run: processing
        with a heartbeat older than ``stale_after``; queued with a flow run for longer (lost
        only if that run was taken and died, or is gone: the caller asks Prefect); queued
        without any flow run for longer than ``unstarted_after`` (default ``stale_after``):
        the process that registered it died before it started a run; and cancelled ones whose
        run died before it recorded every item (no ``finished_at``)."""
        cutoff = utcnow() - stale_after
        unstarted_cutoff = utcnow() - (unstarted_after or stale_after)
        b = batches.c
        last_sign = sa.func.coalesce(b.heartbeat_at, b.created_at)
        with self.read() as conn:
            rows = conn.execute(sa.select(b.id, b.status, b.flow_run_id).where(
                sa.or_(sa.and_(b.status == BatchState.PROCESSING.value, last_sign < cutoff),
                       sa.and_(b.status == BatchState.QUEUED.value,
                               b.flow_run_id.is_not(None), last_sign < cutoff),
                       sa.and_(b.status == BatchState.QUEUED.value,
                               b.flow_run_id.is_(None), last_sign < unstarted_cutoff),
                       sa.and_(b.status == BatchState.CANCELLED.value,
                               b.finished_at.is_(None), last_sign < cutoff)),
            ).order_by(b.created_at).limit(limit)).all()
        return [(r.id, r.status, r.flow_run_id) for r in rows]

    def add_lease(self, batch_id: str, lease_id: str, limit_name: str, slots: int) -> None:
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(limit_leases.insert().values(
                lease_id=lease_id, batch_id=batch_id, limit_name=limit_name, slots=slots,
                acquired_at=now, renewed_at=now))

    def renew_lease(self, lease_id: str) -> bool:
        """The lease's holder is alive; ``False`` when its record is gone (taken as dead)."""
        with self.engine.begin() as conn:
            return conn.execute(limit_leases.update().where(
                limit_leases.c.lease_id == lease_id).values(renewed_at=utcnow())).rowcount == 1

    def drop_lease(self, lease_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(limit_leases.delete().where(limit_leases.c.lease_id == lease_id))

    def batch_leases(self, batch_id: str) -> list[str]:
        with self.read() as conn:
            return list(conn.execute(sa.select(limit_leases.c.lease_id).where(
                limit_leases.c.batch_id == batch_id)).scalars())

    def live_leases(self, limit_name: str, stale_after: timedelta) -> list[tuple[str, int]]:
        """``(batch id, slots)`` of the leases on ``limit_name`` whose holder renewed them
        within ``stale_after``."""
        c = limit_leases.c
        with self.read() as conn:
            rows = conn.execute(sa.select(c.batch_id, c.slots).where(
                c.limit_name == limit_name,
                sa.func.coalesce(c.renewed_at, c.acquired_at) >= utcnow() - stale_after,
            ).order_by(c.acquired_at)).all()
        return [(r.batch_id, r.slots) for r in rows]

    def stale_leases(self, limit_name: str, stale_after: timedelta) -> list[str]:
        """Ids of the leases on ``limit_name`` that their holder stopped renewing."""
        c = limit_leases.c
        with self.read() as conn:
            return list(conn.execute(sa.select(c.lease_id).where(
                c.limit_name == limit_name,
                sa.func.coalesce(c.renewed_at, c.acquired_at) < utcnow() - stale_after,
            )).scalars())

    def leased_limits(self) -> list[str]:
        """Names of the limits with lease records."""
        with self.read() as conn:
            return list(conn.execute(
                sa.select(limit_leases.c.limit_name).distinct()).scalars())

    def claim_reconciliation(self, limit_name: str, seconds: float) -> bool:
        """Take the turn to reconcile ``limit_name`` for up to ``seconds``; ``False`` while
        another process has it."""
        t = limit_reconciliations
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(_dialect_insert(conn)(t).values(
                limit_name=limit_name, claimed_until=now).on_conflict_do_nothing())
            return conn.execute(t.update().where(
                t.c.limit_name == limit_name, t.c.claimed_until <= now,
            ).values(claimed_until=now + timedelta(seconds=seconds))).rowcount == 1

    def end_reconciliation(self, limit_name: str) -> None:
        t = limit_reconciliations
        with self.engine.begin() as conn:
            conn.execute(t.update().where(t.c.limit_name == limit_name)
                         .values(claimed_until=utcnow()))

    def purge_expired(self, stale_after: timedelta, limit: int = 50_000) -> dict[str, int]:
        """Delete idempotency records past their retention, and the claims of batches that
        finished over ``stale_after`` ago (a run that died left them; they only ever get taken
        over). At most ``limit`` rows of each; how many went."""
        t, c, b = idempotency_records, item_claims, batches.c
        now = utcnow()
        finished = sa.select(b.id).where(
            b.status.in_([s.value for s in BatchState if s.is_final]),
            b.finished_at < now - stale_after)
        return {
            "idempotency_records": self.delete_in_batches(
                t, (t.c.scope, t.c.key), t.c.expires_at <= now, limit),
            "item_claims": self.delete_in_batches(
                c, (c.c.scope, c.c.key), c.c.batch_id.in_(finished), limit),
        }

    def delete_in_batches(self, table: sa.Table, key: Sequence[sa.ColumnElement[Any]],
                          condition: sa.ColumnElement[bool], limit: int = 50_000,
                          batch: int = 5_000) -> int:
        """Delete ``table``'s rows matching ``condition``, at most ``limit``, in transactions
        of ``batch`` rows (each a semi-join on the primary key ``key``); how many went."""
        gone = 0
        while gone < limit:
            some = sa.select(*key).where(condition).limit(min(batch, limit - gone))
            with self.engine.begin() as conn:
                n = conn.execute(table.delete().where(sa.tuple_(*key).in_(some))).rowcount
            gone += n
            if n < batch:
                break
        return gone

    def take_queued_batch(self, batch_id: str) -> bool:
        """Take a new batch for a run in this process: ``False`` when it is no longer queued
        without a flow run (the reaper started one for it, or it was cancelled). Refreshes
        its heartbeat, so the reaper sees it alive until the run marks it started."""
        b = batches.c
        with self.engine.begin() as conn:
            return conn.execute(batches.update().where(
                b.id == batch_id, b.status == BatchState.QUEUED.value, b.flow_run_id.is_(None),
                b.recoveries == 0,
            ).values(heartbeat_at=utcnow())).rowcount == 1

    def take_stale_batch(self, batch_id: str, status: str, stale_after: timedelta,
                         flow_run_id: str | None = None, *, detach: bool = False) -> bool:
        """Take a stale batch for a new run: refreshes its heartbeat and counts a recovery,
        unless it moved meanwhile (another reaper took it, or its run started or changed).
        With ``detach`` the batch leaves its dead run (``flow_run_id`` unset until the new
        run's is set), so nothing else takes it for that run again."""
        cutoff = utcnow() - stale_after
        b = batches.c
        same_run = b.flow_run_id.is_(None) if flow_run_id is None else b.flow_run_id == flow_run_id
        values: dict[str, Any] = {"heartbeat_at": utcnow(), "recoveries": b.recoveries + 1}
        if detach:
            values["flow_run_id"] = None
        with self.engine.begin() as conn:
            return conn.execute(batches.update().where(
                b.id == batch_id, b.status == status, same_run,
                sa.func.coalesce(b.heartbeat_at, b.created_at) < cutoff,
            ).values(**values)).rowcount == 1


def _dialect_insert(conn: Connection) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert
