"""Targets execute operations: one small interface, one module per kind."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.engine import Connection

from batchops.schemas import ItemResult, PlannedOperation

__all__ = ["ChunkContext", "Target"]


@dataclass(frozen=True)
class ChunkContext:
    """What a target may use while executing one chunk.

    ``concurrency`` is this chunk's share of the batch's concurrency (the flow splits it across
    the chunks it runs in parallel); ``batch_concurrency`` is the batch's whole concurrency, for
    a target that pools the requests of all the batch's chunks running in this process (the
    http target does), or ``None`` when the caller does not know it.
    ``store_connection`` is the chunk's open transaction on the store database: a sql target on
    the same database writes through it, so the rows and the recorded results commit together.
    """

    batch_id: str
    concurrency: int
    store_connection: Connection | None = None
    batch_concurrency: int | None = None


class Target(Protocol):
    name: str

    async def execute(self, items: Sequence[PlannedOperation],
                      ctx: ChunkContext) -> list[ItemResult]:
        """Run ``items`` (in batch order where it matters); one result per item, in order.

        Item failures are results. Raise only when the chunk cannot be executed at all
        (e.g. :class:`batchops.errors.TransientError` on a lost connection).
        """
        ...
