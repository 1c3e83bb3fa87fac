"""``retry_failed``: run a finished batch's failed items again, and only those."""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger

from batchops import orchestration
from batchops.schemas import BatchSummary
from tasks.sync import batch_summary, retry_batch

__all__ = ["retry_failed"]


@flow(name="retry-failed", flow_run_name="retry-{batch_id}", log_prints=True)
def retry_failed(batch_id: str) -> BatchSummary:
    """Reopen the batch's failed, skipped (and never-run) items and run the batch again, the
    way ``POST /batches/{id}/retry`` does: a new run of the ``process-batch`` deployment (a
    worker of its pool runs it), which this run waits for. Succeeded items keep their results
    and are not executed again. A batch without failures is left as it is.
    """
    logger = get_run_logger()
    to_run, flow_run_id = retry_batch(batch_id)
    if flow_run_id is None:
        logger.info("batch %s has no failed items; nothing to retry", batch_id)
        return batch_summary(batch_id)
    logger.info("batch %s: retrying %d item(s) in flow run batch-%s (%s)", batch_id, to_run,
                batch_id, flow_run_id)
    run = orchestration.wait_for_run(flow_run_id)
    logger.info("batch %s: its retry run ended %s", batch_id,
                run.state.type.value if run.state else "?")
    return batch_summary(batch_id)
