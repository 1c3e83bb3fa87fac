"""The leases batchops runs hold on upstream concurrency limits, and the limits' slots
reconciled with them.

A batch's http requests hold slots of the upstream's Prefect global concurrency limit
``batchops-upstream-<name>`` under a lease (:mod:`batchops.targets.http`). Prefect keeps the
count of taken slots (``active_slots``) in its database and the leases in its lease storage —
in memory on the embedded server. So a restarted server has forgotten every lease but still
counts their slots, and nothing ever gives those back; a run that dies leaves its slots taken
until its lease expires, or for good once the server forgot the lease. A batch waiting for them
would wait forever.

batchops therefore keeps its own record of every lease (the store's ``limit_leases``: batch,
limit, slots, and when its holder last said it is alive, every ``BATCHOPS_HEARTBEAT_SECONDS``).
:meth:`LimitLeases.reconcile` makes a limit's count agree with the live records:

1. leases whose holder stopped renewing them for ``BATCHOPS_STALE_AFTER_SECONDS`` are released
   (a no-op where the server forgot them) and their records dropped;
2. the slots the limit counts beyond those of the live records are held by no live run: they
   are given back (``release_concurrency_slots``, a relative decrement, so slots taken or
   released meanwhile are not overwritten). A lease granted just now may not be recorded yet,
   so the excess must be seen twice, :data:`SETTLE_SECONDS` apart, and only the smaller of
   the two is given back.

One process reconciles a limit at a time (a claim in the store), or two would give the same
slots back twice. It runs when the http target starts in a process, when a batch has waited
``BATCHOPS_SLOT_WAIT_SECONDS`` for slots, when a holder finds the server forgot its lease, and
in every reaper run. The limits belong to batchops: every process that uses them must share
the store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from uuid import UUID

from batchops.orchestration import SyncLimits
from batchops.settings import Settings
from batchops.store import Store

__all__ = ["SETTLE_SECONDS", "LimitLeases", "Reconciled", "leases_logger"]

# How long an excess of slots must last to be given back: longer than a granted lease takes to
# be recorded (one insert).
SETTLE_SECONDS = 1.0
# A reconciler that dies hands its turn on after this long.
_CLAIM_SECONDS = 30.0


def leases_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The run's logger inside a flow or task run (its logs reach the Prefect UI)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("batchops.limit_leases")


@dataclass(frozen=True)
class Reconciled:
    """What one reconciliation of a limit found and did."""

    limit_name: str
    active_slots: int  # counted by Prefect, at the end
    held_slots: int  # by live lease records
    released_leases: int  # of holders that stopped renewing them
    freed_slots: int  # given back: held by no live run


class LimitLeases:
    """The store's lease records for one process's runs; see the module docstring."""

    def __init__(self, store: Store, *, renew_seconds: float, stale_after: timedelta,
                 slot_wait_seconds: float) -> None:
        self.store = store
        self.renew_seconds = renew_seconds
        self.stale_after = stale_after
        self.slot_wait_seconds = slot_wait_seconds

    @classmethod
    def from_settings(cls, store: Store, settings: Settings) -> LimitLeases:
        return cls(store, renew_seconds=settings.execution.heartbeat_seconds,
                   stale_after=timedelta(seconds=settings.recovery.stale_after_seconds),
                   slot_wait_seconds=settings.recovery.slot_wait_seconds)

    # -- a holder's records ----------------------------------------------------------------

    def held(self, batch_id: str, lease_id: UUID, limit_name: str, slots: int) -> None:
        self.store.leases.add(batch_id, str(lease_id), limit_name, slots)

    def renewed(self, lease_id: UUID) -> bool:
        """The holder is alive; ``False`` when its record is gone (a reconciler took it as
        dead)."""
        return self.store.leases.renew(str(lease_id))

    def released(self, lease_id: UUID) -> None:
        self.store.leases.drop(str(lease_id))

    def holders(self, limit_name: str) -> list[tuple[str, int]]:
        """``(batch id, slots)`` of the live leases on ``limit_name``."""
        return self.store.leases.live(limit_name, self.stale_after)

    # -- reconciliation --------------------------------------------------------------------

    def reconcile(self, limit_name: str) -> Reconciled | None:
        """Release the leases of dead holders and give back the slots of ``limit_name`` that
        no live run holds; ``None`` when another process is at it or the limit does not
        exist."""
        if not self.store.leases.claim_reconciliation(limit_name, _CLAIM_SECONDS):
            return None
        try:
            with SyncLimits.open() as limits:
                released = self._release_stale(limits, limit_name)
                first = self._unheld(limits, limit_name)
                if first is None:
                    return None
                freed = 0
                if first > 0:
                    time.sleep(SETTLE_SECONDS)
                    second = self._unheld(limits, limit_name)
                    freed = max(0, min(first, second)) if second is not None else 0
                if freed > 0:
                    limits.release_slots(limit_name, freed)
                active = limits.active_slots(limit_name) or 0
        finally:
            self.store.leases.end_reconciliation(limit_name)
        held = sum(slots for _, slots in self.holders(limit_name))
        if freed or released:
            leases_logger().warning(
                "limit %s: gave back %d slot(s) held by no live run and released %d lease(s) "
                "of runs that stopped renewing them; %d slot(s) taken now, %d by live runs",
                limit_name, freed, released, active, held)
        return Reconciled(limit_name, active, held, released, freed)

    def reconcile_all(self, limit_names: list[str]) -> list[Reconciled]:
        """:meth:`reconcile` each of ``limit_names`` and each limit with lease records."""
        done = []
        for name in dict.fromkeys([*limit_names, *self.store.leases.limits()]):
            try:
                reconciled = self.reconcile(name)
            except Exception as exc:  # the others may still be reconciled
                leases_logger().warning("limit %s not reconciled: %s", name, exc)
                continue
            if reconciled is not None:
                done.append(reconciled)
        return done

    def _release_stale(self, limits: SyncLimits, limit_name: str) -> int:
        released = 0
        for lease_id in self.store.leases.stale(limit_name, self.stale_after):
            try:
                # Frees the slots where the server still knows the lease; a no-op otherwise.
                limits.release_lease(UUID(lease_id))
            except Exception as exc:  # the server is away: the record stays for next time
                leases_logger().warning("limit %s: lease %s not released: %s", limit_name, lease_id,
                                  exc)
                continue
            self.store.leases.drop(lease_id)
            released += 1
        return released

    def _unheld(self, limits: SyncLimits, limit_name: str) -> int | None:
        """Slots the limit counts beyond those of the live lease records (the count read
        first: a lease granted between the two reads is then not counted as unheld)."""
        active = limits.active_slots(limit_name)
        if active is None:
            return None
        held = sum(slots for _, slots in self.holders(limit_name))
        return active - held
