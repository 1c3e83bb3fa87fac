"""Tasks around a batch: register, load, finish (summary and artifacts)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from batchops.callbacks import CallbackRecords
from batchops.registration import register_batch
from batchops.reporting import summary_markdown, table_rows
from batchops.runtime import get_runtime
from batchops.schemas import BatchState, BatchSummary, ChunkRef, ItemState, Operation

__all__ = ["finish_batch", "load_batch", "register_operations"]


@task(name="register-batch")
def register_operations(operations: list[Operation], concurrency: int | None,
                        source: str, deadline_seconds: float | None = None) -> str:
    """Validate and store operations given to the flow directly (UI, schedule)."""
    runtime = get_runtime()
    batch_id, _ = register_batch(runtime, operations, concurrency=concurrency,
                                 max_operations=runtime.settings.max_import_rows, source=source,
                                 deadline_seconds=deadline_seconds)
    return batch_id


@task(name="load-batch")
def load_batch(batch_id: str, flow_run_id: str | None,
               deadline_seconds: float | None = None) -> dict[str, Any]:
    """The batch's chunk plan, whether it has a callback; marks the batch processing (under
    this flow run).

    ``deadline_seconds`` sets the batch's deadline that many seconds from now.
    """
    store = get_runtime().store
    if deadline_seconds is not None:
        store.set_deadline(batch_id, deadline_seconds)
    batch = store.get_batch(batch_id)
    plan = store.chunk_plan(batch_id)
    started = store.mark_started(batch_id, flow_run_id)
    return {"total": batch.total, "concurrency": batch.concurrency, "scope": batch.scope,
            "generation": batch.generation, "chunks": plan if started else [],
            "cancelled": not started,
            "callback": CallbackRecords(store).get(batch_id) is not None}


@task(name="finish-batch")
def finish_batch(batch_id: str, failed_chunks: list[ChunkRef],
                 error: str | None) -> BatchSummary:
    """Final status, summary, and the table and markdown artifacts."""
    runtime = get_runtime()
    store = runtime.store
    state = BatchState.FAILED if failed_chunks else BatchState.COMPLETED
    store.mark_finished(batch_id, state, error)  # a cancelled batch stays cancelled
    status = store.status(batch_id)
    summary = BatchSummary(total=status.total, succeeded=status.succeeded, failed=status.failed,
                           skipped=status.skipped)
    limit = runtime.settings.artifact_max_rows
    if status.total <= limit:
        items = list(store.iter_results(batch_id))
        description = f"Every item of batch {batch_id}"
    else:
        # A big import: its failures first, then successes up to the limit.
        items = list(store.iter_results(batch_id, state=ItemState.FAILED, limit=limit))
        if len(items) < limit:
            items += store.iter_results(batch_id, state=ItemState.SUCCEEDED,
                                        limit=limit - len(items))
        items.sort(key=lambda r: r.index)
        description = (f"{len(items)} of the {status.total} items of batch {batch_id}, "
                       "failures first; all of them: `batchops results ID --format csv`")
    create_table_artifact(table_rows(items), key=f"batch-{batch_id}-items",
                          description=description)
    create_markdown_artifact(summary_markdown(status, failed_chunks, error),
                             key=f"batch-{batch_id}-summary",
                             description=f"Summary of batch {batch_id}")
    return summary
