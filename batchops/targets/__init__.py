"""Targets execute operations: one small interface, one module per kind."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Protocol

from sqlalchemy.engine import Connection

from batchops.schemas import ItemResult, PlannedOperation

__all__ = ["CANCELLED_STATUS", "DEADLINE_STATUS", "ChunkContext", "Target", "batch_cancelled",
           "deadline_exceeded"]

# An item the batch's deadline left unstarted: 504, as gRPC's DEADLINE_EXCEEDED maps to HTTP.
DEADLINE_STATUS = 504
# An item not started because its batch was cancelled: 499, as gRPC's CANCELLED maps to HTTP.
CANCELLED_STATUS = 499


@dataclass(frozen=True)
class ChunkContext:
    """What a target may use while executing one chunk.

    ``concurrency`` is this chunk's share of the batch's concurrency (the flow splits it across
    the chunks it runs in parallel); ``batch_concurrency`` is the batch's whole concurrency, for
    a target that pools the requests of all the batch's chunks running in this process (the
    http target does), or ``None`` when the caller does not know it.
    ``store_connection`` is the chunk's open transaction on the store database: a sql target on
    the same database writes through it, so the rows and the recorded results commit together.
    ``on_item_done`` is called (from any thread) with each item's final result as soon as it
    is known, so a crash loses at most the items in flight (checkpoints).
    ``deadline`` is the batch's: a target starts no item once it has passed (items already
    started finish), answering :func:`deadline_exceeded` for the rest.
    ``cancelled`` says whether the batch has been cancelled (a cheap call: the chunk's
    checkpoint writer reads the batch's status twice a second); once it has, a target starts
    no item, answering :func:`batch_cancelled` for the rest. Targets ask :meth:`stopped`
    before each item.
    """

    batch_id: str
    concurrency: int
    store_connection: Connection | None = None
    batch_concurrency: int | None = None
    on_item_done: Callable[[PlannedOperation, ItemResult], None] | None = None
    deadline: datetime | None = None
    cancelled: Callable[[], bool] | None = None

    def item_done(self, op: PlannedOperation, result: ItemResult) -> ItemResult:
        if self.on_item_done is not None:
            self.on_item_done(op, result)
        return result

    def deadline_passed(self) -> bool:
        return self.deadline is not None and datetime.now(UTC) >= self.deadline

    def stopped(self) -> Callable[[PlannedOperation], ItemResult] | None:
        """``None`` while items may start; once none may (the batch was cancelled, its
        deadline passed), what to answer for each item left instead of running it."""
        if self.cancelled is not None and self.cancelled():
            return batch_cancelled
        if self.deadline_passed():
            return partial(deadline_exceeded, deadline=self.deadline)
        return None


def deadline_exceeded(op: PlannedOperation, deadline: datetime | None) -> ItemResult:
    """The result of an item not started because the batch's deadline had passed."""
    when = f" ({deadline.isoformat()})" if deadline is not None else ""
    return ItemResult.skip(op, DEADLINE_STATUS, "deadline_exceeded",
                           f"the batch's deadline{when} passed before this item started")


def batch_cancelled(op: PlannedOperation) -> ItemResult:
    """The result of an item not started because its batch was cancelled."""
    return ItemResult.skip(op, CANCELLED_STATUS, "cancelled",
                           "not started: the batch was cancelled")


class Target(Protocol):
    name: str

    async def execute(self, items: Sequence[PlannedOperation],
                      ctx: ChunkContext) -> list[ItemResult]:
        """Run ``items`` (in batch order where it matters); one result per item, in order.

        Item failures are results. Raise only when the chunk cannot be executed at all
        (e.g. :class:`batchops.errors.TransientError` on a lost connection).
        """
        ...
