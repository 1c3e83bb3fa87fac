"""A registered batch's flow run of the ``process-batch`` deployment, and a batch's retry.

Every way of running a queued batch on the work pool — an async ``POST /batches``, an import,
a dead-letter replay, ``POST /batches/{id}/retry`` and the ``retry-failed`` deployment — goes
through :func:`start_run`; both retries go through :func:`retry`. (Sync batches run in the
API's embedded worker, see ``api/runs.py``; the reaper starts runs of its own for batches whose
run died, see :mod:`batchops.recovery`.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from uuid import UUID

from batchops import orchestration
from batchops.errors import TransientError
from batchops.runtime import Runtime
from batchops.schemas import BatchState

__all__ = ["Retried", "retry", "start_run"]

logger = logging.getLogger("batchops.batch_runs")


def start_run(runtime: Runtime, batch_id: str, generation: int = 0) -> UUID:
    """A new ``Scheduled`` run of the deployment for the queued batch (a worker of its pool
    picks it up), named ``batch-<id>`` and linked to the batch; its id. The same batch and
    generation give back the same run (Prefect's idempotency key).

    Raises:
        TransientError: the flow run could not be created (the batch is marked failed, so
            it can be retried).
    """
    deployment = runtime.settings.api.process_batch_deployment
    try:
        flow_run = orchestration.start_deployment_run(
            deployment, {"batch_id": batch_id}, name=f"batch-{batch_id}",
            idempotency_key=f"batchops-batch-{batch_id}-g{generation}")
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        logger.error("batch %s: cannot start a flow run of %s: %s", batch_id, deployment,
                     reason)
        runtime.lifecycle.finish(batch_id, BatchState.FAILED,
                                 f"could not start the flow run: {reason}")
        raise TransientError(
            f"could not start a flow run of the deployment {deployment!r} for batch "
            f"{batch_id}; retry the request") from None
    runtime.lifecycle.attach_run(batch_id, str(flow_run.id))
    return flow_run.id


@dataclass(frozen=True)
class Retried:
    """What a retry did: how many items run again, under which new flow run (``None`` when
    every item had succeeded: nothing changed)."""

    to_run: int
    flow_run_id: UUID | None


def retry(runtime: Runtime, batch_id: str) -> Retried:
    """Reopen a finished batch's failed, skipped (and never-run) items and start a new run of
    the deployment for them; succeeded items keep their results and are not run again.

    Raises:
        BatchNotFound: no such batch.
        BatchInProgress: the batch is still queued or processing.
        TransientError: the flow run could not be created (see :func:`start_run`).
    """
    to_run = runtime.lifecycle.retry(batch_id)
    if to_run == 0:
        return Retried(0, None)
    generation = runtime.store.get_batch(batch_id).generation
    return Retried(to_run, start_run(runtime, batch_id, generation))
