"""Reading a batch's recorded item results: in index order a few chunks at a time (constant
memory for a 100,000-item batch), or a few items by index. Results are stored in their
chunk's row, as JSON, once the chunk is recorded."""

from __future__ import annotations

from collections.abc import Collection, Iterator

import sqlalchemy as sa
from pydantic import TypeAdapter
from sqlalchemy.engine import Connection, Engine

from batchops.engine import read_only
from batchops.schemas import ItemResult, ItemState
from batchops.tables import batch_chunks

__all__ = ["ResultPages"]

_RESULTS = TypeAdapter(list[ItemResult])


class ResultPages:
    """Recorded results; :meth:`of_items` reads in the caller's transaction, :meth:`of_batch`
    in short reads of its own on ``engine``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def of_batch(self, batch_id: str, *, state: ItemState | None = None, after: int = -1,
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
            with read_only(self.engine) as conn:
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

    def of_items(self, conn: Connection, batch_id: str,
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
