"""Item checkpoints and the chunk heartbeat, written by one thread per running chunk.

Targets report each item's result as soon as it is known (``ChunkContext.on_item_done``,
from whatever thread or loop they run on). The writer commits them in groups, one
transaction at a time (group commit: what arrives within ``BATCHOPS_CHECKPOINT_LINGER_SECONDS``
of the first): the items' checkpoints, the idempotency records of keyed
successes, and the release of their claims, so a batch waiting for one of these keys can
replay it at once. While the chunk runs it also beats the batch's heartbeat, which the reaper
watches: once a period (``BATCHOPS_HEARTBEAT_SECONDS``), with the checkpoints when they flow,
not with every group of them (the batch's row is the one row all its writers would update);
and it reads the batch's status every :data:`CANCEL_POLL_SECONDS`, so the chunk starts no
item more than about that long after the batch was cancelled (:meth:`CheckpointWriter.cancelled`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import timedelta
from types import TracebackType

from batchops.runtime import Runtime
from batchops.schemas import BatchState, ItemResult, ItemState, PlannedOperation

__all__ = ["CANCEL_POLL_SECONDS", "CheckpointWriter"]

CANCEL_POLL_SECONDS = 0.5  # a running chunk reads its batch's status this often

logger = logging.getLogger("batchops.checkpoints")

_STOP = object()
_MAX_GROUP = 2_000  # item results committed in one transaction at most


class CheckpointWriter:
    """Use as a context manager around a chunk's execution; :meth:`put` is thread-safe."""

    def __init__(self, runtime: Runtime, batch_id: str, generation: int, scope: str) -> None:
        self.runtime = runtime
        self.batch_id = batch_id
        self.generation = generation
        self.scope = scope
        self._queue: queue.Queue[object] = queue.Queue()
        self._beaten_at = -float("inf")  # time.monotonic() of the last heartbeat written
        self._looked_at = time.monotonic()  # the chunk task has just read the status
        self._cancelled = threading.Event()
        self._ending = threading.Event()  # the chunk has ended: no more lingering
        self._thread = threading.Thread(target=self._run, name=f"checkpoints-{batch_id}",
                                        daemon=True)

    def put(self, op: PlannedOperation, result: ItemResult) -> None:
        self._queue.put((op, result))

    def cancelled(self) -> bool:
        """Whether the batch was cancelled, as of its last status reading (at most
        :data:`CANCEL_POLL_SECONDS` ago)."""
        return self._cancelled.is_set()

    def __enter__(self) -> CheckpointWriter:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._ending.set()
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=CANCEL_POLL_SECONDS)
            except queue.Empty:
                pass
            else:
                items = self._gather(first)
                stopping = any(item is _STOP for item in items)
                entries = [item for item in items if item is not _STOP]
                if entries:
                    self._write(entries)  # type: ignore[arg-type]
            if not stopping:
                self._watch()

    def _watch(self) -> None:
        """The heartbeat when one is due (checkpoints carry it while they flow); the batch's
        status every :data:`CANCEL_POLL_SECONDS`."""
        now = time.monotonic()
        if now - self._beaten_at >= self.runtime.settings.execution.heartbeat_seconds:
            self._beat()
        if not self._cancelled.is_set() and now - self._looked_at >= CANCEL_POLL_SECONDS:
            self._looked_at = now
            try:
                status = self.runtime.store.batch_status(self.batch_id)
            except Exception as exc:  # the next reading may work; the chunk goes on meanwhile
                logger.debug("batch %s: status not read: %s", self.batch_id, exc)
                return
            if status == BatchState.CANCELLED.value:
                logger.info("batch %s was cancelled: its chunk starts no more items",
                            self.batch_id)
                self._cancelled.set()

    def _gather(self, first: object) -> list[object]:
        """``first`` and what else arrives within the linger time (or has queued up): one
        commit for many items instead of one for every item or two. The chunk's end does not
        wait for the linger.

        The linger is waited out once, then the queue drained: a ``get`` per item would wake
        this thread for every item, each time taking the GIL from the thread that sends the
        chunk's requests."""
        items = [first]
        if first is not _STOP:
            self._ending.wait(self.runtime.settings.execution.checkpoint_linger_seconds)
        while items[-1] is not _STOP and len(items) < _MAX_GROUP:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _beat(self) -> None:
        # Tried once a period, written or not (a store refusing writes is not asked 20 times a
        # second).
        self._beaten_at = time.monotonic()
        try:
            self.runtime.store.checkpoints.heartbeat(self.batch_id)
        except Exception as exc:  # a missed beat is not fatal; the next one may work
            logger.warning("batch %s: heartbeat not written: %s", self.batch_id, exc)

    def _write(self, entries: list[tuple[PlannedOperation, ItemResult]]) -> None:
        store = self.runtime.store
        retention = timedelta(hours=self.runtime.settings.recovery.idempotency_retention_hours)
        keyed = [(op, r) for op, r in entries if op.idempotency_key is not None]
        remember = [(op, r) for op, r in keyed
                    if r.state is ItemState.SUCCEEDED and not r.replayed]
        now = time.monotonic()
        beat = now - self._beaten_at >= self.runtime.settings.execution.heartbeat_seconds
        try:
            with store.engine.begin() as conn:
                store.checkpoints.save(conn, self.batch_id, self.generation,
                                       [r for _, r in entries])
                store.idempotency.save(conn, self.scope, self.batch_id, remember, retention)
                store.idempotency.release(conn, self.scope, self.batch_id,
                                          [op.idempotency_key for op, _ in keyed
                                           if op.idempotency_key is not None])
                if beat:
                    store.checkpoints.heartbeat_in(conn, self.batch_id)
            if beat:
                self._beaten_at = now
        except Exception as exc:
            # Checkpoints are an optimisation of recovery: the chunk's own record (written
            # after it) is what counts, so a failed checkpoint write only loses that benefit.
            logger.warning("batch %s: %d item checkpoint(s) not written: %s", self.batch_id,
                           len(entries), exc)
