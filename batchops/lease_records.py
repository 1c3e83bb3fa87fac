"""The records of the Prefect global-concurrency-limit leases a batch's run holds, and of who
reconciles a limit's slots with them (see :mod:`batchops.limit_leases`)."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from batchops.engine import dialect_insert, read_only
from batchops.tables import limit_leases, limit_reconciliations, utcnow

__all__ = ["LeaseRecords"]


class LeaseRecords:
    """Lease records; every method is one short transaction (or read) on ``engine``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, batch_id: str, lease_id: str, limit_name: str, slots: int) -> None:
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(limit_leases.insert().values(
                lease_id=lease_id, batch_id=batch_id, limit_name=limit_name, slots=slots,
                acquired_at=now, renewed_at=now))

    def renew(self, lease_id: str) -> bool:
        """The lease's holder is alive; ``False`` when its record is gone (taken as dead)."""
        with self.engine.begin() as conn:
            return conn.execute(limit_leases.update().where(
                limit_leases.c.lease_id == lease_id).values(renewed_at=utcnow())).rowcount == 1

    def drop(self, lease_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(limit_leases.delete().where(limit_leases.c.lease_id == lease_id))

    def of_batch(self, batch_id: str) -> list[str]:
        with read_only(self.engine) as conn:
            return list(conn.execute(sa.select(limit_leases.c.lease_id).where(
                limit_leases.c.batch_id == batch_id)).scalars())

    def live(self, limit_name: str, stale_after: timedelta) -> list[tuple[str, int]]:
        """``(batch id, slots)`` of the leases on ``limit_name`` whose holder renewed them
        within ``stale_after``."""
        c = limit_leases.c
        with read_only(self.engine) as conn:
            rows = conn.execute(sa.select(c.batch_id, c.slots).where(
                c.limit_name == limit_name,
                sa.func.coalesce(c.renewed_at, c.acquired_at) >= utcnow() - stale_after,
            ).order_by(c.acquired_at)).all()
        return [(r.batch_id, r.slots) for r in rows]

    def stale(self, limit_name: str, stale_after: timedelta) -> list[str]:
        """Ids of the leases on ``limit_name`` that their holder stopped renewing."""
        c = limit_leases.c
        with read_only(self.engine) as conn:
            return list(conn.execute(sa.select(c.lease_id).where(
                c.limit_name == limit_name,
                sa.func.coalesce(c.renewed_at, c.acquired_at) < utcnow() - stale_after,
            )).scalars())

    def limits(self) -> list[str]:
        """Names of the limits with lease records."""
        with read_only(self.engine) as conn:
            return list(conn.execute(
                sa.select(limit_leases.c.limit_name).distinct()).scalars())

    def claim_reconciliation(self, limit_name: str, seconds: float) -> bool:
        """Take the turn to reconcile ``limit_name`` for up to ``seconds``; ``False`` while
        another process has it."""
        t = limit_reconciliations
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(dialect_insert(conn)(t).values(
                limit_name=limit_name, claimed_until=now).on_conflict_do_nothing())
            return conn.execute(t.update().where(
                t.c.limit_name == limit_name, t.c.claimed_until <= now,
            ).values(claimed_until=now + timedelta(seconds=seconds))).rowcount == 1

    def end_reconciliation(self, limit_name: str) -> None:
        t = limit_reconciliations
        with self.engine.begin() as conn:
            conn.execute(t.update().where(t.c.limit_name == limit_name)
                         .values(claimed_until=utcnow()))
