"""Serve the batchops deployments from this process (a runner): ``batchops serve``.

The same deployments as ``prefect.yaml`` declares for a work pool:

* ``process-batch`` — one batch, by ``batch_id`` or an ``operations`` list (parameter schema
  enforced, so a run started from the Prefect UI is checked before it starts);
* ``bulk-sync`` — the configured syncs, on a cron schedule that starts paused
  (``BATCHOPS_SYNC_SCHEDULE_ACTIVE=true`` starts it active), one run at a time;
* ``retry-failed`` — a finished batch's failed items, again;
* ``reap-stale-batches`` — every minute: batches whose heartbeat stopped (a killed runner or
  worker) run again from their checkpoint.
* ``replay-dead-letters`` — dead letters (by ids or a filter) as a new batch.
"""

from __future__ import annotations

import contextlib
from uuid import UUID

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from batchops.settings import Settings, get_settings
from flows.bulk_sync import bulk_sync
from flows.process_batch import process_batch
from flows.reaper import reap_stale_batches
from flows.replay_dead_letters import replay_dead_letters
from flows.retry_failed import retry_failed

__all__ = ["build_deployments", "deploy_to_work_pool", "serve_deployments"]


def build_deployments(settings: Settings,
                      entrypoint_type: EntrypointType = EntrypointType.FILE_PATH,
                      ) -> list[RunnerDeployment]:
    """The deployments this runner serves (or a work pool's workers run)."""
    tags = ["batchops"]
    deployments: list[RunnerDeployment] = [
        process_batch.to_deployment(  # type: ignore[list-item]
            name="process-batch", entrypoint_type=entrypoint_type,
            description="Run a batch of operations (batch_id, or operations to register).",
            tags=tags, enforce_parameter_schema=True,
        ),
        bulk_sync.to_deployment(  # type: ignore[list-item]
            name="bulk-sync", entrypoint_type=entrypoint_type,
            description="Apply the rows changed since each sync's watermark to its target.",
            tags=tags, enforce_parameter_schema=True,
            schedules=[Cron(settings.sync_cron, timezone="UTC",
                            active=settings.sync_schedule_active)],
            concurrency_limit=1,  # two runs of one sync would race for its watermark
        ),
        retry_failed.to_deployment(  # type: ignore[list-item]
            name="retry-failed", entrypoint_type=entrypoint_type,
            description="Run a finished batch's failed items again (only those).",
            tags=tags, enforce_parameter_schema=True,
        ),
        reap_stale_batches.to_deployment(  # type: ignore[list-item]
            name="reap-stale-batches", entrypoint_type=entrypoint_type,
            description="Run batches whose heartbeat stopped again, from their checkpoint.",
            tags=tags, enforce_parameter_schema=True,
            schedules=[Cron(settings.reaper_cron, timezone="UTC")],
            concurrency_limit=1,
        ),
        replay_dead_letters.to_deployment(  # type: ignore[list-item]
            name="replay-dead-letters", entrypoint_type=entrypoint_type,
            description="Run dead letters again as a new batch (ids, a filter, or all).",
            tags=tags, enforce_parameter_schema=True,
        ),
    ]
    return deployments


def serve_deployments() -> None:
    """Serve the deployments until interrupted."""
    serve(*build_deployments(get_settings()))


def deploy_to_work_pool(pool: str) -> list[UUID]:
    """Create the ``process`` work pool ``pool`` if missing and register the same deployments
    with it, by module path (``flows.process_batch.process_batch``): every worker runs the
    installed batchops package, so no code storage or image is needed."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    return [deployment.apply(work_pool_name=pool)  # type: ignore[misc]
            for deployment in build_deployments(get_settings(), EntrypointType.MODULE_PATH)]
