"""Steps of a batch's flow run around its chunks: find, load and start the batch, reopen it
on a Prefect retry, finish it, report it in artifacts; and cancel the batch of a flow run
cancelled in Prefect.

They are plain steps of the flow run, not task runs: each is a few store queries, and a task
run costs a sync answer ~50 ms and the Prefect server three state events to write while the
next request's flow run is being created. The chunk task runs carry the batch's work; the
artifacts belong to the flow run.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prefect.exceptions import UnfinishedRun

from batchops import orchestration
from batchops.callbacks import CallbackRecords
from batchops.cancellation import cancel_batch, settle_cancelled
from batchops.errors import BatchFinished, is_transient
from batchops.execution import chunk_not_run, settle_chunks
from batchops.reporting import summary_markdown, table_rows
from batchops.runtime import get_runtime
from batchops.schemas import (
    BatchState,
    BatchStatus,
    BatchSummary,
    ChunkRef,
    ItemState,
)

__all__ = ["batch_of_run", "cancel_for_flow_run", "checkpointed_items", "failure_message",
           "finish_batch", "load_batch", "reopen_if_retried", "report_batch"]


def batch_of_run(flow_run_id: str) -> str | None:
    """The batch this flow run registered or processed before (``None``: none)."""
    return get_runtime().store.batch_of_flow_run(flow_run_id)


def reopen_if_retried(batch_id: str, flow_run_id: str) -> int | None:
    """When this flow run already finished the batch — Prefect is running it again, a retry
    from the UI or ``prefect flow-run retry`` — reopen the batch's failed and skipped items
    (a new generation: new chunk cache keys) and say how many; ``None`` otherwise."""
    runtime = get_runtime()
    batch = runtime.store.get_batch(batch_id)
    if batch.flow_run_id != flow_run_id or not BatchState(batch.status).is_final:
        return None
    return runtime.lifecycle.retry(batch_id)


def load_batch(batch_id: str, flow_run_id: str | None,
               deadline_seconds: float | None = None) -> dict[str, Any]:
    """The batch's chunk plan, whether it has a callback; marks the batch processing (under
    this flow run).

    ``deadline_seconds`` sets the batch's deadline that many seconds from now.
    """
    runtime = get_runtime()
    store = runtime.store
    if deadline_seconds is not None:
        store.set_deadline(batch_id, deadline_seconds)
    batch = store.get_batch(batch_id)
    plan = store.chunks.plan(batch_id)
    started = runtime.lifecycle.start(batch_id, flow_run_id)
    return {"total": batch.total, "concurrency": batch.concurrency, "scope": batch.scope,
            "generation": batch.generation, "chunks": plan if started else [],
            "cancelled": not started,
            "callback": CallbackRecords(store).get(batch_id) is not None}


def checkpointed_items(batch_id: str, generation: int) -> int:
    """Items of the batch's running chunks whose outcome is checkpointed (not yet recorded)."""
    return get_runtime().store.checkpoints.count(batch_id, generation)


def cancel_for_flow_run(flow_run_id: str, *, run_stopped: bool) -> str | None:
    """The batch a flow run cancelled in Prefect was processing is cancelled too, so the
    reaper does not run it again; its id. With ``run_stopped`` (the run's process is gone)
    its items get their results now; otherwise its own run (or the reaper) records them."""
    runtime = get_runtime()
    batch_id = runtime.store.batch_of_flow_run(flow_run_id)
    if batch_id is None:
        return None
    try:
        cancel_batch(runtime, batch_id)
    except BatchFinished:
        return batch_id  # it had finished: nothing to stop
    if run_stopped:
        settle_cancelled(runtime, batch_id, run_stopped=True)
    return batch_id


def finish_batch(batch_id: str, failures: list[tuple[ChunkRef, BaseException]],
                 ) -> tuple[BatchSummary, BatchStatus]:
    """The batch's final status in the store (a sync answer leaves then): its summary, and the
    status itself for :func:`report_batch`. Every item has a result then, unless the batch is
    left for the reaper:

    * a cancelled batch: the items of chunks that did not run get theirs (``cancelled``);
    * a chunk that still failed on a transient error (the store unreachable or refusing
      writes for longer than the chunk's retries): nothing more is recorded, the batch stays
      ``processing`` with the error, and the reaper runs it again once it is stale;
    * otherwise the chunks that could not finish (a bug), and those that waited for them,
      have their items recorded failed (``chunk_failed``) and the batch is ``failed``.
    """
    runtime = get_runtime()
    store = runtime.store
    error = failure_message(failures)
    if store.batch_status(batch_id) == BatchState.CANCELLED.value:
        settle_cancelled(runtime, batch_id)
    elif any(is_transient(exc) for _, exc in failures):
        runtime.lifecycle.note_error(batch_id, error)
    else:
        why = {ref.chunk_index: _describe(exc) for ref, exc in failures}
        for ref in store.chunks.unrecorded(batch_id):
            reason = why.get(ref.chunk_index, "a chunk it waits for could not finish")
            asyncio.run(settle_chunks(runtime, batch_id, chunk_not_run(reason), [ref]))
        runtime.lifecycle.finish(batch_id,
                                 BatchState.FAILED if failures else BatchState.COMPLETED,
                                 error or None)
    status = store.status(batch_id)
    return status.summary(), status


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UnfinishedRun):  # its task run waited for a chunk that did not complete
        return "not started: a chunk it waits for could not finish"
    # A database error's text goes on with its SQL and parameters: its first line says it.
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


def failure_message(failures: list[tuple[ChunkRef, BaseException]]) -> str:
    """Why chunks could not finish, one after the other."""
    return "; ".join(f"chunk {ref.chunk_index}: {_describe(exc)}" for ref, exc in failures)


def report_batch(status: BatchStatus, failed_chunks: list[ChunkRef], error: str | None) -> None:
    """The flow run's table artifact (every item, or failures first for a big batch) and
    markdown summary, of a finished batch's ``status``."""
    runtime = get_runtime()
    store = runtime.store
    batch_id = status.batch_id
    limit = runtime.settings.execution.artifact_max_rows
    if status.total <= limit:
        items = list(store.results.of_batch(batch_id))
        description = f"Every item of batch {batch_id}"
    else:
        # A big import: its failures first, then successes up to the limit.
        items = list(store.results.of_batch(batch_id, state=ItemState.FAILED, limit=limit))
        if len(items) < limit:
            items += store.results.of_batch(batch_id, state=ItemState.SUCCEEDED,
                                            limit=limit - len(items))
        items.sort(key=lambda r: r.index)
        description = (f"{len(items)} of the {status.total} items of batch {batch_id}, "
                       "failures first; all of them: `batchops results ID --format csv`")
    orchestration.publish_table(table_rows(items), key=f"batch-{batch_id}-items",
                                description=description)
    orchestration.publish_markdown(summary_markdown(status, failed_chunks, error),
                                   key=f"batch-{batch_id}-summary",
                                   description=f"Summary of batch {batch_id}")
