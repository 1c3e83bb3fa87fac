"""Item idempotency (scoped per API key): the records of succeeded items by key, and the
claims of keys being executed right now, so a key runs once even when two batches carry it.

The store is the source of truth for what ran (Prefect's chunk cache serves the same promise
at the chunk's grain): a record answers a later item with the same key and payload
(``replayed``), a claim makes a second batch wait for the first's result instead of sending
the request again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from batchops.engine import dialect_insert
from batchops.schemas import BatchState, ItemResult, PlannedOperation
from batchops.tables import aware, batches, idempotency_records, item_claims, utcnow

__all__ = ["Claims", "IdempotencyRecord", "IdempotencyStore"]


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


class IdempotencyStore:
    """Records and claims of idempotency keys; a method that takes ``conn`` runs in the
    caller's transaction, the others in one of their own on ``engine``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def lookup(self, conn: Connection, scope: str,
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

    def save(self, conn: Connection, scope: str, batch_id: str,
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
        conn.execute(dialect_insert(conn)(t).on_conflict_do_nothing(), [
            {"scope": scope, "key": op.idempotency_key, "payload_hash": op.payload_hash,
             "status": r.status, "result": r.result, "batch_id": batch_id,
             "item_index": r.index, "created_at": now, "expires_at": now + retention}
            for op, r in entries
        ])





    def lock_keys(self, conn: Connection, scope: str, keys: Sequence[str]) -> None:
        """Serialize transactions over the same idempotency keys until they commit
        (PostgreSQL advisory locks, in one order; SQLite's writer lock already does)."""
        if conn.dialect.name != "postgresql" or not keys:
            return
        conn.execute(sa.text(
            "SELECT pg_advisory_xact_lock(hashtextextended(:scope || chr(31) || k, 0)) "
            "FROM unnest(CAST(:keys AS text[])) AS k ORDER BY k"),
            {"scope": scope, "keys": sorted(set(keys))})

    def claim(self, scope: str, batch_id: str, ops: Sequence[PlannedOperation],
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
            insert = dialect_insert(conn)(t).on_conflict_do_nothing()
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
                beat = aware(heartbeat)
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

    def release(self, conn: Connection, scope: str, batch_id: str,
                keys: Sequence[str]) -> None:
        if keys:
            t = item_claims
            conn.execute(t.delete().where(t.c.scope == scope, t.c.batch_id == batch_id,
                                          t.c.key.in_(list(set(keys)))))
