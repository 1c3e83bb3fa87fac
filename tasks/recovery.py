"""Task of the reaper: find batches whose runs died, mark those runs crashed, run them again."""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from prefect import get_client, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.logging import get_run_logger
from prefect.states import Crashed

from batchops.runtime import get_runtime

__all__ = ["restart_stale_batches"]


def _crash_flow_run(flow_run_id: str, batch_id: str) -> None:
    """Mark the dead run ``Crashed`` in Prefect (if it still looks alive there)."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run_id))
        if run.state is not None and not run.state.is_final():
            client.set_flow_run_state(
                run.id, Crashed(message=f"batch {batch_id}: no heartbeat; the reaper runs the "
                                        "batch again from its checkpoint"), force=True)


@task(name="restart-stale-batches", cache_policy=NO_CACHE)
def restart_stale_batches(stale_after_seconds: float | None = None) -> list[str]:
    """Batches processing without a heartbeat for ``stale_after_seconds`` (default: settings)
    get a new ``process-batch`` flow run; completed chunks and checkpointed items are not
    executed again. Their ids."""
    runtime = get_runtime()
    settings = runtime.settings
    logger = get_run_logger()
    stale_after = timedelta(seconds=stale_after_seconds or settings.stale_after_seconds)
    restarted = []
    for batch_id, flow_run_id in runtime.store.take_stale_batches(stale_after):
        if flow_run_id:
            try:
                _crash_flow_run(flow_run_id, batch_id)
            except Exception as exc:  # the old run may be gone; the batch still needs a run
                logger.warning("batch %s: could not mark flow run %s crashed: %s", batch_id,
                               flow_run_id, exc)
        batch = runtime.store.get_batch(batch_id)
        run: FlowRun = run_deployment(  # type: ignore[assignment]
            settings.process_batch_deployment, parameters={"batch_id": batch_id}, timeout=0,
            as_subflow=False, flow_run_name=f"batch-{batch_id}",
            idempotency_key=f"batchops-recover-{batch_id}-{batch.recoveries}")
        runtime.store.set_flow_run_id(batch_id, str(run.id))
        logger.info("batch %s: silent for over %s; flow run %s resumes it", batch_id,
                    stale_after, run.id)
        restarted.append(batch_id)
    return restarted
