"""The reaper's algorithm: find batches whose runs died, mark those runs crashed, run them
again; give back orphaned upstream-limit slots; purge what has expired.

The reaper's deployment runs these as task runs (``tasks/recovery.py``); a batchops worker
does it without a flow run at its heartbeat (:func:`sweep`).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from batchops import orchestration
from batchops.batch_requests import BatchRequests
from batchops.cancellation import settle_cancelled
from batchops.errors import BatchFinished
from batchops.execution import chunk_not_run, settle_chunks
from batchops.limit_leases import LimitLeases
from batchops.orchestration import FlowRun, StateType, SyncLimits
from batchops.runtime import Runtime
from batchops.schemas import BatchState
from batchops.targets.http import upstream_limit_name

__all__ = ["UNKNOWN", "purge_expired", "reconcile_limit_slots", "restart_stale_batches",
           "sweep"]

_default_logger = logging.getLogger("batchops.recovery")

# States of a flow run that a worker has taken (or that ended) without the batch starting.
_TAKEN = {StateType.PENDING, StateType.RUNNING}
# (A completed run with a queued batch is a retry about to start its own run: not lost.)
_ENDED = {StateType.CRASHED, StateType.FAILED, StateType.CANCELLED}


class _Unknown:
    """The flow run could not be read (Prefect did not answer): nothing is concluded."""


UNKNOWN = _Unknown()


def _read_flow_run(flow_run_id: str) -> FlowRun | _Unknown | None:
    """The flow run; ``None`` when Prefect says it does not exist (deleted, or from a server
    whose database was replaced), :data:`UNKNOWN` when Prefect cannot be asked."""
    try:
        return orchestration.read_flow_run(flow_run_id)
    except Exception:
        return UNKNOWN


def _lost(status: str, flow_run_id: str | None, run: FlowRun | None,
          stale_after: timedelta) -> bool:
    """Whether a stale batch's flow run is gone. A processing batch whose chunks stopped
    beating is; a queued one when it has no flow run at all (its process died before it
    started one), when its flow run no longer exists, or when its run was taken by a worker
    long ago (or ended) without starting it — a run still waiting for a worker is left to
    wait."""
    if status == BatchState.PROCESSING.value:
        return True
    if flow_run_id is None or run is None:
        return True
    if run.state is None:
        return False
    if run.state.type in _ENDED:
        return True
    since = datetime.now(UTC) - run.state.timestamp
    return run.state.type in _TAKEN and since > stale_after


def _batch_of_run(runtime: Runtime, flow_run_id: str) -> list[tuple[str, str, str | None]]:
    """The unfinished batch a reported flow run (``prefect.flow-run.<id>`` or ``<id>``) is
    processing, as a candidate of :func:`restart_stale_batches` (none: it has finished, or
    another run has it now)."""
    run_id = flow_run_id.removeprefix("prefect.flow-run.")
    store = runtime.store
    batch_id = store.batch_of_flow_run(run_id)
    if batch_id is None:
        return []
    batch = store.get_batch(batch_id)
    return [] if batch.finished_at is not None else [(batch_id, batch.status, run_id)]


def _crash(run: FlowRun, batch_id: str) -> None:
    """Mark the dead run ``Crashed`` in Prefect (if it still looks alive there)."""
    if run.state is not None and not run.state.is_final():
        orchestration.crash_flow_run(run.id, f"batch {batch_id}: no sign of life; the reaper "
                                             "runs the batch again from its checkpoint")


def _release_leases(runtime: Runtime, batch_id: str, logger: Any) -> None:
    """Free the upstream-limit slots the dead run held (they would stay taken until their
    lease expired, or for good on a server without its repossessor)."""
    store = runtime.store
    with SyncLimits.open() as limits:
        for lease_id in store.leases.of_batch(batch_id):
            try:
                limits.release_lease(UUID(lease_id))
            except Exception as exc:  # expired and revoked already
                logger.info("batch %s: lease %s: %s", batch_id, lease_id, exc)
            store.leases.drop(lease_id)


def _end_cancelled(runtime: Runtime, batch_id: str) -> None:
    """A batch cancelled (here, or its flow run in Prefect) whose run is gone: cancelled for
    good, and the items its run did not record get their results (``cancelled``)."""
    try:
        was = runtime.lifecycle.cancel(batch_id)  # nothing changes for one cancelled already
    except BatchFinished:
        return
    settle_cancelled(runtime, batch_id, run_stopped=was is not BatchState.QUEUED)


def restart_stale_batches(runtime: Runtime, stale_after_seconds: float | None = None,
                          flow_run_id: str | None = None, *,
                          logger: Any = _default_logger) -> list[str]:
    """Batches whose run died get a new ``process-batch`` flow run; completed chunks and
    checkpointed items are not executed again. The ids of the batches restarted.

    A run is dead when its batch is processing without a heartbeat for ``stale_after_seconds``
    (default: settings), or queued while its flow run was taken by a worker that long ago
    (the worker died before the run started), has ended or no longer exists; a batch queued
    with no flow run at all (its API died before starting one) is started once it is older
    than ``stale_after_seconds`` plus the longest sync wait. A batch whose flow run was
    cancelled in Prefect, or that was cancelled while its run died, is not run again: it ends
    cancelled, its unrecorded items ``cancelled``.

    Given ``flow_run_id`` (a ``process-batch`` run reported dead: the reaper's deployment
    trigger on a ``Crashed`` run, or an operator), only that run's batch is looked at, and at
    once: a run Prefect marked ``Crashed`` is dead now; a run still ``Running`` there is dead
    when the batch has not beaten its heartbeat for three heartbeat periods either.
    """
    settings = runtime.settings
    stale_after = timedelta(seconds=stale_after_seconds or settings.recovery.stale_after_seconds)
    # A sync batch may wait in its API's thread pool for up to the longest sync wait: only
    # past that is a batch without a run lost.
    unstarted_after = stale_after + timedelta(seconds=settings.api.max_sync_wait_seconds)
    if flow_run_id is not None:
        candidates = _batch_of_run(runtime, flow_run_id)
        silent = min(stale_after, timedelta(seconds=3 * settings.execution.heartbeat_seconds))
    else:
        candidates = runtime.store.stale_batches(stale_after, unstarted_after)
    restarted = []
    for batch_id, status, run_id in candidates:
        found = _read_flow_run(run_id) if run_id else None
        if isinstance(found, _Unknown):
            continue  # Prefect did not answer: ask again on the next round
        run = found
        if flow_run_id is not None:  # a reported run: dead now if Prefect has it Crashed
            crashed = run is not None and run.state is not None and run.state.is_crashed()
            stale_after = timedelta(0) if crashed else silent
        cancelled_run = run is not None and run.state is not None and run.state.is_cancelled()
        if status == BatchState.CANCELLED.value or cancelled_run:
            # Cancelled (here or in Prefect) and its run gone: it is not run again; the items
            # its run did not record get their results (cancelled).
            if runtime.lifecycle.recover(batch_id, status, stale_after, run_id):
                _end_cancelled(runtime, batch_id)
                logger.info("batch %s: cancelled and its run is gone; not run again",
                            batch_id)
            continue
        if not _lost(status, run_id, run, stale_after):
            continue
        # Detached from the dead run: a second reaper (one the crash below triggers) finds
        # the batch no longer under it.
        if not runtime.lifecycle.recover(batch_id, status, stale_after, run_id, detach=True):
            continue  # it moved meanwhile, or another reaper took it
        if run is not None:
            try:
                _crash(run, batch_id)
            except Exception as exc:  # the batch still needs a run
                logger.warning("batch %s: could not mark flow run %s crashed: %s", batch_id,
                               run_id, exc)
        _release_leases(runtime, batch_id, logger)
        batch = runtime.store.get_batch(batch_id)
        if batch.recoveries > settings.recovery.max_recoveries:
            why = f"its run died {batch.recoveries} times; not run again (retry it once fixed)"
            # Every item gets a result: the ones no run recorded fail (chunk_failed).
            asyncio.run(settle_chunks(runtime, batch_id, chunk_not_run(why)))
            if run_id is not None:  # the batch keeps the link to its last run
                runtime.lifecycle.attach_run(batch_id, run_id)
            runtime.lifecycle.finish(batch_id, BatchState.FAILED, why)
            logger.error("batch %s: its run died %d times; marked failed", batch_id,
                         batch.recoveries)
            continue
        new = orchestration.start_deployment_run(
            settings.api.process_batch_deployment, {"batch_id": batch_id},
            name=f"batch-{batch_id}",
            idempotency_key=f"batchops-recover-{batch_id}-{batch.recoveries}")
        runtime.lifecycle.attach_run(batch_id, str(new.id))
        logger.info("batch %s (%s): its run is gone; flow run %s resumes it", batch_id, status,
                    new.id)
        restarted.append(batch_id)
    return restarted


def reconcile_limit_slots(runtime: Runtime) -> dict[str, int]:
    """Give back the upstream-limit slots that no live run holds (a restarted Prefect server
    forgot their leases, or their run died; see :mod:`batchops.limit_leases`): slots given
    back per limit."""
    leases = LimitLeases.from_settings(runtime.store, runtime.settings)
    done = leases.reconcile_all([upstream_limit_name(n) for n in runtime.settings.upstreams])
    return {r.limit_name: r.freed_slots for r in done}


def purge_expired(runtime: Runtime, stale_after_seconds: float | None = None, *,
                  logger: Any = _default_logger) -> dict[str, int]:
    """Delete what has outlived its use: item idempotency records and batch-level
    ``Idempotency-Key`` records past ``BATCHOPS_IDEMPOTENCY_RETENTION_HOURS`` (lookups ignore
    them already), and the claims on idempotency keys of batches that finished over
    ``stale_after_seconds`` ago. How many rows of each went."""
    settings = runtime.settings
    stale_after = timedelta(seconds=stale_after_seconds or settings.recovery.stale_after_seconds)
    purged = runtime.store.purge.expired(stale_after)
    retention = timedelta(hours=settings.recovery.idempotency_retention_hours)
    purged["batch_requests"] = BatchRequests(runtime.store, retention).purge_expired()
    if any(purged.values()):
        logger.info("purged %s", ", ".join(f"{n} {k}" for k, n in purged.items()))
    return purged


def sweep(runtime: Runtime, *, logger: Any = _default_logger) -> list[str]:
    """The reaper's work without a flow run (a batchops worker does it at its heartbeat):
    restart the batches whose run died, give back orphaned upstream-limit slots, purge what
    has expired; the ids of the batches restarted."""
    restarted = restart_stale_batches(runtime, logger=logger)
    reconcile_limit_slots(runtime)
    purge_expired(runtime, logger=logger)
    return restarted
