"""Executing one chunk: resume, idempotency, targets, record — plain code, no Prefect.

Everything a chunk records (item rows, counters, checkpoint, idempotency records) commits in
one transaction, together with the sql target's writes when the target is the store's
database. A chunk that is already recorded is not executed again: its recorded results are returned.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from itertools import groupby

from pydantic import BaseModel
from sqlalchemy.engine import Connection

from batchops.routing import SQL_TARGET
from batchops.runtime import Runtime
from batchops.schemas import ChunkRef, ItemResult, ItemState, PlannedOperation
from batchops.store import IdempotencyRecord
from batchops.targets import ChunkContext
from batchops.targets.sql import SqlTarget

__all__ = ["ChunkOutcome", "execute_chunk"]


class ChunkOutcome(BaseModel):
    """What a chunk did; the chunk task's (cached) result."""

    chunk_index: int
    total: int
    succeeded: int
    failed: int
    executed: int  # items a target ran this time
    replayed: int  # items answered from the idempotency store
    already_recorded: int  # items a previous run had recorded
    seconds: float


def _replay_or_reject(ops: Sequence[PlannedOperation], records: dict[str, IdempotencyRecord],
                      ) -> tuple[dict[int, ItemResult], list[PlannedOperation]]:
    answered: dict[int, ItemResult] = {}
    to_run: list[PlannedOperation] = []
    keys_to_run: set[str] = set()
    for op in ops:
        key = op.idempotency_key
        rec = records.get(key) if key is not None else None
        if rec is not None:
            if rec.payload_hash == op.payload_hash:
                answered[op.index] = ItemResult(
                    id=op.id, index=op.index, status=rec.status,
                    state=ItemState.SUCCEEDED, result=rec.result,
                    replayed=True, attempts=0)
            else:
                answered[op.index] = ItemResult.fail(
                    op, 409, "idempotency_key_reused",
                    f"idempotency key {key!r} was used for a different operation")
        elif key is not None and key in keys_to_run:
            continue  # same key twice in this chunk: answered from the first one below
        else:
            if key is not None:
                keys_to_run.add(key)
            to_run.append(op)
    return answered, to_run


async def _run_targets(runtime: Runtime, ops: Sequence[PlannedOperation],
                       ctx: ChunkContext) -> list[ItemResult]:
    """Consecutive operations of one target go together; targets run in batch order."""
    results: list[ItemResult] = []
    for target_name, group in groupby(ops, key=lambda op: op.target):
        results += await runtime.targets[target_name].execute(list(group), ctx)
    return results


def _is_atomic(runtime: Runtime, ops: Sequence[PlannedOperation]) -> bool:
    """True when every operation writes to the store's own database through the sql target."""
    sql = runtime.targets[SQL_TARGET]
    return all(op.target == SQL_TARGET and isinstance(sql, SqlTarget)
               and sql.database_url(op) == runtime.store.url for op in ops)


async def execute_chunk(runtime: Runtime, ref: ChunkRef, *, concurrency: int,
                        scope: str, batch_concurrency: int | None = None) -> ChunkOutcome:
    """Run the chunk's items and record their results, unless the chunk is recorded already.

    When all of the chunk's operations go to the store's database, execution and recording
    share one transaction (and the chunk row is locked for it): a crash leaves no trace, and a
    second run of the same chunk waits and then finds it recorded. Otherwise the targets run
    first (no store transaction held while a handler or an upstream works) and the results
    are recorded after. ``batch_concurrency`` (the batch's whole concurrency) goes to the
    targets in :class:`ChunkContext`.
    """
    started = time.perf_counter()
    store = runtime.store
    ops = store.chunk_operations(ref.batch_id, ref.chunk_index)
    atomic = _is_atomic(runtime, ops)
    executed: list[ItemResult] = []
    with store.engine.begin() as conn:
        store.lock_chunk(conn, ref)
        done, recorded = store.recorded_results(conn, ref)
        if done:
            return _outcome(ref, recorded, executed=[], already=len(recorded), started=started)
        # A chunk reopened by a retry keeps its successes and runs the rest again.
        kept = {r.index: r for r in recorded if r.state is ItemState.SUCCEEDED}
        todo = [op for op in ops if op.index not in kept]
        keys = [op.idempotency_key for op in todo if op.idempotency_key is not None]
        answered, to_run = _replay_or_reject(todo, store.idempotency_lookup(conn, scope, keys))
        if atomic:
            ctx = ChunkContext(ref.batch_id, concurrency, store_connection=conn,
                               batch_concurrency=batch_concurrency)
            executed = await _run_targets(runtime, to_run, ctx) if to_run else []
            results = _record(runtime, conn, ref, scope, todo, to_run, answered, executed, kept)
    if not atomic:
        ctx = ChunkContext(ref.batch_id, concurrency, batch_concurrency=batch_concurrency)
        executed = await _run_targets(runtime, to_run, ctx) if to_run else []
        with store.engine.begin() as conn:
            results = _record(runtime, conn, ref, scope, todo, to_run, answered, executed, kept)
    return _outcome(ref, results, executed=executed, already=len(kept), started=started)


def _outcome(ref: ChunkRef, results: Sequence[ItemResult], *, executed: Sequence[ItemResult],
             already: int, started: float) -> ChunkOutcome:
    succeeded = sum(1 for r in results if r.state is ItemState.SUCCEEDED)
    return ChunkOutcome(
        chunk_index=ref.chunk_index, total=len(results), succeeded=succeeded,
        failed=len(results) - succeeded, executed=len(executed),
        replayed=sum(1 for r in results if r.replayed), already_recorded=already,
        seconds=round(time.perf_counter() - started, 4),
    )


def _record(runtime: Runtime, conn: Connection, ref: ChunkRef, scope: str,
            todo: Sequence[PlannedOperation], to_run: Sequence[PlannedOperation],
            answered: dict[int, ItemResult], executed: list[ItemResult],
            kept: dict[int, ItemResult]) -> list[ItemResult]:
    by_index = {r.index: r for r in executed}
    by_key = {op.idempotency_key: by_index[op.index] for op in to_run
              if op.idempotency_key is not None}
    for op in todo:
        if op.index in by_index or op.index in answered:
            continue
        # A repeat of a key within the chunk: the first one's outcome, replayed.
        assert op.idempotency_key is not None
        first = by_key[op.idempotency_key]
        answered[op.index] = first.model_copy(update={
            "id": op.id, "index": op.index, "replayed": True, "attempts": 0})
    new = [*executed, *answered.values()]
    results = sorted([*new, *kept.values()], key=lambda r: r.index)
    runtime.store.record_chunk(conn, ref, results, new)
    remember = [(op, by_index[op.index]) for op in to_run
                if op.idempotency_key is not None
                and by_index[op.index].state is ItemState.SUCCEEDED]
    retention = timedelta(hours=runtime.settings.idempotency_retention_hours)
    runtime.store.idempotency_save(conn, scope, ref.batch_id, remember, retention)
    return results
