"""Planning: split a validated batch into chunks and order the chunks that must be ordered.

Chunks run in parallel, so two chunks that touch the same record (or compete for the same
unique value, or share an idempotency key) must run in batch order: the later one depends on
the earlier one. A chunk also depends on the chunks holding its items' dependencies
(``depends_on``, ``$ref``). Inside a chunk, targets keep batch order themselves; a chunk whose
items depend on each other runs in waves, each item after its dependencies and after the
earlier items it must follow for record order (:func:`record_order`).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchops.resources import Resource
from batchops.routing import HTTP_TARGET, PYTHON_TARGET, SQL_TARGET
from batchops.schemas import ChunkRef, PlannedOperation
from batchops.settings import Settings

__all__ = ["ITEM_MICROSECONDS", "PAGE_ROWS", "ChunkPlan", "ChunkPlanner", "ChunkSizing",
           "chunk_operations", "record_order"]

PAGE_ROWS = 500  # rows per database statement (the sql target pages a chunk's runs by it)

# Estimated work per item by target, for sizing chunks: a set-based sql write costs tens of
# microseconds of database and Python time; an http or python item is dominated by the call
# it makes (about 20 ms at 10 in flight: 2 ms of the chunk's time per item).
# In microseconds (whole numbers: a sum of them is exact).
ITEM_MICROSECONDS: dict[str, int] = {SQL_TARGET: 200, HTTP_TARGET: 2_000, PYTHON_TARGET: 2_000}


@dataclass(frozen=True)
class ChunkSizing:
    """How many items go into one chunk (one Prefect task run).

    A task run costs the Prefect server tens of milliseconds, so a batch gets few of them: a
    chunk closes at about ``seconds`` of estimated work (:data:`ITEM_MICROSECONDS`) or at
    ``max_items``. When the batch's size is known up front, chunks are also spread so that
    there are about ``4 * threads`` of them (never under :data:`PAGE_ROWS` items). A fixed
    ``items`` (the ``chunk_size`` setting or option) overrides all of it.
    """

    seconds: float = 2.0
    max_items: int = 10_000
    threads: int = 4
    items: int | None = None

    @classmethod
    def of(cls, settings: Settings, items: int | None = None) -> ChunkSizing:
        """The configured sizing; ``items`` (a batch's own ``chunk_size``) fixes the size,
        capped by the ``chunk_size`` setting when that is set."""
        execution = settings.execution
        fixed = execution.chunk_size
        if items is not None:
            fixed = min(items, fixed if fixed is not None else execution.max_chunk_items)
        return cls(seconds=execution.chunk_seconds, max_items=execution.max_chunk_items,
                   threads=execution.chunk_workers, items=fixed)

    def limit(self, total: int | None) -> int:
        """The most items a chunk of a batch of ``total`` items (``None``: unknown) holds."""
        if self.items is not None:
            return self.items
        if total is None:
            return self.max_items
        spread = -(-total // (4 * self.threads))
        return min(self.max_items, max(PAGE_ROWS, spread))


@dataclass
class ChunkPlan:
    ref: ChunkRef
    operations: list[PlannedOperation]
    depends_on: list[int]


@dataclass
class _Touches:
    exclusive: set[tuple[Any, ...]] = field(default_factory=set)  # same key → ordered
    sets_unique: set[tuple[str, str]] = field(default_factory=set)  # (resource, column)
    frees_unique: set[tuple[str, str]] = field(default_factory=set)


def _touches(op: PlannedOperation, resources: dict[str, Resource]) -> _Touches:
    t = _Touches()
    if op.idempotency_key is not None:
        t.exclusive.add(("idem", op.idempotency_key))
    if op.target != SQL_TARGET or op.resource is None:
        # Operations on one path stay in order; a POST to a collection creates something new.
        if op.method != "POST":
            t.exclusive.add(("path", op.target, op.path.split("?", 1)[0]))
        return t
    res = resources[op.resource]
    pk = op.params.get(res.primary_key)
    if pk is None and op.body and op.body.get(res.primary_key) is not None:
        pk = str(op.body[res.primary_key])
    if pk is not None:
        t.exclusive.add(("rec", op.resource, pk))
    for col in res.unique_columns:
        sets = op.body is not None and op.body.get(col) is not None
        if sets:
            t.exclusive.add(("uval", op.resource, col, str(op.body[col])))  # type: ignore[index]
            t.sets_unique.add((op.resource, col))
        # Deleting or rewriting a row can free its unique values for a later operation.
        if op.method == "DELETE" or (op.method in ("PUT", "PATCH") and sets):
            t.frees_unique.add((op.resource, col))
    return t


class _Order:
    """The ordering rules, for chunks (by chunk index) or items (by item index): what a unit
    must follow, given what it touches, and what it leaves for later units."""

    def __init__(self) -> None:
        self._last: dict[tuple[Any, ...], int] = {}
        self._last_free: dict[tuple[str, str], int] = {}
        self._setters_since_free: dict[tuple[str, str], set[int]] = {}

    def before(self, t: _Touches) -> set[int]:
        """The earlier units that one touching ``t`` must run after: the last to touch the
        same record, unique value or idempotency key; the last to free a unique value it
        sets; and, when it frees values, the ones that set them since they were last freed."""
        found = {self._last[k] for k in t.exclusive if k in self._last}
        for rc in t.sets_unique:
            if rc in self._last_free:
                found.add(self._last_free[rc])
        for rc in t.frees_unique:
            found.update(self._setters_since_free.get(rc, ()))
            if rc in self._last_free:
                found.add(self._last_free[rc])
        return found

    def record(self, t: _Touches, at: int) -> None:
        for k in t.exclusive:
            self._last[k] = at
        for rc in t.sets_unique:
            self._setters_since_free.setdefault(rc, set()).add(at)
        for rc in t.frees_unique:
            self._last_free[rc] = at
            self._setters_since_free[rc] = set()


class ChunkPlanner:
    """Feeds operations in batch order, yields chunks with their dependencies."""

    def __init__(self, batch_id: str, sizing: ChunkSizing, resources: dict[str, Resource],
                 total: int | None = None) -> None:
        self.batch_id = batch_id
        self.chunk_size = sizing.limit(total)
        self.budget = None if sizing.items is not None else round(sizing.seconds * 1e6)
        self.resources = resources
        self._current: list[PlannedOperation] = []
        self._work = 0
        self._chunk_index = 0
        self._order = _Order()
        self._chunk_starts: list[int] = []  # first item index of every chunk closed so far

    def add(self, op: PlannedOperation) -> ChunkPlan | None:
        self._current.append(op)
        self._work += ITEM_MICROSECONDS.get(op.target, ITEM_MICROSECONDS[PYTHON_TARGET])
        if len(self._current) >= self.chunk_size or (
                self.budget is not None and self._work >= self.budget):
            return self._close()
        return None

    def finish(self) -> ChunkPlan | None:
        return self._close() if self._current else None

    def _close(self) -> ChunkPlan:
        ops, self._current, self._work = self._current, [], 0
        index = self._chunk_index
        self._chunk_index += 1
        deps: set[int] = set()
        touches = [_touches(op, self.resources) for op in ops]
        for t in touches:
            deps |= self._order.before(t)
        for t in touches:
            self._order.record(t, index)
        for op in ops:
            for dep in op.depends_on:
                if dep < ops[0].index:  # in an earlier chunk: the one whose range holds it
                    deps.add(bisect.bisect_right(self._chunk_starts, dep) - 1)
        self._chunk_starts.append(ops[0].index)
        deps.discard(index)
        # The batch id is part of the cache key too; unkeyed items are named by position.
        keys = "\n".join(op.idempotency_key or f"#{op.index}" for op in ops)
        token = hashlib.sha256(keys.encode()).hexdigest()
        ref = ChunkRef(batch_id=self.batch_id, chunk_index=index, start=ops[0].index,
                       end=ops[-1].index + 1, cache_token=token)
        return ChunkPlan(ref, ops, sorted(deps))


def record_order(ops: Sequence[PlannedOperation],
                 resources: dict[str, Resource]) -> dict[int, set[int]]:
    """For each item of a chunk, the earlier items of it that it must run after.

    The same rules that order chunks, item by item: the same record, unique value or
    idempotency key, and unique values freed by a delete or a rewrite.
    """
    order = _Order()
    after: dict[int, set[int]] = {}
    for op in ops:
        t = _touches(op, resources)
        after[op.index] = order.before(t)
        order.record(t, op.index)
    return after


def chunk_operations(batch_id: str, operations: Sequence[PlannedOperation], sizing: ChunkSizing,
                     resources: dict[str, Resource]) -> Iterator[ChunkPlan]:
    """Split operations (in batch order) into chunks sized by ``sizing``."""
    planner = ChunkPlanner(batch_id, sizing, resources, total=len(operations))
    for op in operations:
        plan = planner.add(op)
        if plan is not None:
            yield plan
    last = planner.finish()
    if last is not None:
        yield last
