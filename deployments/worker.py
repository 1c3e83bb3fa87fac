"""The ``batchops`` worker type: flow runs of a work pool executed warm, in this process.

A Prefect ``process`` worker starts a new Python process for every flow run, which imports
Prefect and batchops again before the flow starts (seconds of CPU per run on a small machine).
A batchops worker is a :class:`~prefect.workers.base.BaseWorker` — Prefect's documented way to
change how flow runs execute — that runs each flow run it picks up in a thread of its own
process: the flows are imported once, the database engines and HTTP clients stay open between
runs, and a run starts in milliseconds.

* ``prefect worker start --pool batchops --type batchops`` (the type is registered through
  the ``prefect.collections`` entry point), or ``batchops worker``;
* ``batchops deploy`` creates the ``batchops``-type work pool and registers the deployments
  with it by module path (every worker runs the installed package: no code storage);
* ``--limit`` flow runs at once (Prefect's worker limit); each batch's chunks run on the
  flow's own task runner. A worker asks for scheduled runs when its slot frees — as soon as
  one of its runs ends, and once it has first synced with the server — besides its poll
  every ``PREFECT_WORKER_QUERY_SECONDS``: with runs waiting, a slot stays empty for the
  time it takes to take the next one, not until the next poll;
* Prefect's cancel of a running flow run (the UI, ``prefect flow-run cancel``): the batch is
  cancelled in the store, its chunks stop starting items within about a second and the run
  ends ``Cancelled`` (:mod:`batchops.cancellation`); a non-batch flow finishes its step and
  its run is then marked ``Cancelled``;
* a worker killed mid-run takes its runs with it; their batches' heartbeats stop and the
  reaper runs them again from their checkpoints, on another worker: every batchops worker
  sweeps for such batches at its heartbeat (``PREFECT_WORKER_HEARTBEAT_SECONDS``, 30 s), in
  its own process and without a flow run (:func:`batchops.recovery.sweep`; taking a batch is a
  conditional update, so two workers never both restart one).

The job variables of a process pool (command, working directory, environment) do not apply:
every run shares the worker's environment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from typing import Any, cast
from uuid import UUID

import anyio
import anyio.abc
from prefect.flow_engine import run_flow
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.states import State
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult

from batchops import orchestration
from batchops.orchestration import FlowRun

__all__ = ["WORKER_TYPE", "BatchopsWorker"]

WORKER_TYPE = "batchops"
_CANCEL_POLL_SECONDS = 1.0  # one read per worker per second while runs are in flight


class BatchopsJobConfiguration(BaseJobConfiguration):
    """Nothing to configure per run: runs share the worker's process and environment."""


class BatchopsVariables(BaseVariables):
    """The pool's job variables (name, labels; the environment is the worker's)."""


class BatchopsWorkerResult(BaseWorkerResult):
    """How a flow run executed by a batchops worker ended (0: it reached a final state)."""


