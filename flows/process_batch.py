"""``process_batch``: one flow run per batch — load, map chunks, record progress, finish."""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect import flow, runtime, unmapped
from prefect.context import FlowRunContext
from prefect.exceptions import CancelledRun
from prefect.futures import PrefectFuture
from prefect.logging import get_logger, get_run_logger
from prefect.states import Cancelled, State
from prefect.task_runners import ThreadPoolTaskRunner

from batchops import orchestration
from batchops.batch_steps import (
    batch_of_run,
    cancel_for_flow_run,
    checkpointed_items,
    failure_message,
    finish_batch,
    load_batch,
    reopen_if_retried,
    report_batch,
)
from batchops.execution import ChunkOutcome
from batchops.orchestration import FlowRun
from batchops.schemas import BatchState, BatchSummary, ChunkRef, Operation
from batchops.settings import Settings, get_settings
from tasks.batches import register_operations
from tasks.callbacks import send_callback
from tasks.chunks import chunk_cache_policy, run_chunk

__all__ = ["process_batch"]

PROGRESS_MIN_INTERVAL = 0.25  # seconds between two progress-artifact updates
PROGRESS_TICK = 1.0  # during a long chunk, progress moves from its checkpoints this often


def _name_flow_run(batch_id: str) -> None:
    """The run is named ``batch-<id>``: runs batchops starts are named so at their creation;
    one started by hand (the UI, ``prefect deployment run``) is renamed once its batch is
    known (no ``flow_run_name`` on the flow: the engine would write the name on every run)."""
    flow_run_id, name = runtime.flow_run.id, f"batch-{batch_id}"
    if flow_run_id and runtime.flow_run.name != name:
        orchestration.rename_flow_run(flow_run_id, name)


def _chunk_task(settings: Settings) -> Any:
    from prefect.tasks import exponential_backoff

    backoff = settings.execution.chunk_retry_backoff_seconds
    return run_chunk.with_options(
        retries=settings.execution.chunk_retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=backoff) if backoff else 0,
        cache_policy=chunk_cache_policy(settings.redis_url, settings.recovery.stale_after_seconds),
        cache_expiration=timedelta(hours=settings.execution.result_cache_hours),
    )


def _run_chunks(chunks: list[tuple[ChunkRef, list[int]]], parallel: int, per_chunk: int,
                scope: str, generation: int, concurrency: int,
                ) -> Iterator[tuple[ChunkRef, PrefectFuture[ChunkOutcome]] | None]:
    """Submit chunk task runs, yielding each as it completes, and ``None`` after each
    :data:`PROGRESS_TICK` seconds in which none did (the caller shows progress then).

    Independent chunks with the full worker count go out in one ``run_chunk.map``. Otherwise
    at most ``parallel`` chunks are in flight, and a chunk that touches the same records as
    earlier ones waits for them (``wait_for``), so batch order holds across chunks. Each chunk
    gets its share ``per_chunk`` and the batch's whole ``concurrency`` (see ``ChunkContext``).
    """
    settings = get_settings()
    chunk_task = _chunk_task(settings)
    pending = deque(chunks)
    submitted: dict[int, PrefectFuture[ChunkOutcome]] = {}
    in_flight: dict[Any, ChunkRef] = {}
    finished: queue.SimpleQueue[PrefectFuture[ChunkOutcome]] = queue.SimpleQueue()

    def track(ref: ChunkRef, future: PrefectFuture[ChunkOutcome]) -> None:
        in_flight[future.task_run_id] = ref
        future.add_done_callback(finished.put)

    if parallel >= settings.execution.chunk_workers and not any(deps for _, deps in chunks):
        refs = [ref for ref, _ in chunks]
        futures = chunk_task.map(refs, unmapped(per_chunk), unmapped(scope),
                                 unmapped(generation), unmapped(concurrency))
        for ref, future in zip(refs, futures, strict=True):
            track(ref, future)
        pending.clear()
    while pending or in_flight:
        while pending and len(in_flight) < parallel:
            ref, deps = pending.popleft()
            future = chunk_task.submit(ref, per_chunk, scope, generation, concurrency,
                                       wait_for=[submitted[d] for d in deps])
            submitted[ref.chunk_index] = future
            track(ref, future)
        try:
            done = finished.get(timeout=PROGRESS_TICK)
        except queue.Empty:
            yield None
            continue
        yield in_flight.pop(done.task_run_id), done


