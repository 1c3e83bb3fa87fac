"""A batch's lifecycle: the only writer of ``batches.status``.

Every change of a batch's status is one of the events of :data:`TRANSITIONS`, written by one
conditional update whose condition comes from that table (the batch is in a state the event
leaves from) and whose new status comes from it too, so a transition the table does not list
can never be written, whatever the caller asks. The main path::

                register          start               complete
    (none) ───────────▶ queued ─────────▶ processing ──────────▶ completed
                         ▲  │                 │  │ fail
                         │  │ cancel   cancel │  └──────────────▶ failed
                         │  ▼                 │
                         │ cancelled ◀────────┘
                         │
                         └─── retry (from completed, failed or cancelled)

The table also lists the edges a real run takes around that picture: a run that starts again
(the reaper's, or Prefect's retry of a run whose batch had nothing left to run) takes the batch
to ``processing`` from ``processing``, ``completed`` or ``failed``; ``complete`` and ``fail``
are taken from any state but ``cancelled`` (a batch whose run could not even start fails from
``queued``; of two runs of one batch, the last to finish writes its status); ``settle`` gives a
cancelled batch its ``finished_at`` once every item has a result; ``take`` and ``recover``
leave the status as it is and only claim the batch for a run (its heartbeat, its recoveries,
its flow run).

Refused transitions: ``start`` of a cancelled batch and ``take`` or ``recover`` of a batch that
moved answer ``False``; ``cancel`` of a completed or failed batch raises
:class:`~batchops.errors.BatchFinished`; ``retry`` of a queued or processing one
:class:`~batchops.errors.BatchInProgress`; an unknown batch
:class:`~batchops.errors.BatchNotFound`. ``complete`` or ``fail`` of a cancelled batch settles
it instead: a cancelled batch stays cancelled.

After each change the committed status is published (:meth:`Store.publish_status`, Redis when
configured), and after ``complete``, ``fail`` and ``settle`` this process's finish listeners
hear of it (:meth:`BatchLifecycle.on_finished`: the API answers a sync batch then).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from batchops.errors import BatchFinished, BatchInProgress, BatchNotFound
from batchops.schemas import BatchState
from batchops.store import Store, deadline_from
from batchops.tables import batches, utcnow

__all__ = ["TRANSITIONS", "BatchEvent", "BatchLifecycle", "next_state"]


class BatchEvent(StrEnum):
    REGISTER = "register"  # stored with its chunks, waiting for a run
    START = "start"  # a flow run holds it
    COMPLETE = "complete"  # every chunk is recorded
    FAIL = "fail"  # the run could not finish, or could not start
    CANCEL = "cancel"  # no further item starts
    SETTLE = "settle"  # a cancelled batch's items all have results: its finished_at
    RETRY = "retry"  # its failed and skipped items are queued for another run
    TAKE = "take"  # a new batch is taken for a run in this process
    RECOVER = "recover"  # a batch whose run died is taken for a new run


_Q, _P, _C, _F, _X = (BatchState.QUEUED, BatchState.PROCESSING, BatchState.COMPLETED,
                      BatchState.FAILED, BatchState.CANCELLED)
_E = BatchEvent

# From each state (``None``: not stored yet), the events it may take and where each leads.
TRANSITIONS: Mapping[BatchState | None, Mapping[BatchEvent, BatchState]] = {
    None: {_E.REGISTER: _Q},
    _Q: {_E.START: _P, _E.COMPLETE: _C, _E.FAIL: _F, _E.CANCEL: _X, _E.TAKE: _Q,
         _E.RECOVER: _Q},
    _P: {_E.START: _P, _E.COMPLETE: _C, _E.FAIL: _F, _E.CANCEL: _X, _E.RECOVER: _P},
    _C: {_E.START: _P, _E.COMPLETE: _C, _E.FAIL: _F, _E.RETRY: _Q},
    _F: {_E.START: _P, _E.COMPLETE: _C, _E.FAIL: _F, _E.RETRY: _Q},
    _X: {_E.SETTLE: _X, _E.RECOVER: _X, _E.RETRY: _Q},
}


def next_state(state: BatchState | None, event: BatchEvent) -> BatchState | None:
    """Where ``event`` takes a batch in ``state``; ``None`` when the table does not allow it."""
    return TRANSITIONS.get(state, {}).get(event)


def _moves(event: BatchEvent) -> dict[BatchState, BatchState]:
    return {state: moves[event] for state, moves in TRANSITIONS.items()
            if state is not None and event in moves}


_FINISH = {BatchState.COMPLETED: BatchEvent.COMPLETE, BatchState.FAILED: BatchEvent.FAIL}


class BatchLifecycle:
    """The transitions of the batches of ``store`` (each in one short transaction of its own,
    unless it takes ``conn``)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._finish_listeners: list[Callable[[str], None]] = []

    def on_finished(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(batch_id)`` whenever this process has marked a batch finished
        (committed; in the marking thread): the API answers a sync batch then."""
        self._finish_listeners.append(listener)

    # -- the one way to write a status ---------------------------------------------------

    def _apply(self, conn: Connection, event: BatchEvent, batch_id: str,
               *where: sa.ColumnElement[bool], **values: Any) -> bool:
        """``event`` on the batch, if its status allows it (and ``where`` holds): one
        conditional update; whether it happened."""
        moves = _moves(event)
        targets = set(moves.values())
        status: Any = (next(iter(targets)).value if len(targets) == 1 else
                       sa.case({s.value: t.value for s, t in moves.items()},
                               value=batches.c.status))
        return conn.execute(batches.update().where(
            batches.c.id == batch_id, batches.c.status.in_([s.value for s in moves]), *where,
        ).values(status=status, **values)).rowcount == 1

    def _locked(self, conn: Connection, batch_id: str, *columns: sa.Column[Any]) -> sa.Row[Any]:
        """The batch's status and ``columns``, its row locked for ``conn``'s transaction."""
        row = conn.execute(sa.select(batches.c.status, *columns).where(batches.c.id == batch_id)
                           .with_for_update()).first()
        if row is None:
            raise BatchNotFound(batch_id)
        return row

    def _finished(self, batch_id: str) -> None:
        for listener in self._finish_listeners:
            listener(batch_id)
        self.store.publish_status(batch_id)

    # -- transitions ---------------------------------------------------------------------

    def register(self, conn: Connection, batch_id: str, *, concurrency: int, chunk_size: int,
                 scope: str, source: str, deadline_seconds: float | None = None) -> None:
        """Store a new batch, queued (in the caller's transaction, with its chunks)."""
        now = utcnow()
        state = next_state(None, BatchEvent.REGISTER)
        assert state is not None
        conn.execute(batches.insert().values(
            id=batch_id, status=state.value, scope=scope, source=source, total=0,
            concurrency=concurrency, chunk_size=chunk_size, created_at=now,
            deadline_seconds=deadline_seconds, deadline_at=deadline_from(now, deadline_seconds),
        ))

    def start(self, batch_id: str, flow_run_id: str | None) -> bool:
        """Processing under this flow run; ``False`` when the batch was cancelled."""
        with self.store.engine.begin() as conn:
            started = self._apply(
                conn, BatchEvent.START, batch_id, flow_run_id=flow_run_id,
                started_at=sa.func.coalesce(batches.c.started_at, utcnow()),
                finished_at=None, error=None, heartbeat_at=utcnow())
        self.store.publish_status(batch_id)
        return started

    def finish(self, batch_id: str, state: BatchState, error: str | None = None) -> bool:
        """``state`` (completed or failed), when every item has its result; whether the batch
        is ``state`` now. A cancelled batch stays cancelled: it is settled instead."""
        with self.store.engine.begin() as conn:
            finished = self._apply(conn, _FINISH[state], batch_id, finished_at=utcnow(),
                                   error=error)
            if not finished:
                self._settle(conn, batch_id)
        self._finished(batch_id)
        return finished

    def settle(self, batch_id: str) -> bool:
        """A cancelled batch's items all have their results: its ``finished_at`` (once);
        whether it was set now."""
        with self.store.engine.begin() as conn:
            settled = self._settle(conn, batch_id)
        self._finished(batch_id)
        return settled

    def _settle(self, conn: Connection, batch_id: str) -> bool:
        return self._apply(conn, BatchEvent.SETTLE, batch_id, batches.c.finished_at.is_(None),
                           finished_at=utcnow())

    def cancel(self, batch_id: str) -> BatchState:
        """Queued or processing → cancelled, in one conditional update (a batch finishing
        meanwhile is not cancelled); the status it had. Cancelling a cancelled batch changes
        nothing; a batch that has completed or failed cannot be cancelled (:class:`BatchFinished`).

        Its items that have no result yet get one (``skipped``, ``cancelled``) from whoever
        stops its run, which then settles it (see :mod:`batchops.cancellation`).
        """
        with self.store.engine.begin() as conn:
            was = BatchState(self._locked(conn, batch_id).status)
            self._apply(conn, BatchEvent.CANCEL, batch_id)
        if next_state(was, BatchEvent.CANCEL) is None and was is not BatchState.CANCELLED:
            raise BatchFinished(f"batch {batch_id} has already {was}")
        self.store.publish_status(batch_id)
        return was

    def retry(self, batch_id: str) -> int:
        """Open the batch's failed, skipped (and never-run) items for another run; how many.

        Chunks with failures or skipped items are reopened (their succeeded results are kept
        and not run again), the counters lose the failed and skipped items, the batch is
        queued under a new generation so chunk cache keys change, and a batch with a deadline
        gets a new one, ``deadline_seconds`` from now. A batch whose items all succeeded
        stays as it is (0).
        """
        b = batches.c
        with self.store.engine.begin() as conn:
            batch = self._locked(conn, batch_id, b.total, b.completed, b.generation,
                                 b.deadline_seconds)
            if next_state(BatchState(batch.status), BatchEvent.RETRY) is None:
                raise BatchInProgress(f"batch {batch_id} is {batch.status}; retry it once it "
                                      "has finished")
            failed, skipped = self.store.chunks.recorded_unsucceeded(conn, batch_id)
            to_run = batch.total - batch.completed + failed + skipped
            if to_run == 0:
                return 0  # every item succeeded: nothing to run, nothing changes
            self.store.chunks.reopen_unsucceeded(conn, batch_id)
            self.store.checkpoints.carry(conn, batch_id, batch.generation)
            self._apply(conn, BatchEvent.RETRY, batch_id,
                        generation=b.generation + 1, heartbeat_at=utcnow(),
                        completed=b.completed - failed - skipped,
                        failed=b.failed - failed, skipped=b.skipped - skipped,
                        deadline_at=deadline_from(utcnow(), batch.deadline_seconds),
                        finished_at=None, error=None)
        self.store.publish_status(batch_id)
        return to_run

    def take(self, batch_id: str) -> bool:
        """Take a new batch for a run in this process: ``False`` when it is no longer queued
        without a flow run (the reaper started one for it, or it was cancelled). Refreshes
        its heartbeat, so the reaper sees it alive until the run marks it started."""
        b = batches.c
        with self.store.engine.begin() as conn:
            return self._apply(conn, BatchEvent.TAKE, batch_id, b.flow_run_id.is_(None),
                               b.recoveries == 0, heartbeat_at=utcnow())

    def recover(self, batch_id: str, status: str, stale_after: timedelta,
                flow_run_id: str | None = None, *, detach: bool = False) -> bool:
        """Take a stale batch (seen ``status``, under ``flow_run_id``) for a new run: refreshes
        its heartbeat and counts a recovery, unless it moved meanwhile (another reaper took
        it, or its run started or changed). With ``detach`` the batch leaves its dead run
        (``flow_run_id`` unset until the new run's is set), so nothing else takes it for that
        run again."""
        b = batches.c
        cutoff = utcnow() - stale_after
        same_run = b.flow_run_id.is_(None) if flow_run_id is None else b.flow_run_id == flow_run_id
        values: dict[str, Any] = {"heartbeat_at": utcnow(), "recoveries": b.recoveries + 1}
        if detach:
            values["flow_run_id"] = None
        with self.store.engine.begin() as conn:
            return self._apply(conn, BatchEvent.RECOVER, batch_id, b.status == status, same_run,
                               sa.func.coalesce(b.heartbeat_at, b.created_at) < cutoff,
                               **values)

    # -- what a run notes on its batch (not its status) ----------------------------------

    def attach_run(self, batch_id: str, flow_run_id: str) -> None:
        """The flow run that will process a queued batch (so its UI link shows at once)."""
        with self.store.engine.begin() as conn:
            conn.execute(batches.update().where(batches.c.id == batch_id)
                         .values(flow_run_id=flow_run_id))
        self.store.publish_status(batch_id)

    def note_error(self, batch_id: str, error: str) -> None:
        """Why the batch's run could not finish, on a batch left for the reaper to resume."""
        with self.store.engine.begin() as conn:
            conn.execute(batches.update().where(batches.c.id == batch_id).values(error=error))
        self.store.publish_status(batch_id)
