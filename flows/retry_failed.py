"""``retry_failed``: run a finished batch's failed items again, and only those."""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger

from batchops.schemas import BatchSummary
from flows.process_batch import process_batch
from tasks.sync import batch_summary, reopen_failed_items

__all__ = ["retry_failed"]


@flow(name="retry-failed", flow_run_name="retry-{batch_id}", log_prints=True)
def retry_failed(batch_id: str) -> BatchSummary:
    """Reopen the batch's failed, skipped (and never-run) items and run the batch again.

    Succeeded items keep their results and are not executed again; the new ``process-batch``
    run is a subflow of this one. A batch without failures is left as it is.
    """
    to_run = reopen_failed_items(batch_id)
    if to_run == 0:
        get_run_logger().info("batch %s has no failed items; nothing to retry", batch_id)
        return batch_summary(batch_id)
    get_run_logger().info("batch %s: retrying %d item(s)", batch_id, to_run)
    return process_batch(batch_id=batch_id)
