"""``reap_stale_batches``: the scheduled deployment that resumes batches whose runs died and
purges expired idempotency records and leftover claims."""

from __future__ import annotations

from prefect import flow

from tasks.recovery import purge_expired, restart_stale_batches

__all__ = ["reap_stale_batches"]


@flow(name="reap-stale-batches", log_prints=True)
def reap_stale_batches(stale_after_seconds: float | None = None) -> list[str]:
    """Find processing batches whose chunks stopped beating (a killed worker or runner, a lost
    machine) and run each again from its checkpoint; the ids of the batches restarted. Then
    purge what has expired (see :func:`~tasks.recovery.purge_expired`)."""
    restarted = restart_stale_batches(stale_after_seconds)
    purge_expired(stale_after_seconds)
    return restarted
