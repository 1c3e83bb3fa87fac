"""Starting a registered batch: in this process (sync answers) or as a deployment flow run.

Sync batches run ``process_batch`` in a small thread pool of the API process, so a request
can wait for its results and answer ``202`` when the wait is over while the run goes on.
Async batches become a flow run of the ``process-batch`` deployment, which a runner or a
worker picks up; the API does not wait for it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from uuid import UUID

from batchops.errors import TransientError
from batchops.runtime import Runtime
from batchops.schemas import BatchState

__all__ = ["BatchRunner"]

logger = logging.getLogger("api")


def _run_flow(batch_id: str) -> None:
    from flows.process_batch import process_batch  # imports Prefect only when a batch runs

    state = process_batch(batch_id=batch_id, return_state=True)
    if not state.is_completed():
        logger.warning("batch %s: its flow run ended %s: %s", batch_id, state.type.value,
                       state.message)


class _ThreadPrefect(threading.local):
    """A sync worker thread's Prefect client and run settings, made once, not on every run.

    Measured per sync batch in the API process: a new Prefect client (SSL context, CSRF
    token request) cost ~30 ms of CPU, and a copy of the settings ~45 ms.
    """

    base_settings: Any = None
    run_settings: Any = None
    client: Any = None
    api_url: str | None = None


class BatchRunner:
    """Runs batches in this process (``workers`` at a time) or through a deployment."""

    def __init__(self, workers: int, deployment: str) -> None:
        self.deployment = deployment
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batchops-sync")
        self._prefect = _ThreadPrefect()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()

    def start_in_process(self, batch_id: str) -> Future[None]:
        """Run the batch's flow in a worker thread; the future ends when the run has."""
        # The request's context travels with the run (Prefect settings live in context vars).
        context = contextvars.copy_context()
        return self._pool.submit(context.run, self._run_in_thread, batch_id)

    def _run_in_thread(self, batch_id: str) -> None:
        from prefect.context import SettingsContext, SyncClientContext, get_settings_context

        run_settings, client = self._thread_prefect()
        # The flow engine takes the client of the SyncClientContext it finds in the context.
        token = SyncClientContext.__var__.set(SyncClientContext.model_construct(client=client))
        try:
            with SettingsContext(profile=get_settings_context().profile, settings=run_settings):
                _run_flow(batch_id)
        finally:
            SyncClientContext.__var__.reset(token)

    def _thread_prefect(self) -> tuple[Any, Any]:
        """This thread's run settings and open Prefect client, for the current settings."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings

        mine = self._prefect
        settings = get_current_settings()
        if mine.base_settings is not settings:
            # No flow heartbeat for a sync run inside the API: Prefect joins its heartbeat
            # thread, which sleeps in 1-second steps, at the end of every run (~0.5 s on each
            # answer). The batch's own status in the store is what callers follow.
            mine.base_settings = settings
            mine.run_settings = settings.copy_with_update(
                updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
        if mine.client is None or mine.api_url != settings.api.url:
            client = get_client(sync_client=True)
            client.__enter__()
            client.raise_for_api_version_mismatch_once()
            with self._clients_lock:
                self._clients.append(client)
            mine.client, mine.api_url = client, settings.api.url
        return mine.run_settings, mine.client

    async def wait(self, run: Future[None], seconds: float) -> bool:
        """Wait up to ``seconds`` for an in-process run; ``True`` when it has ended."""
        if not run.done() and seconds > 0:
            await asyncio.wait({asyncio.wrap_future(run)}, timeout=seconds)
        return run.done()

    async def start_deployment(self, runtime: Runtime, batch_id: str,
                               generation: int = 0) -> UUID:
        """Create a flow run of the deployment for the batch; its id.

        Raises:
            TransientError: the flow run could not be created (the batch is marked failed).
        """
        from prefect.deployments import arun_deployment

        try:
            flow_run = await arun_deployment(
                self.deployment, parameters={"batch_id": batch_id}, timeout=0,
                as_subflow=False, flow_run_name=f"batch-{batch_id}",
                idempotency_key=f"batchops-batch-{batch_id}-g{generation}",
            )
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            logger.error("batch %s: cannot start a flow run of %s: %s", batch_id,
                         self.deployment, reason)
            await asyncio.to_thread(runtime.store.mark_finished, batch_id, BatchState.FAILED,
                                    f"could not start the flow run: {reason}")
            raise TransientError(
                f"could not start a flow run of the deployment {self.deployment!r} for batch "
                f"{batch_id}; retry the request") from None
        await asyncio.to_thread(runtime.store.set_flow_run_id, batch_id, str(flow_run.id))
        return flow_run.id

    def shutdown(self) -> None:
        """Let the sync batches taken in finish (graceful shutdown); accept no new ones."""
        self._pool.shutdown(wait=True)
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.__exit__(None, None, None)
