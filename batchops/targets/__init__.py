"""Targets execute operations: one small interface, one module per kind."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.engine import Connection

from batchops.schemas import ItemResult, PlannedOperation

__all__ = ["ChunkContext", "Target"]


@dataclass(frozen=True)
class ChunkContext:
    """What a target may use while executing one chunk.

    ``store_connection`` is the chunk's open transaction on the store database: a sql target on
    the same database writes through it, so the rows and the recorded results commit together.
    ``on_item_done`` is called (from any thread) with each item's final result as soon as it
    is known, so a crash loses at most the items in flight (checkpoints).
    """

    batch_id: str
    concurrency: int
    store_connection: Connection | None = None
    on_item_done: Callable[[PlannedOperation, ItemResult], None] | None = None

    def item_done(self, op: PlannedOperation, result: ItemResult) -> ItemResult:
        if self.on_item_done is not None:
            self.on_item_done(op, result)
        return result


class Target(Protocol):
    name: str

    async def execute(self, items: Sequence[PlannedOperation],
                      ctx: ChunkContext) -> list[ItemResult]:
        """Run ``items`` (in batch order where it matters); one result per item, in order.

        Item failures are results. Raise only when the chunk cannot be executed at all
        (e.g. :class:`batchops.errors.TransientError` on a lost connection).
        """
        ...
