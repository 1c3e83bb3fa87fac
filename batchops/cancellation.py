"""Cancelling a batch: no item starts after it, and every item still gets a result.

A cancel (``POST /batches/{id}/cancel``, or the batch's flow run cancelled in Prefect) moves
the batch to ``cancelled`` in one conditional update (:meth:`BatchLifecycle.cancel`). Then:

* a chunk running now reads the status within half a second (its checkpoint writer) and starts
  no further item; items already started finish and keep their results, the others are
  recorded ``skipped`` with error code ``cancelled`` (status 499);
* a chunk that has not started does not start; the run's last step records its items
  ``skipped`` (``cancelled``) the same way (:func:`settle_cancelled`), the batch gets its
  ``finished_at`` and the flow run ends ``Cancelled``;
* a batch still queued has no run that would do it: the cancel records its items at once;
* a batch whose run is gone (a killed worker, a run cancelled in Prefect) is settled by the
  Prefect ``on_cancellation`` hook of ``process_batch`` or, failing that, by the reaper —
  checkpointed outcomes of the dead run are kept, the rest is ``cancelled``.

So once ``finished_at`` is set every item has its result, and a retry of the batch runs the
cancelled items (and only those, with the failed ones).
"""

from __future__ import annotations

import asyncio

from batchops.execution import settle_chunks
from batchops.runtime import Runtime
from batchops.schemas import BatchState, ItemResult, PlannedOperation
from batchops.targets import CANCELLED_STATUS, batch_cancelled

__all__ = ["cancel_batch", "settle_cancelled"]


def cancel_batch(runtime: Runtime, batch_id: str) -> None:
    """Cancel the batch (:meth:`BatchLifecycle.cancel`: :class:`BatchFinished` for one that
    completed or failed); a queued batch's items are recorded ``cancelled`` at once (no run is
    executing them), a processing batch's by its run as it stops."""
    if runtime.lifecycle.cancel(batch_id) is BatchState.QUEUED:
        settle_cancelled(runtime, batch_id)


def settle_cancelled(runtime: Runtime, batch_id: str, *, run_stopped: bool = False) -> None:
    """Give every item of a cancelled batch that has no result one (``skipped``,
    ``cancelled``), keeping the outcomes a dead run checkpointed; then its ``finished_at``.
    Only once no run executes the batch's chunks any more. ``run_stopped``: its run was
    stopped from outside (killed), so an item without a result may have run all the same."""
    asyncio.run(settle_chunks(runtime, batch_id,
                              _outcome_not_recorded if run_stopped else batch_cancelled))
    runtime.lifecycle.settle(batch_id)


def _outcome_not_recorded(op: PlannedOperation) -> ItemResult:
    return ItemResult.skip(op, CANCELLED_STATUS, "cancelled",
                           "the batch was cancelled and its run stopped before this item's "
                           "outcome was recorded (it may not have run); a retry runs it again")