class BatchopsWorker(BaseWorker[BatchopsJobConfiguration, BatchopsVariables,
                                BatchopsWorkerResult]):
    """Runs the pool's flow runs in threads of this process (see the module's docs)."""

    type = WORKER_TYPE
    job_configuration = BatchopsJobConfiguration
    job_configuration_variables = BatchopsVariables
    _description = ("Runs batchops flow runs warm, each in a thread of the worker's process "
                    "(no process per flow run).")
    _display_name = "batchops"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flows: dict[UUID, Flow[..., Any]] = {}  # deployment id → its flow, imported once
        self._flows_lock = threading.Lock()
        # The runs executing here (execute_watched), and those Prefect is cancelling.
        self._watched: set[UUID] = set()
        self._cancel_requested: set[UUID] = set()
        self._watched_lock = threading.Lock()
        self._cancel_watch: threading.Thread | None = None
        self._taking: asyncio.Task[None] | None = None  # asking for runs now, off the poll
        self._take_again = False
        self._synced = False
        self._identity = f"{socket.gethostname()}:{os.getpid()}"

    async def sync_with_backend(self) -> None:
        """Prefect's heartbeat and work-pool sync, then the recovery sweep (never raised: a
        failing sweep must not stop the worker's heartbeat; the next one tries again)."""
        await super().sync_with_backend()
        if not self._synced:
            self._synced = True
            self._take_runs_soon()  # the first poll may have come before the sync
        from prefect.logging import get_logger

        from batchops.recovery import sweep
        from batchops.runtime import get_runtime

        try:
            restarted = await anyio.to_thread.run_sync(
                lambda: sweep(get_runtime(), logger=get_logger("batchops.recovery")))
        except Exception as exc:
            self._logger.warning("recovery sweep failed: %s", exc)
            return
        if restarted:
            self._logger.info("recovery sweep: %d batch(es) whose run died run again: %s",
                              len(restarted), ", ".join(restarted))

    async def run(self, flow_run: FlowRun, configuration: BatchopsJobConfiguration,
                  task_status: anyio.abc.TaskStatus[str] | None = None,  # type: ignore[override]
                  ) -> BatchopsWorkerResult:
        # The run's identifier (host:pid:flow run) is reported as its infrastructure pid; the
        # worker stores it as a string, whatever BaseWorker's annotation says.
        flow = await self._flow_of(flow_run)
        identifier = f"{self._identity}:{flow_run.id}"
        if task_status is not None:
            task_status.started(identifier)
        try:
            state = await anyio.to_thread.run_sync(self.execute_watched, flow, flow_run)
        finally:
            self._take_runs_soon()  # this run's slot is free once run() has returned
        return BatchopsWorkerResult(identifier=identifier,
                                    status_code=0 if state is not None else 1)

    def execute_watched(self, flow: Flow[..., Any], flow_run: FlowRun) -> State[Any] | None:
        """Run ``flow_run`` of ``flow`` in the calling thread, as :meth:`execute` does, and
        honour Prefect's cancel of it: once a second a thread of this worker reads which of
        its runs Prefect is cancelling (state ``Cancelling``) and stops them; a run that ends
        after its cancel without reaching ``Cancelled`` itself (a flow that is not a batch
        cannot be stopped midway) is marked so. The worker's own runs come here from
        :meth:`run`; a process that embeds a worker without polling its pool (the API, for
        sync batches) hands it runs here directly."""
        with self._watched_lock:
            self._watched.add(flow_run.id)
            if self._cancel_watch is None or not self._cancel_watch.is_alive():
                self._cancel_watch = threading.Thread(
                    target=self._watch_cancellations, name="batchops-cancel-watch",
                    daemon=True)
                self._cancel_watch.start()
        try:
            state = self.execute(flow, flow_run)
        finally:
            with self._watched_lock:
                self._watched.discard(flow_run.id)
                cancelled = flow_run.id in self._cancel_requested
                self._cancel_requested.discard(flow_run.id)
        if cancelled and not (state is not None and state.is_cancelled()):
            orchestration.mark_cancelled(flow_run.id, "cancelled in Prefect; stopped by the "
                                                      "batchops worker after its current step")
        return state

    def _watch_cancellations(self) -> None:
        """Every second while runs are in flight: those Prefect has been asked to cancel are
        stopped (the thread ends when none is left; the next run starts another)."""
        while True:
            time.sleep(_CANCEL_POLL_SECONDS)
            with self._watched_lock:
                if not self._watched:
                    self._cancel_watch = None
                    return
                waiting = self._watched - self._cancel_requested
            if not waiting:
                continue
            try:
                cancelling = orchestration.read_cancelling(list(waiting))
            except Exception as exc:  # the server is away: ask again next time
                self._logger.warning("could not read cancelled flow runs: %s", exc)
                continue
            for run in cancelling:
                with self._watched_lock:
                    self._cancel_requested.add(run.id)
                self._stop(run)

    def execute(self, flow: Flow[..., Any], flow_run: FlowRun) -> State[Any] | None:
        """Run ``flow_run`` of ``flow`` in the calling thread: Prefect's engine runs it here
        (its parameters, states, task runs, logs). ``None`` when the engine itself could not
        run it (the worker reports it crashed). Runs come here through
        :meth:`execute_watched`."""
        try:
            state = run_flow(flow, flow_run=flow_run, return_type="state",
                             error_logger=cast(logging.Logger, self.get_flow_run_logger(flow_run)))
        except Exception:
            self.get_flow_run_logger(flow_run).exception(
                "the flow run could not be executed in the batchops worker")
            return None
        return state if isinstance(state, State) else None

    async def _flow_of(self, flow_run: FlowRun) -> Flow[..., Any]:
        """The flow of the run's deployment, imported from its entrypoint the first time."""
        if flow_run.deployment_id is None:
            raise ValueError(f"flow run {flow_run.id} has no deployment; a worker runs "
                             "deployments' flow runs only")
        flow = self._flows.get(flow_run.deployment_id)
        if flow is None:
            name, entrypoint = await orchestration.deployment_entrypoint(
                self.client, flow_run.deployment_id)
            if not entrypoint:
                raise ValueError(f"deployment {name!r} has no entrypoint")
            loaded: Flow[..., Any] = await anyio.to_thread.run_sync(
                load_flow_from_entrypoint, entrypoint, False)
            with self._flows_lock:
                flow = self._flows.setdefault(flow_run.deployment_id, loaded)
        return flow

    # -- taking runs between polls ------------------------------------------------------------

    def _take_runs_soon(self) -> None:
        """Ask for scheduled runs on the next turn of the event loop (Prefect gives a run's
        slot back right after ``run`` returns); one ask at a time, again if more slots freed
        meanwhile."""
        if self._taking is not None and not self._taking.done():
            self._take_again = True
            return
        self._taking = asyncio.get_running_loop().create_task(self._take_runs())

    async def _take_runs(self) -> None:
        await asyncio.sleep(0)
        self._take_again = True
        while self._take_again:
            self._take_again = False
            try:
                await self.get_and_submit_flow_runs()
            except Exception as exc:  # the regular poll tries again
                self._logger.warning("could not take scheduled flow runs: %s", exc)
                return

    # -- cancellation from Prefect ------------------------------------------------------------

    def _stop(self, flow_run: FlowRun) -> None:
        """Stop a running flow run Prefect is cancelling: a batch's run is told through the
        store (its chunks stop; the run ends ``Cancelled``)."""
        from batchops.batch_steps import cancel_for_flow_run

        batch_id = cancel_for_flow_run(str(flow_run.id), run_stopped=False)
        logger = self.get_flow_run_logger(flow_run)
        if batch_id is not None:
            logger.info("cancelled in Prefect: batch %s stops starting items", batch_id)
        else:
            logger.info("cancelled in Prefect: the run ends after its current step")

    async def kill_infrastructure(self, infrastructure_pid: str,
                                  configuration: BatchopsJobConfiguration,
                                  grace_seconds: int = 30) -> None:
        """A pending run that is cancelled never starts here: nothing to kill."""
        return None
