"""Serve the batchops deployments from this process (a runner): ``batchops serve``.

The same deployments as ``prefect.yaml`` declares for a work pool:

* ``process-batch`` — one batch, by ``batch_id`` or an ``operations`` list (parameter schema
  enforced, so a run started from the Prefect UI is checked before it starts);
* ``bulk-sync`` — the configured syncs, on a cron schedule that starts paused
  (``BATCHOPS_SYNC_SCHEDULE_ACTIVE=true`` starts it active), one run at a time;
* ``retry-failed`` — a finished batch's failed items, again;
* ``reap-stale-batches`` — started by Prefect's events for a ``process-batch`` run that
  crashed (:func:`recovery_triggers`), and hourly as a backstop sweep: batches whose run died
  run again from their checkpoint. (Each batchops worker also sweeps at its heartbeat, in its
  own process and without a flow run: see :mod:`deployments.worker`.)
* ``replay-dead-letters`` — dead letters (by ids or a filter) as a new batch.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.events.schemas.automations import Posture
from prefect.schedules import Cron

from batchops.settings import Settings, get_settings
from flows.bulk_sync import bulk_sync
from flows.process_batch import process_batch
from flows.reaper import reap_stale_batches
from flows.replay_dead_letters import replay_dead_letters
from flows.retry_failed import retry_failed

__all__ = ["build_deployments", "deploy_to_work_pool", "recovery_triggers",
           "serve_deployments"]

_OF_PROCESS_BATCH = {"prefect.resource.role": "flow", "prefect.resource.name": process_batch.name}


def recovery_triggers() -> list[DeploymentEventTrigger]:
    """The reaper's deployment trigger: Prefect starts it for one ``process-batch`` run
    (``flow_run_id``) as soon as that run is ``Crashed`` — by its engine, a worker, or an
    automation of one's own such as Prefect's zombie-run detection."""
    return [DeploymentEventTrigger(
        name="process-batch run crashed",
        description="Resume the batch of a crashed process-batch run from its checkpoint.",
        match={"prefect.resource.id": "prefect.flow-run.*"}, match_related=_OF_PROCESS_BATCH,
        expect={"prefect.flow-run.Crashed"}, posture=Posture.Reactive, threshold=1,
        within=timedelta(0), parameters={"flow_run_id": "{{ event.resource.id }}"})]


def build_deployments(settings: Settings,
                      entrypoint_type: EntrypointType = EntrypointType.FILE_PATH,
                      ) -> list[RunnerDeployment]:
    """The deployments this runner serves (or a work pool's workers run)."""
    def deployment(flow: Any, name: str, description: str, **options: Any) -> RunnerDeployment:
        # What every batchops deployment has in common, in one place (a deployment that missed
        # the entrypoint type could not be run by a work pool's workers).
        return flow.to_deployment(
            name=name, description=description, entrypoint_type=entrypoint_type,
            tags=["batchops"], enforce_parameter_schema=True, **options)

    deployments = [
        deployment(process_batch, "process-batch",
                   "Run a batch of operations (batch_id, or operations to register)."),
        deployment(bulk_sync, "bulk-sync",
                   "Apply the rows changed since each sync's watermark to its target.",
                   schedules=[Cron(settings.bulk_sync.cron, timezone="UTC",
                                   active=settings.bulk_sync.schedule_active)],
                   concurrency_limit=1),  # two runs of one sync would race for its watermark
        deployment(retry_failed, "retry-failed",
                   "Run a finished batch's failed items again (only those)."),
        # No concurrency limit: a reaper run lost with its worker would hold the only slot
        # until its lease expires (5 min), and nothing would re-run that worker's batches
        # meanwhile. Two reapers at once are safe: taking a batch is a conditional UPDATE.
        deployment(reap_stale_batches, "reap-stale-batches",
                   "Run batches whose run died again, from their checkpoint (started when a "
                   "process-batch run crashes, and hourly as a sweep); purge expired "
                   "idempotency records.",
                   schedules=[Cron(settings.recovery.reaper_cron, timezone="UTC")],
                   triggers=recovery_triggers()),
        deployment(replay_dead_letters, "replay-dead-letters",
                   "Run dead letters again as a new batch (ids, a filter, or all)."),
    ]
    return deployments


def serve_deployments() -> None:
    """Serve the deployments until interrupted: Ctrl-C or SIGTERM (a process manager's stop)
    end the runner, also when it was started with SIGINT ignored (a background job)."""
    from deployments.processes import stop_on_signals

    stop_on_signals()
    serve(*build_deployments(get_settings()))


def deploy_to_work_pool(pool: str) -> list[UUID]:
    """Create the ``batchops``-type work pool ``pool`` if missing (see
    :mod:`deployments.worker`) and register the same deployments with it, by module path
    (``flows.process_batch.process_batch``): every worker runs the installed batchops package,
    so no code storage or image is needed.

    Raises:
        RuntimeError: a work pool of that name exists with another type.
    """
    from batchops.orchestration import ensure_work_pool
    from deployments.worker import WORKER_TYPE, BatchopsWorker

    found = ensure_work_pool(pool, WORKER_TYPE, BatchopsWorker.get_default_base_job_template())
    if found != WORKER_TYPE:
        raise RuntimeError(
            f"the work pool {pool!r} has type {found!r}, not {WORKER_TYPE!r}; "
            f"delete it (prefect work-pool delete {pool}) or choose another name")
    return [deployment.apply(work_pool_name=pool)  # type: ignore[misc]
            for deployment in build_deployments(get_settings(), EntrypointType.MODULE_PATH)]
