"""A batch's chunks: the unit of storage as it is of orchestration.

A batch's operations are stored per chunk (one row per chunk, as JSON; chunks are sized by
work, see ``batchops.planning.ChunkSizing``), so registering a 100,000-item batch writes a few
dozen rows, and a chunk's item results are written into its row in one update (with its
checkpoint), together with the batch counters in one more, in the chunk's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from pydantic import TypeAdapter
from sqlalchemy.engine import Connection, Engine

from batchops.engine import read_only
from batchops.schemas import ChunkRef, ItemResult, ItemState, PlannedOperation
from batchops.tables import batch_chunks, batches, utcnow

__all__ = ["ChunkRecords"]

_OPS = TypeAdapter(list[PlannedOperation])
_RESULTS = TypeAdapter(list[ItemResult])


def _count(results: Sequence[ItemResult], *states: ItemState) -> tuple[int, ...]:
    return tuple(sum(1 for r in results if r.state is state) for state in states)


class ChunkRecords:
    """Chunks of batches; a method that takes ``conn`` runs in the caller's transaction, the
    others in short reads of their own on ``engine``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def insert(self, conn: Connection, ref: ChunkRef, ops: Sequence[PlannedOperation],
                     depends_on: Sequence[int]) -> None:
        conn.execute(batch_chunks.insert().values(
            batch_id=ref.batch_id, chunk_index=ref.chunk_index, start=ref.start, end=ref.end,
            cache_token=ref.cache_token, depends_on=list(depends_on),
            operations=_OPS.dump_json(list(ops)).decode(),
        ))

    def plan(self, batch_id: str) -> list[tuple[ChunkRef, list[int]]]:
        """Every chunk of the batch, in order, with the chunks it must wait for."""
        c = batch_chunks.c
        query = sa.select(c.chunk_index, c.start, c.end, c.cache_token, c.depends_on).where(
            c.batch_id == batch_id)
        with read_only(self.engine) as conn:
            rows = conn.execute(query.order_by(c.chunk_index)).all()
        return [(ChunkRef(batch_id=batch_id, chunk_index=r.chunk_index, start=r.start, end=r.end,
                          cache_token=r.cache_token), list(r.depends_on)) for r in rows]

    def unrecorded(self, batch_id: str) -> list[ChunkRef]:
        """The batch's chunks that have no results yet, in order."""
        c = batch_chunks.c
        with read_only(self.engine) as conn:
            rows = conn.execute(sa.select(c.chunk_index, c.start, c.end, c.cache_token).where(
                c.batch_id == batch_id, c.done.is_(False)).order_by(c.chunk_index)).all()
        return [ChunkRef(batch_id=batch_id, chunk_index=r.chunk_index, start=r.start, end=r.end,
                         cache_token=r.cache_token) for r in rows]

    def operations(self, batch_id: str, chunk_index: int) -> list[PlannedOperation]:
        with read_only(self.engine) as conn:
            raw = conn.execute(sa.select(batch_chunks.c.operations).where(
                batch_chunks.c.batch_id == batch_id, batch_chunks.c.chunk_index == chunk_index,
            )).scalar_one()
        return _OPS.validate_json(raw)

    def open(self, conn: Connection,
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

    def record(self, conn: Connection, ref: ChunkRef, results: Sequence[ItemResult],
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

    def recorded_unsucceeded(self, conn: Connection, batch_id: str) -> tuple[int, int]:
        """``(failed, skipped)``: the items of the batch's recorded chunks that a retry runs
        again."""
        c = batch_chunks.c
        failed, skipped = conn.execute(sa.select(
            sa.func.coalesce(sa.func.sum(c.failed), 0),
            sa.func.coalesce(sa.func.sum(c.skipped), 0),
        ).where(c.batch_id == batch_id, c.done.is_(True))).one()
        return int(failed), int(skipped)

    def reopen_unsucceeded(self, conn: Connection, batch_id: str) -> None:
        """For a retry (:meth:`BatchLifecycle.retry`): the chunks with failed or skipped items
        are open again (their succeeded results are kept and not run again)."""
        c = batch_chunks.c
        conn.execute(batch_chunks.update().where(
            c.batch_id == batch_id, c.done.is_(True), (c.failed > 0) | (c.skipped > 0),
        ).values(done=False))
