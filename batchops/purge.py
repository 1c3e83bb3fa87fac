"""Purging what the store keeps for a while only: idempotency records past their retention,
and the item claims of batches long finished; deletes in bounded transactions."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from batchops.schemas import BatchState
from batchops.tables import batches, idempotency_records, item_claims, utcnow

__all__ = ["Purge"]


class Purge:
    """Deletes on ``engine``, each batch of rows in a transaction of its own."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def expired(self, stale_after: timedelta, limit: int = 50_000) -> dict[str, int]:
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
