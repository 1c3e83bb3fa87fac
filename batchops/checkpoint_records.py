"""Each item's outcome as soon as it is known (its checkpoint), before its chunk is recorded,
and the batch's heartbeat: a run that resumes a crashed chunk answers checkpointed items
from here instead of executing them again, and the reaper tells a live run from a dead one
by the heartbeat."""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from batchops.engine import read_only
from batchops.schemas import ChunkRef, ItemResult, ItemState
from batchops.tables import batches, item_checkpoints, utcnow

__all__ = ["CheckpointRecords"]


def _checkpoint_json(result: ItemResult) -> str:
    """The item's result with its attempts' errors, which API answers leave out: a run that
    resumes from the checkpoint records the item's dead letter from them."""
    if not result.attempt_errors:
        return result.model_dump_json()
    data = result.model_dump(mode="json")
    data["attempt_errors"] = [e.model_dump(mode="json") for e in result.attempt_errors]
    return json.dumps(data)


class CheckpointRecords:
    """Checkpoints and heartbeats; a method that takes ``conn`` runs in the caller's
    transaction, the others in one of their own on ``engine``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def save(self, conn: Connection, batch_id: str, generation: int,
             results: Sequence[ItemResult]) -> None:
        if results:
            now = utcnow()
            conn.execute(item_checkpoints.insert(), [
                {"batch_id": batch_id, "generation": generation, "item_index": r.index,
                 "result": _checkpoint_json(r), "recorded_at": now} for r in results])

    def drop(self, conn: Connection, ref: ChunkRef, generation: int) -> None:
        """The chunk is recorded: its items' checkpoints have served their purpose."""
        t = item_checkpoints
        conn.execute(t.delete().where(t.c.batch_id == ref.batch_id, t.c.generation == generation,
                                      t.c.item_index >= ref.start, t.c.item_index < ref.end))

    def count(self, batch_id: str, generation: int) -> int:
        """How many items of the batch's chunks in flight have a checkpointed outcome."""
        t = item_checkpoints
        with read_only(self.engine) as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(t).where(
                t.c.batch_id == batch_id, t.c.generation == generation)).scalar_one())

    def of_items(self, conn: Connection, batch_id: str, generation: int,
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

    def carry(self, conn: Connection, batch_id: str, generation: int) -> None:
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
