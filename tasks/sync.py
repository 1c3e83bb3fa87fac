"""Tasks of the bulk-sync and retry-failed flows: one store or source step each.

None of them is cached: each reads or moves state that changes between calls of one flow run
(the next batch of a sync is a different batch every time).
"""

from __future__ import annotations

from uuid import UUID

from prefect import task
from prefect.cache_policies import NO_CACHE

from batchops import batch_runs
from batchops.runtime import get_runtime
from batchops.schemas import BatchSummary
from batchops.sync import BulkSync, SyncBatch, SyncState, WatermarkMove
from tasks.chunks import retry_transient_failures

__all__ = [
    "advance_watermark",
    "batch_summary",
    "next_sync_batch",
    "retry_batch",
    "sync_names",
    "sync_state",
]


@task(name="sync-names", cache_policy=NO_CACHE)
def sync_names() -> list[str]:
    """The configured syncs, by name."""
    return sorted(get_runtime().settings.bulk_sync.syncs)


@task(name="read-watermark", task_run_name="watermark of {sync_name}", cache_policy=NO_CACHE)
def sync_state(sync_name: str) -> SyncState:
    """The sync's watermark and pending batch."""
    return BulkSync(get_runtime(), sync_name).state()


@task(
    name="next-sync-batch",
    task_run_name="next batch of {sync_name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient_failures,
)
def next_sync_batch(sync_name: str) -> SyncBatch | None:
    """The sync's pending batch, or its changed rows registered as a new batch (``None``:
    nothing changed). Safe to retry: a range fixed before a failure is registered again."""
    return BulkSync(get_runtime(), sync_name).next_batch()


@task(name="advance-watermark", task_run_name="advance {sync_name} past {batch_id}",
      cache_policy=NO_CACHE)
def advance_watermark(sync_name: str, batch_id: str) -> WatermarkMove:
    """Move the sync's watermark past a batch that has completed."""
    return BulkSync(get_runtime(), sync_name).advance(batch_id)


@task(name="retry-batch", task_run_name="retry the failed items of {batch_id}",
      cache_policy=NO_CACHE)
def retry_batch(batch_id: str) -> tuple[int, UUID | None]:
    """Reopen the batch's failed (and never-run) items and start a run of the deployment for
    them (:func:`batchops.batch_runs.retry`): how many, and the new flow run's id (``None``
    when nothing failed)."""
    retried = batch_runs.retry(get_runtime(), batch_id)
    return retried.to_run, retried.flow_run_id


@task(name="batch-summary", cache_policy=NO_CACHE)
def batch_summary(batch_id: str) -> BatchSummary:
    """The batch's counts as they stand."""
    status = get_runtime().store.status(batch_id)
    return status.summary()
