"""Starting a registered batch: in this process (sync answers) or as a deployment flow run.

Every batch is a flow run of the ``process-batch`` deployment. A sync batch's run is created
``Pending`` (no worker polling the deployment's pool picks it up) and handed directly to a
batchops worker embedded in the API process (:class:`deployments.worker.BatchopsWorker`, not
polling any pool), which executes it on a small thread pool of its own, so a request can wait
for its results and answer ``202`` when the wait is over while the run goes on. An async
batch's run is created ``Scheduled``, and a batchops worker polling the deployment's pool runs
it; the API does not wait for it. The Prefect calls go through :mod:`batchops.orchestration`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from uuid import UUID

from batchops import batch_runs, orchestration
from batchops.errors import TransientError
from batchops.lifecycle import BatchLifecycle
from batchops.runtime import Runtime

__all__ = ["BatchRunner", "SyncRun"]

logger = logging.getLogger("api")


def _sync_flow(settings: Any) -> Any:
    """``process_batch`` as a sync run inside the API runs it: its result storage and
    persistence are given, so the engine does not ask the Prefect server for its default
    result storage (twice per run)."""
    from flows.process_batch import process_batch  # imports Prefect only when a batch runs

    return process_batch.with_options(
        result_storage=Path(settings.results.local_storage_path),
        persist_result=bool(settings.results.persist_by_default))


class _ThreadSettings(threading.local):
    """A sync thread's run settings and flow, made once per Prefect settings object, not on
    every run (a copy of the settings costs ~45 ms of CPU)."""

    base_settings: Any = None
    run_settings: Any = None
    flow: Any = None


class SyncRun:
    """A sync batch handed to the API's thread pool: its future, and an event set once the
    run has marked the batch final in the store or has ended (whichever comes first)."""

    def __init__(self, batch_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.batch_id = batch_id
        self.loop = loop
        self.settled = asyncio.Event()
        self.future: Future[bool] = Future()

    async def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the batch to be final or the run to end; ``True`` when
        it is. A wait that times out never touches the run itself."""
        if self.settled.is_set() or self.future.done():
            return True
        try:
            await asyncio.wait_for(self.settled.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    def settle(self) -> None:
        """The batch is final or the run has ended (from any thread): wake the waiter."""
        self.loop.call_soon_threadsafe(self.settled.set)

    def ran_elsewhere(self) -> bool:
        """The run ended without running the batch here: by the time a thread was free, the
        reaper had given the batch a flow run of its own (see :meth:`BatchRunner.attach`)."""
        return (self.future.done() and not self.future.cancelled()
                and self.future.exception() is None and self.future.result() is False)

    def error(self) -> BaseException | None:
        """Why a run that ended without finishing its batch did (``None`` if it raised
        nothing)."""
        if self.future.cancelled():
            return None
        return self.future.exception()


class BatchRunner:
    """Runs batches in this process (``workers`` at a time) or through a deployment."""

    def __init__(self, workers: int, deployment: str) -> None:
        from deployments.worker import BatchopsWorker

        self.deployment = deployment
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batchops-sync")
        self._settings = _ThreadSettings()
        self._pending = orchestration.PendingRuns(deployment)
        # The embedded worker: it polls no pool; the runs are handed to it (see _run_in_thread).
        self.worker = BatchopsWorker(work_pool_name="batchops-api", limit=workers,
                                     name=f"batchops-api-{id(self):x}")
        # batch id → the sync run started here, until it ends
        self._runs: dict[str, SyncRun] = {}
        self._lifecycle: BatchLifecycle | None = None

    def attach(self, runtime: Runtime) -> None:
        """Hear from the store when a batch run here is final (see :meth:`SyncRun.wait`), and
        take each batch in the store before running it here.

        A sync batch waits in this process until one of its threads is free. The reaper starts
        a batch that stays queued without a flow run for long (its API may have died): taking
        it is a conditional update on each side, so exactly one of them runs it.
        """
        self._lifecycle = runtime.lifecycle
        runtime.lifecycle.on_finished(self._batch_finished)

    def _batch_finished(self, batch_id: str) -> None:
        run = self._runs.get(batch_id)
        if run is not None:
            run.settle()

    def start_in_process(self, batch_id: str) -> SyncRun:
        """Run the batch's flow in a worker thread (see :class:`SyncRun`).

        Called on the event loop: :meth:`SyncRun.wait` then also ends as soon as the run has
        marked the batch final in the store, before the flow run's own end (artifacts,
        states).
        """
        from prefect.settings import get_current_settings

        run = SyncRun(batch_id, asyncio.get_running_loop())
        self._runs[batch_id] = run
        # The request's Prefect settings travel with the run (they live in context vars).
        run.future = self._pool.submit(self._run_in_thread, batch_id, get_current_settings())
        run.future.add_done_callback(lambda _: self._run_ended(run))
        return run

    def _run_ended(self, run: SyncRun) -> None:
        self._runs.pop(run.batch_id, None)
        run.settle()

    def _run_in_thread(self, batch_id: str, settings: Any) -> bool:
        if self._lifecycle is not None and not self._lifecycle.take(batch_id):
            logger.info("batch %s: the reaper gave it a flow run while it waited here", batch_id)
            return False
        mine = self._thread_settings(settings)
        self._pending.run(mine.run_settings, self._run_batch, batch_id, mine.flow)
        return True

    def _run_batch(self, batch_id: str, flow: Any) -> None:
        try:
            flow_run = self._pending.create(flow, {"batch_id": batch_id},
                                            name=f"batch-{batch_id}")
        except LookupError as exc:
            raise TransientError(f"{exc}; retry") from None
        state = self.worker.execute_watched(flow, flow_run)
        if state is not None and not state.is_completed():
            logger.warning("batch %s: its flow run ended %s: %s", batch_id, state.type.value,
                           state.message)

    def _thread_settings(self, settings: Any) -> _ThreadSettings:
        """This thread's run settings and flow, for the request's Prefect ``settings``."""
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

        mine = self._settings
        if mine.base_settings is not settings:
            # No flow heartbeat for a sync run inside the API: Prefect joins its heartbeat
            # thread, which sleeps in 1-second steps, at the end of every run (~0.5 s on each
            # answer). The batch's own status in the store is what callers follow.
            mine.base_settings = settings
            mine.run_settings = settings.copy_with_update(
                updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
            mine.flow = _sync_flow(settings)
        return mine

    async def start_deployment(self, runtime: Runtime, batch_id: str,
                               generation: int = 0) -> UUID:
        """A flow run of the deployment for the queued batch (:func:`batchops.batch_runs.
        start_run`); its id.

        Raises:
            TransientError: the flow run could not be created (the batch is marked failed).
        """
        return await asyncio.to_thread(batch_runs.start_run, runtime, batch_id, generation)

    def shutdown(self) -> None:
        """Let the sync batches taken in finish (graceful shutdown); accept no new ones."""
        self._pool.shutdown(wait=True)
        self._pending.close()
