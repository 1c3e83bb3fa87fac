"""``bulk_sync``: apply the rows changed since a sync's watermark to its target, as batches."""

from __future__ import annotations

from prefect import flow, runtime
from prefect.exceptions import CancelledRun
from prefect.logging import get_run_logger

from batchops.sync import SyncSummary
from flows.process_batch import process_batch
from tasks.sync import (
    advance_watermark,
    batch_summary,
    next_sync_batch,
    sync_names,
    sync_state,
)

__all__ = ["bulk_sync"]


def _flow_run_name() -> str:
    return f"sync-{runtime.flow_run.parameters.get('sync_name') or 'all'}"


def _sync(sync_name: str, max_batches: int | None) -> SyncSummary:
    """One sync: its pending batch first, then its changed rows, batch by batch."""
    logger = get_run_logger()
    summary = SyncSummary(sync_name=sync_name, watermark=sync_state(sync_name).watermark)
    while max_batches is None or len(summary.batches) < max_batches:
        batch = next_sync_batch(sync_name)
        if batch is None:
            break
        logger.info("sync %s: %s batch %s, %d rows", sync_name,
                    "resuming" if batch.resumed else "running", batch.batch_id, batch.total)
        try:
            result = process_batch(batch_id=batch.batch_id)
        except CancelledRun:  # the batch was cancelled: it did not complete
            result = batch_summary(batch.batch_id)
        move = advance_watermark(sync_name, batch.batch_id)
        summary = summary.with_batch(batch, result, move)
        if not move.advanced:
            logger.warning("sync %s: batch %s did not complete (cancelled); its rows are read "
                           "again next run", sync_name, batch.batch_id)
            break
    logger.info("sync %s: %d rows in %d batches (%d failed items), watermark %s", sync_name,
                summary.rows, len(summary.batches), summary.failed, summary.watermark)
    return summary


@flow(name="bulk-sync", flow_run_name=_flow_run_name, log_prints=True)
def bulk_sync(sync_name: str | None = None, max_batches: int | None = None) -> list[SyncSummary]:
    """Apply the rows changed since the watermark of one sync, or of every configured sync.

    Args:
        sync_name: a sync of ``settings.syncs``; ``None`` (the schedule): all of them, in turn.
        max_batches: stop a sync after this many batches (the rest waits for the next run).

    Each batch is a ``process-batch`` subflow run; the watermark moves only once its batch
    has completed, so a run that stops halfway is resumed by the next one, without reading
    any row twice. A sync that fails does not stop the others; the run fails at the end.
    """
    logger = get_run_logger()
    if sync_name is not None:
        return [_sync(sync_name, max_batches)]
    summaries: list[SyncSummary] = []
    failures: list[str] = []
    for name in sync_names():
        try:
            summaries.append(_sync(name, max_batches))
        except Exception as exc:
            logger.error("sync %s failed: %s: %s", name, type(exc).__name__, exc)
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    if failures:
        raise RuntimeError(f"{len(failures)} sync(s) failed: " + "; ".join(failures))
    return summaries
