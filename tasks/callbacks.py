"""``send_callback``: deliver a finished batch's signed completion callback, with retries."""

from __future__ import annotations

from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.states import State
from prefect.tasks import exponential_backoff

from batchops.callbacks import deliver_callback
from batchops.errors import CallbackDeliveryFailed
from batchops.orchestration import TaskRun
from batchops.runtime import get_runtime
from batchops.schemas import CallbackStatus
from tasks.chunks import retry_transient_failures, state_exception

__all__ = ["retry_delivery_failures", "send_callback"]


def retry_delivery_failures(task: Task[..., Any], task_run: TaskRun, state: State) -> bool:
    """Retry connection errors, timeouts, 429 and 5xx answers; not a 4xx or a refused URL."""
    exc = state_exception(state)
    if exc is None:
        return False
    if isinstance(exc, CallbackDeliveryFailed):
        return exc.retryable
    return retry_transient_failures(task, task_run, state)  # the store's database


@task(
    name="send-callback",
    task_run_name="callback of batch {batch_id}",
    cache_policy=NO_CACHE,
    retries=5,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_delivery_failures,
)
def send_callback(batch_id: str) -> CallbackStatus | None:
    """One attempt per task run (see ``batchops.callbacks.deliver_callback``); the last one
    records a retryable failure as final. The flow sets retries and backoff from settings."""
    context = TaskRunContext.get()
    attempt = context.task_run.run_count if context else 1
    retries = context.task.retries if context else 0
    runtime = get_runtime()
    return deliver_callback(runtime.store, runtime.settings, batch_id, attempt=attempt,
                            final=attempt > retries)
