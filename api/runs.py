"""Starting a registered batch: in this process (sync answers) or as a deployment flow run.

Sync batches run ``process_batch`` in a small thread pool of the API process, so a request
can wait for its results and answer ``202`` when the wait is over while the run goes on.
Async batches become a flow run of the ``process-batch`` deployment, which a runner or a
worker picks up; the API does not wait for it.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx

from batchops.errors import TransientError
from batchops.runtime import Runtime
from batchops.schemas import BatchState
from batchops.store import Store

__all__ = ["BatchRunner", "SyncRun"]

logger = logging.getLogger("api")


def _sync_flow(settings: Any) -> Any:
    """``process_batch`` as a sync run inside the API runs it.

    Its result storage and persistence are given, so the engine does not ask the Prefect
    server for its default result storage (twice per run); and its flow run is created here
    with its name, so the engine does not rename it (one API call each).
    """
    from flows.process_batch import process_batch  # imports Prefect only when a batch runs

    flow = process_batch.with_options(
        result_storage=Path(settings.results.local_storage_path),
        persist_result=bool(settings.results.persist_by_default))
    flow.flow_run_name = None
    return flow


def _create_flow_run(mine: _ThreadPrefect, batch_id: str) -> Any:
    """The batch's flow run, named after it (as ``client.create_flow_run`` makes it).

    The flow's id is looked up once per thread, not before every run (``POST /flows/`` is a
    write: one fewer on a sync answer's path); when the flow has been deleted since, once more.
    """
    from prefect.client.schemas.actions import FlowCreate, FlowRunCreate
    from prefect.client.schemas.objects import Flow, FlowRun, FlowRunPolicy
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
    from prefect.states import Pending, to_state_create

    flow, client = mine.flow, mine.client
    for attempt in range(2):
        if mine.flow_id is None:
            created = client.request("POST", "/flows/",
                                     json=FlowCreate(name=flow.name).model_dump(mode="json"))
            mine.flow_id = Flow.model_validate(created.json()).id
        run = FlowRunCreate(
            flow_id=mine.flow_id, flow_version=flow.version, name=f"batch-{batch_id}",
            parameters={"batch_id": batch_id}, state=to_state_create(Pending()),
            empirical_policy=FlowRunPolicy(retries=flow.retries,
                                           retry_delay=int(flow.retry_delay_seconds or 0)))
        try:
            response = client.request("POST", "/flow_runs/",
                                      json=run.model_dump(mode="json", exclude_unset=True))
        except (ObjectNotFound, PrefectHTTPStatusError) as exc:
            status = getattr(getattr(exc, "response", None), "status_code", 404)
            if attempt or status not in (404, 409):
                raise
            mine.flow_id = None  # the flow is gone: create it again
            continue
        return FlowRun.model_validate(response.json())
    raise AssertionError("unreachable")


def _run_flow(mine: _ThreadPrefect, batch_id: str) -> None:
    from prefect.flow_engine import run_flow_sync
    from prefect.states import State

    flow = mine.flow
    parameters = {"batch_id": batch_id}
    flow_run = _create_flow_run(mine, batch_id)
    state = run_flow_sync(flow, flow_run=flow_run, parameters=parameters, return_type="state")
    assert isinstance(state, State)
    if not state.is_completed():
        logger.warning("batch %s: its flow run ended %s: %s", batch_id, state.type.value,
                       state.message)


class WriteGate:
    """One write at a time, urgent ones first, otherwise in arrival order.

    A write that can wait (its run has answered) waits while urgent writes wait or a run
    that has not answered yet is under way (:meth:`begin_urgent` … :meth:`end_urgent`), for up
    to ``max_defer`` seconds; then it counts as urgent from when it arrived, so a steady
    stream of urgent work cannot hold a finished run's bookkeeping back for longer.
    """

    def __init__(self, max_defer: float = 0.5) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._urgent_runs = 0
        # [priority (0 urgent, 1 can wait), arrival, ticket]: the smallest goes next
        self._waiting: list[list[float]] = []
        self._tickets = itertools.count()
        self._max_defer = max_defer

    @contextmanager
    def turn(self, urgent: bool = True) -> Iterator[None]:
        with self._cond:
            arrived = time.monotonic()
            me = [0.0 if urgent else 1.0, arrived, float(next(self._tickets))]
            self._waiting.append(me)
            try:
                while True:
                    now = time.monotonic()
                    if me[0] and now >= arrived + self._max_defer:
                        me[0] = 0.0
                    if (not self._busy and min(self._waiting) is me
                            and not (me[0] and self._urgent_runs)):
                        break
                    self._cond.wait(arrived + self._max_defer - now if me[0] else None)
                self._busy = True
            finally:
                self._waiting.remove(me)
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def begin_urgent(self) -> None:
        """A run whose caller waits for its answer has started."""
        with self._cond:
            self._urgent_runs += 1

    def end_urgent(self) -> None:
        """That run has answered (or ended)."""
        with self._cond:
            self._urgent_runs -= 1
            self._cond.notify_all()


class _OneWriteAtATime(httpx.BaseTransport):
    """Sends this process's writes to the Prefect server one at a time (a :class:`WriteGate`).

    A Prefect server on SQLite (the embedded default) creates a flow run in a transaction
    that reads before it writes; when another write commits in between, the create fails
    with ``503`` (``database is locked``) and Prefect's client waits 2 s before it tries
    again. A sync answer leaves as soon as its batch is final in the store, while its flow
    run still sends artifacts and its ``Completed`` state — just when the caller's next batch
    creates its flow run. Measured in ``bench.api``: most 10-item sync batches took 2 s
    instead of ~0.2 s. One write at a time from this process (they take a few ms each) keeps
    them apart, and the writes of runs that have answered let the others go first
    (``urgent``); reads go at once.
    """

    def __init__(self, inner: httpx.BaseTransport, gate: WriteGate,
                 urgent: Callable[[], bool] = lambda: True) -> None:
        self._inner = inner
        self._gate = gate
        self._urgent = urgent

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return self._inner.handle_request(request)
        with self._gate.turn(self._urgent()):
            response = self._inner.handle_request(request)
            response.read()  # the server is done with it once its body is here
            return response

    def close(self) -> None:
        self._inner.close()


class _ThreadPrefect(threading.local):
    """A sync worker thread's Prefect client and run settings, made once, not on every run.

    Measured per sync batch in the API process: a new Prefect client (SSL context, CSRF
    token request) cost ~30 ms of CPU, and a copy of the settings ~45 ms.
    """

    base_settings: Any = None
    run_settings: Any = None
    flow: Any = None
    flow_id: UUID | None = None
    answered = False  # this thread's run has marked its batch final: its caller has the answer
    client: Any = None
    api_url: str | None = None


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

    def __init__(self, workers: int, deployment: str, *, serial_writes: bool = True) -> None:
        self.deployment = deployment
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batchops-sync")
        self._prefect = _ThreadPrefect()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()
        self._write_gate = WriteGate()
        self._serial_writes = serial_writes
        # batch id → the sync run started here, until it ends
        self._runs: dict[str, SyncRun] = {}
        self._store: Store | None = None

    def attach(self, runtime: Runtime) -> None:
        """Hear from the store when a batch run here is final (see :meth:`SyncRun.wait`), and
        take each batch in the store before running it here.

        A sync batch waits in this process until one of its threads is free. The reaper starts
        a batch that stays queued without a flow run for long (its API may have died): taking
        it is a conditional update on each side, so exactly one of them runs it.
        """
        self._store = runtime.store
        runtime.store.on_finished(self._batch_finished)

    def _batch_finished(self, batch_id: str) -> None:
        self._answered()  # in the thread that marked it: a sync run's own
        run = self._runs.get(batch_id)
        if run is not None:
            run.settle()

    def start_in_process(self, batch_id: str) -> SyncRun:
        """Run the batch's flow in a worker thread (see :class:`SyncRun`).

        Called on the event loop: :meth:`SyncRun.wait` then also ends as soon as the run has
        marked the batch final in the store, before the flow run's own end (artifacts,
        states).
        """
        run = SyncRun(batch_id, asyncio.get_running_loop())
        self._runs[batch_id] = run
        # The request's context travels with the run (Prefect settings live in context vars).
        context = contextvars.copy_context()
        run.future = self._pool.submit(context.run, self._run_in_thread, batch_id)
        run.future.add_done_callback(lambda _: self._run_ended(run))
        return run

    def _run_ended(self, run: SyncRun) -> None:
        self._runs.pop(run.batch_id, None)
        run.settle()

    def _run_in_thread(self, batch_id: str) -> bool:
        from prefect.context import SettingsContext, SyncClientContext, get_settings_context

        if self._store is not None and not self._store.take_queued_batch(batch_id):
            logger.info("batch %s: the reaper gave it a flow run while it waited here", batch_id)
            return False
        mine = self._thread_prefect()
        mine.answered = False
        self._write_gate.begin_urgent()
        # The flow engine takes the client of the SyncClientContext it finds in the context.
        token = SyncClientContext.__var__.set(
            SyncClientContext.model_construct(client=mine.client))
        try:
            with SettingsContext(profile=get_settings_context().profile,
                                 settings=mine.run_settings):
                _run_flow(mine, batch_id)
        finally:
            SyncClientContext.__var__.reset(token)
            self._answered()
        return True

    def _answered(self) -> None:
        """This thread's run has answered its caller: its writes can wait."""
        mine = self._prefect
        if mine.run_settings is not None and not mine.answered:
            mine.answered = True
            self._write_gate.end_urgent()

    def _thread_prefect(self) -> _ThreadPrefect:
        """This thread's run settings, flow and open Prefect client, for the current
        settings."""
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
            mine.flow, mine.flow_id = _sync_flow(settings), None
        if mine.client is None or mine.api_url != settings.api.url:
            transport: httpx.BaseTransport = httpx.HTTPTransport(retries=3)
            if self._serial_writes:
                transport = _OneWriteAtATime(transport, self._write_gate,
                                             urgent=lambda: not self._prefect.answered)
            client = get_client(sync_client=True, httpx_settings={"transport": transport})
            client.__enter__()
            client.raise_for_api_version_mismatch_once()
            with self._clients_lock:
                self._clients.append(client)
            mine.client, mine.api_url, mine.flow_id = client, settings.api.url, None
        return mine

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
