"""``run_chunk``: one task run per chunk (sized by work, see :mod:`batchops.planning`)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from functools import lru_cache
from typing import Any

from prefect import Task, task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.states import Cancelled, State
from prefect.tasks import exponential_backoff

from batchops.errors import is_transient
from batchops.execution import ChunkOutcome, execute_chunk
from batchops.orchestration import TaskRun
from batchops.runtime import get_runtime
from batchops.schemas import BatchState, ChunkRef

__all__ = ["chunk_cache_key", "chunk_cache_policy", "retry_transient_failures", "run_chunk"]


def chunk_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Batch id + chunk position + the hash of the chunk's idempotency keys (+ run generation).

    A second flow run of the same batch finds the chunks the first one completed.
    """
    ref: ChunkRef = parameters["ref"]
    return (f"batchops-chunk-{ref.batch_id}-{ref.chunk_index}-{ref.cache_token}"
            f"-g{parameters.get('generation', 0)}")


@lru_cache(maxsize=4)  # one lock manager (one Redis pool) per URL
def chunk_cache_policy(redis_url: str | None, hold_seconds: float | None = None) -> CachePolicy:
    """The chunk task's cache policy: :func:`chunk_cache_key`, and with Redis configured, a
    ``RedisLockManager`` at ``SERIALIZABLE`` isolation.

    With workers on several machines, two flow runs of one batch (a re-run racing a run
    thought dead) may start the same chunk at once; the lock makes the second wait for the
    first's cache record and read it, instead of running the chunk again. The lock expires
    after ``hold_seconds`` (the batch's stale-after time): a holder killed with its worker
    would otherwise keep it for good and the reaper's re-run would wait on it forever, and a
    holder alive past that time has stopped beating the batch's heartbeat, so the batch is
    presumed dead anyway.
    """
    policy = CachePolicy.from_cache_key_fn(chunk_cache_key)
    if redis_url is None:
        return policy
    from prefect.transactions import IsolationLevel
    from prefect_redis import RedisLockManager

    class ExpiringRedisLockManager(RedisLockManager):
        def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                         hold_timeout: float | None = None) -> bool:
            return super().acquire_lock(key, holder, acquire_timeout,
                                        hold_timeout if hold_timeout else hold_seconds)

        async def aacquire_lock(self, key: str, holder: str,
                                acquire_timeout: float | None = None,
                                hold_timeout: float | None = None) -> bool:
            return await super().aacquire_lock(key, holder, acquire_timeout,
                                               hold_timeout if hold_timeout else hold_seconds)

    return policy.configure(lock_manager=ExpiringRedisLockManager(connection_url=redis_url),
                            isolation_level=IsolationLevel.SERIALIZABLE)


def retry_transient_failures(task: Task[..., Any], task_run: TaskRun, state: State) -> bool:
    """Retry what :func:`batchops.errors.is_transient` says may pass: lost connections,
    timeouts, a store that is busy or refuses writes for now (SQLite's "database is locked"
    and "attempt to write a readonly database", PostgreSQL's read-only transactions); a
    constraint violation or a bug is not retried."""
    exc = state_exception(state)
    return exc is not None and is_transient(exc)


def state_exception(state: State) -> BaseException | None:
    """The exception a failed or crashed state holds (``None`` for any other state). Called
    from a sync task's retry condition, where Prefect dispatches to its sync variant."""
    from prefect.states import get_state_exception

    if not (state.is_failed() or state.is_crashed()):
        return None
    exc = get_state_exception(state)
    if not isinstance(exc, BaseException):
        raise TypeError(f"not a sync context: get_state_exception returned {exc!r}")
    return exc


@task(
    name="run-chunk",
    task_run_name="chunk {ref.chunk_index} ({ref.label})",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=1),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_transient_failures,
    cache_policy=chunk_cache_policy(None),  # the flow sets the configured lock manager
    cache_expiration=timedelta(hours=24),
    persist_result=True,
)
def run_chunk(ref: ChunkRef, concurrency: int, scope: str,
              generation: int = 0, batch_concurrency: int | None = None) -> ChunkOutcome | State:
    """Execute the chunk's items and record their results (see ``batchops.execution``).

    ``concurrency`` is the chunk's share of the batch's, ``batch_concurrency`` the batch's own
    (the http target pools the batch's chunks under it).
    A cancelled batch starts no new chunk: the task run ends ``Cancelled`` (never cached).
    Past the batch's deadline the chunk starts no item: they are recorded ``skipped``.
    A sync task on purpose: in a worker thread it shares the flow's Prefect client, where an
    async task would build a client per run; the items' event loop is the chunk's own.
    """
    runtime = get_runtime()
    batch = runtime.store.get_batch(ref.batch_id)
    if batch.status == BatchState.CANCELLED.value:
        return Cancelled(message=f"batch {ref.batch_id} was cancelled; chunk not started")
    return asyncio.run(execute_chunk(runtime, ref, concurrency=concurrency, scope=scope,
                                     generation=generation, deadline=batch.deadline_at,
                                     batch_concurrency=batch_concurrency))