def _send_callback(batch_id: str) -> None:
    """Deliver the batch's completion callback; its failure is recorded, never raised."""
    from prefect.tasks import exponential_backoff

    settings = get_settings()
    backoff = settings.callbacks.backoff_seconds
    state = send_callback.with_options(
        retries=settings.callbacks.retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=backoff) if backoff else 0,
    )(batch_id, return_state=True)
    if not state.is_completed():
        get_run_logger().warning("batch %s: completion callback not delivered: %s", batch_id,
                                 state.message)


def _percent(done: int, total: int) -> float:
    return 100.0 * done / total if total else 100.0


def _create_progress(batch_id: str, done: int, total: int) -> UUID:
    return orchestration.create_progress(
        _percent(done, total), key=f"batch-{batch_id}-progress",
        description=f"batch {batch_id}: {done}/{total} items")


def _show_progress(progress_id: UUID, batch_id: str, done: int, total: int) -> None:
    orchestration.update_progress(progress_id, _percent(done, total),
                                  description=f"batch {batch_id}: {done}/{total} items")


def _cancelled_in_prefect(flow: Any, flow_run: FlowRun, state: State) -> None:
    """``on_cancellation``: the flow run was cancelled in Prefect (the UI, ``prefect
    flow-run cancel``), so its batch is cancelled too and the reaper leaves it. Run by the
    runner or worker once it has stopped the run's process, the items get their results here;
    run inside the flow's own process (no runner), the batch's chunks are stopping and the
    reaper records them."""
    stopped = FlowRunContext.get() is None  # not this run's own process
    batch_id = cancel_for_flow_run(str(flow_run.id), run_stopped=stopped)
    if batch_id is not None:
        get_logger("batchops.flows").info("flow run %s was cancelled: batch %s cancelled",
                                          flow_run.id, batch_id)


