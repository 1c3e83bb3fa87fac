"""The batch store (SQLAlchemy 2 Core): a batch's row, read and published, and the
repositories of the rest, one per concern, each on the store's engine:

* ``chunks`` (:mod:`batchops.chunk_records`): a batch's chunks, their operations and results;
* ``results`` (:mod:`batchops.results`): recorded results, paged;
* ``idempotency`` (:mod:`batchops.idempotency`): item idempotency records and key claims;
* ``checkpoints`` (:mod:`batchops.checkpoint_records`): item checkpoints and heartbeats;
* ``leases`` (:mod:`batchops.lease_records`): concurrency-limit lease records;
* ``purge`` (:mod:`batchops.purge`): deleting what is kept for a while only.

The tables are in :mod:`batchops.tables`, the engines in :mod:`batchops.engine`; a batch's
status is written by :mod:`batchops.lifecycle` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from batchops.checkpoint_records import CheckpointRecords
from batchops.chunk_records import ChunkRecords
from batchops.engine import SQLITE_BUSY_TIMEOUT_MS, read_only, shared_engine
from batchops.errors import BatchNotFound, TransientError
from batchops.idempotency import IdempotencyStore
from batchops.lease_records import LeaseRecords
from batchops.progress import RedisProgress
from batchops.purge import Purge
from batchops.results import ResultPages
from batchops.schemas import BatchState, BatchStatus
from batchops.tables import aware, batches, utcnow

__all__ = ["BatchRecord", "Store", "deadline_from"]


def deadline_from(now: datetime, seconds: float | None) -> datetime | None:
    return None if seconds is None else now + timedelta(seconds=seconds)


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


class Store:
    """Reads and writes batches; every method is one short transaction unless it takes ``conn``.

    A batch's status is not written here: :class:`batchops.lifecycle.BatchLifecycle` is its
    only writer."""

    def __init__(self, url: str, engine: Engine | None = None,
                 progress: RedisProgress | None = None) -> None:
        self.url = url
        self.engine = engine or shared_engine(url)
        self.progress = progress  # status snapshots in Redis (batchops.progress), if set
        self.chunks = ChunkRecords(self.engine)
        self.checkpoints = CheckpointRecords(self.engine)
        self.idempotency = IdempotencyStore(self.engine)
        self.leases = LeaseRecords(self.engine)
        self.results = ResultPages(self.engine)
        self.purge = Purge(self.engine)

    def read(self) -> Connection:
        """A connection for reads (on SQLite it does not take the write lock)."""
        return read_only(self.engine)

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
                                     .values(error=batches.c.error))
                        tx.rollback()
                except sa.exc.OperationalError as exc:
                    if not (sqlite and "database is locked" in str(exc.orig)):
                        raise
                finally:
                    if sqlite:
                        raw.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
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
            data[name] = aware(data[name])
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

    # -- recording ----------------------------------------------------------------------

    def set_deadline(self, batch_id: str, seconds: float) -> None:
        """No item of the batch starts later than ``seconds`` from now (and from a retry)."""
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(batches.update().where(batches.c.id == batch_id).values(
                deadline_seconds=seconds, deadline_at=deadline_from(now, seconds)))

    # -- recovery ---------------------------------------------------------------------

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
