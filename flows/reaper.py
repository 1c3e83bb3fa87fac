"""``reap_stale_batches``: the scheduled deployment that resumes batches whose runs died, gives
back upstream-limit slots no live run holds, and purges expired idempotency records and
leftover claims."""

from __future__ import annotations

from prefect import flow

from tasks.recovery import purge_expired, reconcile_limit_slots, restart_stale_batches

__all__ = ["reap_stale_batches"]


@flow(name="reap-stale-batches", log_prints=True)
def reap_stale_batches(stale_after_seconds: float | None = None) -> list[str]:
    """Find processing batches whose chunks stopped beating (a killed worker or runner, a lost
    machine) and run each again from its checkpoint; the ids of the batches restarted. Then
    give back the upstream-limit slots that no live run holds — the dead runs' among them —
    so the new runs and other batches get them (see
    :func:`~tasks.recovery.reconcile_limit_slots`), and purge what has expired (see
    :func:`~tasks.recovery.purge_expired`)."""
    restarted = restart_stale_batches(stale_after_seconds)
    reconcile_limit_slots()
    purge_expired(stale_after_seconds)
    return restarted