@flow(
    name="process-batch",
    task_runner=ThreadPoolTaskRunner(max_workers=get_settings().execution.chunk_workers),  # type: ignore[arg-type]
    log_prints=True,
    on_cancellation=[_cancelled_in_prefect],
)
def process_batch(
    batch_id: str | None = None,
    operations: list[Operation] | None = None,
    concurrency: int | None = None,
    deadline_seconds: float | None = None,
) -> BatchSummary:
    """Run a batch: every chunk once, every item's result recorded, progress as it goes.

    Args:
        batch_id: a batch registered through the API or the CLI.
        operations: or the operations themselves (a run started from the Prefect UI or a
            schedule); they are validated and registered as a new batch first.
        concurrency: items in flight at once for a batch given as ``operations``.
        deadline_seconds: no item starts later than this many seconds from now (for a
            ``batch_id``: from the start of this run); the items left are ``skipped``.

    Item failures are results, not flow failures; the flow fails only when a chunk cannot be
    executed after its retries. On a transient error (the store unreachable or refusing
    writes) the batch stays ``processing`` and the reaper runs it again from the completed
    chunks; on another error the chunk's items are recorded failed (``chunk_failed``) and the
    batch ``failed``. A cancelled batch starts no further item; its run records every item
    not run as ``cancelled`` and ends ``Cancelled``. A batch with a ``callback_url`` gets its
    signed completion callback once it has finished; an undelivered callback does not fail
    the flow.
    """
    logger = get_run_logger()
    run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    if batch_id is None:
        if not operations:
            raise ValueError("process_batch needs a batch_id or a list of operations")
        # A retry of this run (Retry in the UI, `prefect flow-run retry`) is the batch it
        # registered the first time, not a new one.
        batch_id = batch_of_run(run_id) if run_id else None
        if batch_id is None:
            batch_id = register_operations(operations, concurrency, source="flow",
                                           deadline_seconds=deadline_seconds)
        deadline_seconds = None  # counted from the registration
    _name_flow_run(batch_id)
    if run_id is not None and (reopened := reopen_if_retried(batch_id, run_id)) is not None:
        logger.info("batch %s: this run is retried in Prefect: %d failed or skipped item(s) "
                    "run again", batch_id, reopened)
    batch = load_batch(batch_id, run_id, deadline_seconds)
    chunks: list[tuple[ChunkRef, list[int]]] = batch["chunks"]
    total = batch["total"]
    settings = get_settings()
    parallel = max(1, min(settings.execution.chunk_workers, batch["concurrency"], len(chunks)))
    # A target that pools the batch's chunks (http) holds the whole concurrency across them;
    # the others split it between the chunks in flight.
    per_chunk = max(1, batch["concurrency"] // parallel)
    logger.info("batch %s: %d items in %d chunks, %d chunks at a time, %d items each",
                batch_id, total, len(chunks), parallel, per_chunk)

    # No progress artifact for one chunk (it would go from 0 to 100 % at once): two API
    # calls fewer for every small batch, whose caller waits for its answer.
    progress_id = _create_progress(batch_id, 0, total) if len(chunks) > 1 else None
    done_items = 0
    last_update, shown = 0.0, -1
    failures: list[tuple[ChunkRef, BaseException]] = []
    for finished in _run_chunks(chunks, parallel, per_chunk, batch["scope"],
                                batch["generation"], batch["concurrency"]):
        if finished is None:  # a second without a chunk ending: count the checkpoints
            if progress_id is not None:
                moved = done_items + checkpointed_items(batch_id, batch["generation"])
                if shown < moved < total:
                    _show_progress(progress_id, batch_id, moved, total)
                    last_update, shown = time.monotonic(), moved
            continue
        ref, future = finished
        try:
            outcome = future.result()
            done_items += outcome.total
        except CancelledRun:
            logger.info("chunk %d (%s) not started: the batch was cancelled", ref.chunk_index,
                        ref.label)
        except Exception as exc:
            failures.append((ref, exc))
            logger.error("chunk %d (%s) could not finish: %s", ref.chunk_index, ref.label, exc)
        now = time.monotonic()
        if (progress_id and shown < done_items < total
                and now - last_update >= PROGRESS_MIN_INTERVAL):
            # After each chunk, at most a few times a second: every update is an API call.
            _show_progress(progress_id, batch_id, done_items, total)
            last_update, shown = now, done_items

    # The batch is final in the store first (a sync answer leaves then), the last progress
    # update after it.
    summary, status = finish_batch(batch_id, failures)
    failed_chunks = [ref for ref, _ in failures]
    error = failure_message(failures) or None
    if progress_id and shown != status.completed:
        _show_progress(progress_id, batch_id, status.completed, total)
    report_batch(status, failed_chunks, error)
    if batch["callback"] and status.status.is_final:
        _send_callback(batch_id)
    if status.status is BatchState.CANCELLED:
        logger.info("batch %s cancelled: %s", batch_id, summary.model_dump())
        # Prefect makes a state the flow returns its run's final state: Cancelled.
        return Cancelled(  # type: ignore[return-value]
            message=f"batch {batch_id} was cancelled: {summary.succeeded} succeeded, "
                    f"{summary.failed} failed, {summary.skipped} not started")
    if status.status is BatchState.PROCESSING:
        raise RuntimeError(
            f"batch {batch_id}: {len(failures)} chunk(s) could not finish ({error}); the "
            "reaper runs the batch again from its completed chunks once it is stale")
    if failures:
        raise RuntimeError(
            f"batch {batch_id}: {len(failures)} chunk(s) could not finish ({error}); their "
            "items are recorded failed (chunk_failed): retry the batch to run them again")
    logger.info("batch %s finished: %s", batch_id, summary.model_dump())
    return summary
