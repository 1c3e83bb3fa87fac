"""``reap_stale_batches``: the deployment that resumes batches whose runs died, gives back
upstream-limit slots no live run holds, and purges expired idempotency records and leftover
claims. Prefect's events start it for one run (its deployment trigger: a ``process-batch`` run
crashed); a slow schedule sweeps for whatever no event reported."""

from __future__ import annotations

from prefect import flow

from tasks.recovery import purge_expired, reconcile_limit_slots, restart_stale_batches

__all__ = ["reap_stale_batches"]


@flow(name="reap-stale-batches", log_prints=True)
def reap_stale_batches(stale_after_seconds: float | None = None,
                       flow_run_id: str | None = None) -> list[str]:
    """Find processing batches whose chunks stopped beating (a killed worker or runner, a lost
    machine) and run each again from its checkpoint; the ids of the batches restarted. Given
    ``flow_run_id`` (``prefect.flow-run.<id>`` from an event, or the id), only that run's
    batch, at once when Prefect has the run ``Crashed`` (see
    :func:`~tasks.recovery.restart_stale_batches`). Then
    give back the upstream-limit slots that no live run holds — the dead runs' among them —
    so the new runs and other batches get them (see
    :func:`~tasks.recovery.reconcile_limit_slots`), and, on the sweep, purge what has
    expired (see :func:`~tasks.recovery.purge_expired`)."""
    restarted = restart_stale_batches(stale_after_seconds, flow_run_id)
    reconcile_limit_slots()
    if flow_run_id is None:  # the sweep's work; a run started by an event is about one batch
        purge_expired(stale_after_seconds)
    return restarted
