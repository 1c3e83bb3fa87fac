"""Executing one chunk: resume, idempotency, targets, record — plain code, no Prefect.

Everything a chunk records (item rows, counters, checkpoint, idempotency records, dead
letters) commits in one transaction, together with the sql target's writes when the target is
the store's database. A chunk that is already recorded is not executed again: its recorded
results are returned.

Cancel and deadline: once the batch has been cancelled (a running chunk learns it within
half a second, see :mod:`batchops.checkpoints`) or its deadline has passed, no item starts;
the rest of the chunk is recorded ``skipped`` (``cancelled``, ``deadline_exceeded``). Items
already started finish and keep their results. A chunk can also be *settled*: recorded
without running anything (:func:`settle_chunks`), its items that have no outcome yet getting
the result given for them — the chunks of a cancelled batch that never started, or of a chunk
that could not be executed. Dependencies: a chunk whose items have
``depends_on`` runs in waves — an item runs once its dependencies have results (in this chunk
or, recorded, in earlier ones) and the earlier items it must follow for record order have
run; the items of one wave run together through their targets. An item whose dependency did
not succeed fails with ``dependency_failed`` (424) without running; its ``$ref`` values are
resolved from the dependencies' results right before it runs. Chunks without dependencies
take the plain path: all their items through the targets at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from itertools import groupby

from pydantic import BaseModel
from sqlalchemy.engine import Connection

from batchops.checkpoints import CheckpointWriter
from batchops.dead_letters import record_dead_letters
from batchops.idempotency import IdempotencyRecord
from batchops.planning import record_order
from batchops.references import UnresolvedReference, find_references, resolve_body
from batchops.routing import SQL_TARGET
from batchops.runtime import Runtime
from batchops.schemas import ChunkRef, ItemResult, ItemState, Operation, PlannedOperation
from batchops.targets import ChunkContext, batch_cancelled, deadline_exceeded
from batchops.targets.sql import SqlTarget
from batchops.validation import OperationValidator

__all__ = ["ChunkOutcome", "chunk_not_run", "execute_chunk", "settle_chunks"]

CLAIM_POLL_SECONDS = 0.1  # how often a batch waiting for another's idempotency key looks


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
        items = list(group)
        if (stop := ctx.stopped()) is not None:
            results += [stop(op) for op in items]
        else:
            results += await runtime.targets[target_name].execute(items, ctx)
    return results


def _not_run(op: PlannedOperation, status: int, code: str, message: str) -> ItemResult:
    return ItemResult.fail(op, status, code, message).model_copy(update={"attempts": 0})


def _resolved(runtime: Runtime, op: PlannedOperation,
              deps: Sequence[ItemResult]) -> PlannedOperation | ItemResult:
    """``op`` with its ``$ref`` values replaced (and checked again), or why it cannot run."""
    if not op.body or next(find_references(op.body), None) is None:
        return op
    try:
        body = resolve_body(op.body, {r.id: r.result for r in deps if r.id is not None})
    except UnresolvedReference as exc:
        return _not_run(op, 422, "ref_unresolved", str(exc))
    check = OperationValidator(runtime.router, 1)
    if check.check(Operation(method=op.method, path=op.path, body=body,
                             headers=op.headers), op.index) is None:
        problems = "; ".join(f"{e.field}: {e.message}" for e in check.errors)
        return _not_run(op, 422, "invalid_value", f"after resolving $ref: {problems}")
    return op.model_copy(update={"body": body})


async def _run_waves(runtime: Runtime, ops: Sequence[PlannedOperation], ctx: ChunkContext,
                     known: Mapping[int, ItemResult], alias: Mapping[int, int],
                     ) -> list[ItemResult]:
    """Run items after their dependencies: wave by wave, each wave's items together.

    ``known``: results the chunk has before running (other chunks', kept, replayed);
    ``alias``: an item answered from another one of this chunk (a repeated key) → that one.
    """
    after = record_order(ops, runtime.resources)
    running = {op.index for op in ops}
    done: dict[int, ItemResult] = {}

    def result_of(index: int) -> ItemResult | None:
        index = alias.get(index, index)
        return done.get(index) or known.get(index)

    pending = list(ops)
    while pending:
        if (stop := ctx.stopped()) is not None:
            done.update((op.index, stop(op)) for op in pending)
            break
        wave: list[PlannedOperation] = []
        waiting: list[PlannedOperation] = []
        for op in pending:  # in batch order: a dependency is decided before its dependents
            before = {alias.get(i, i) for i in op.depends_on} | after[op.index]
            if any(i in running and i not in done for i in before):
                waiting.append(op)
                continue
            deps = [(i, result_of(i)) for i in op.depends_on]
            unmet = [(i, r) for i, r in deps if r is None or r.state is not ItemState.SUCCEEDED]
            skipped = [r for _, r in unmet if r is not None and r.state is ItemState.SKIPPED]
            if skipped:  # not started, for the reason its dependency was not
                cancelled = skipped[0].error is not None and skipped[0].error.code == "cancelled"
                done[op.index] = (batch_cancelled(op) if cancelled
                                  else deadline_exceeded(op, ctx.deadline))
            elif unmet:
                names = ", ".join(repr(r.id) if r is not None and r.id else f"#{i}"
                                  for i, r in unmet)
                done[op.index] = _not_run(op, 424, "dependency_failed",
                                          f"not run: its dependency {names} did not succeed")
            else:
                ready = _resolved(runtime, op, [r for _, r in deps if r is not None])
                if isinstance(ready, ItemResult):
                    done[op.index] = ready
                else:
                    wave.append(ready)
        if wave:
            done.update((r.index, r) for r in await _run_targets(runtime, wave, ctx))
        pending = waiting
    return [done[op.index] for op in ops]


def _known_results(runtime: Runtime, conn: Connection, ref: ChunkRef,
                   ops: Sequence[PlannedOperation], settled: Mapping[int, ItemResult],
                   alias: Mapping[int, int]) -> dict[int, ItemResult]:
    """The results ``ops``' dependencies already have: ``settled`` and other chunks' ones."""
    wanted = {i for op in ops for i in op.depends_on}
    if not wanted:
        return dict(settled)
    outside = wanted - settled.keys() - {op.index for op in ops} - alias.keys()
    return {**runtime.store.results.of_items(conn, ref.batch_id, outside), **settled}


async def _run_items(runtime: Runtime, ops: Sequence[PlannedOperation], ctx: ChunkContext,
                     known: Mapping[int, ItemResult], alias: Mapping[int, int],
                     ) -> list[ItemResult]:
    """Results of ``ops``: the plain path when none has dependencies, else in waves."""
    if not ops:
        return []
    if not any(op.depends_on for op in ops):
        return await _run_targets(runtime, ops, ctx)
    return await _run_waves(runtime, ops, ctx, known, alias)


def _is_atomic(runtime: Runtime, ops: Sequence[PlannedOperation]) -> bool:
    """True when every operation writes to the store's own database through the sql target."""
    sql = runtime.targets[SQL_TARGET]
    return all(op.target == SQL_TARGET and isinstance(sql, SqlTarget)
               and sql.database_url(op) == runtime.store.url for op in ops)


async def execute_chunk(runtime: Runtime, ref: ChunkRef, *, concurrency: int,
                        scope: str, generation: int = 0,
                        deadline: datetime | None = None,
                        batch_concurrency: int | None = None,
                        settle_with: Callable[[PlannedOperation], ItemResult] | None = None,
                        ) -> ChunkOutcome:
    """Run the chunk's items and record their results, unless the chunk is recorded already.

    No item starts once ``deadline`` has passed or the batch has been cancelled: those left
    are recorded ``skipped``.

    With ``settle_with`` nothing runs: items keep the outcomes they have (kept from an
    earlier run, checkpointed by a run that died, answered by their idempotency key), the
    others get ``settle_with(op)``, and the chunk is recorded in the transaction that locks it.

    When all of the chunk's operations go to the store's database, execution and recording
    share one transaction (and the chunk row is locked for it): a crash leaves no trace, and a
    second run of the same chunk waits and then finds it recorded. Otherwise the targets run
    first (no store transaction held while a handler or an upstream works) and the results
    are recorded after; meanwhile each item's outcome is checkpointed as it comes, so a run
    resuming after a crash executes only what was in flight, and each idempotency key is
    claimed first, so a key another batch is executing is waited for and replayed, never
    sent twice.
    ``batch_concurrency`` (the batch's whole concurrency) goes to the targets in
    :class:`ChunkContext`.
    """
    started = time.perf_counter()
    store = runtime.store
    executed: list[ItemResult] = []
    with store.engine.begin() as conn:
        ops, done, recorded = store.chunks.open(conn, ref)
        if done:
            return _outcome(ref, recorded, executed=[], already=len(recorded), started=started)
        atomic = _is_atomic(runtime, ops)
        # A chunk reopened by a retry keeps its successes and runs the rest again.
        kept = {r.index: r for r in recorded if r.state is ItemState.SUCCEEDED}
        todo = [op for op in ops if op.index not in kept]
        keys = [op.idempotency_key for op in todo if op.idempotency_key is not None]
        if atomic:
            # Two chunks with one key: the second waits here, then replays the first's record.
            store.idempotency.lock_keys(conn, scope, keys)
            checkpointed: dict[int, ItemResult] = {}
        else:
            checkpointed = store.checkpoints.of_items(conn, ref.batch_id, generation,
                                                      [op.index for op in todo])
        answered, to_run = _replay_or_reject(
            [op for op in todo if op.index not in checkpointed],
            store.idempotency.lookup(conn, scope, keys))
        answered.update(checkpointed)
        settled = {**kept, **answered}
        alias = _repeated_keys(todo, to_run, answered)
        if settle_with is not None:
            executed = [settle_with(op) for op in to_run]
            results = _record(runtime, conn, ref, scope, todo, to_run, answered, executed, kept,
                              rerun=bool(recorded))
            store.idempotency.release(conn, scope, ref.batch_id, [
                op.idempotency_key for op in to_run if op.idempotency_key is not None])
            store.checkpoints.drop(conn, ref, generation)
        elif atomic:
            ctx = ChunkContext(ref.batch_id, concurrency, store_connection=conn,
                               deadline=deadline, batch_concurrency=batch_concurrency)
            known = _known_results(runtime, conn, ref, to_run, settled, alias)
            executed = await _run_items(runtime, to_run, ctx, known, alias)
            results = _record(runtime, conn, ref, scope, todo, to_run, answered, executed, kept,
                              rerun=bool(recorded))
    if not atomic and settle_with is None:
        with store.read() as read:
            known = _known_results(runtime, read, ref, to_run, settled, alias)
        with CheckpointWriter(runtime, ref.batch_id, generation, scope) as writer:
            ctx = ChunkContext(ref.batch_id, concurrency, deadline=deadline,
                               on_item_done=writer.put, batch_concurrency=batch_concurrency,
                               cancelled=writer.cancelled)
            executed = await _run_claimed(
                runtime, ref.batch_id, scope, to_run, ctx,
                lambda ops: _run_items(runtime, ops, ctx, known, alias))
        with store.engine.begin() as conn:
            results = _record(runtime, conn, ref, scope, todo, to_run, answered, executed, kept,
                              rerun=bool(recorded))
            store.idempotency.release(conn, scope, ref.batch_id, [
                op.idempotency_key for op in to_run if op.idempotency_key is not None])
            store.checkpoints.drop(conn, ref, generation)
    store.publish_status(ref.batch_id)  # committed: the Redis snapshot may move
    return _outcome(ref, results, executed=[r for r in executed if r.attempts],
                    already=len(kept), started=started)


def chunk_not_run(reason: str) -> Callable[[PlannedOperation], ItemResult]:
    """The result of each item of a chunk that could not be executed (``reason``), for
    :func:`settle_chunks`: failed, ``chunk_failed``; a retry of the batch runs it again."""
    def result(op: PlannedOperation) -> ItemResult:
        return _not_run(op, 500, "chunk_failed",
                        f"not run, or its outcome was not recorded: its chunk could not be "
                        f"executed ({reason}); a retry of the batch runs it again")

    return result


async def settle_chunks(runtime: Runtime, batch_id: str,
                        not_run: Callable[[PlannedOperation], ItemResult],
                        refs: Sequence[ChunkRef] | None = None) -> None:
    """Record the batch's chunks ``refs`` (default: every chunk without results) without
    running anything: each item that has no outcome yet gets ``not_run(op)``; the outcomes
    a run that died had checkpointed, and items answered by their idempotency keys, are
    recorded as they are. A chunk recorded meanwhile is left as it is."""
    batch = runtime.store.get_batch(batch_id)
    for ref in runtime.store.chunks.unrecorded(batch_id) if refs is None else refs:
        await execute_chunk(runtime, ref, concurrency=1, scope=batch.scope,
                            generation=batch.generation, settle_with=not_run)


async def _run_claimed(runtime: Runtime, batch_id: str, scope: str,
                       ops: Sequence[PlannedOperation], ctx: ChunkContext,
                       run: Callable[[Sequence[PlannedOperation]], Awaitable[list[ItemResult]]],
                       ) -> list[ItemResult]:
    """Execute (``run``) the ``ops`` whose keys this batch could claim; wait for the keys other
    batches are executing and replay their results (or run them, if the other batch failed
    them)."""
    store = runtime.store
    stale_after = timedelta(seconds=runtime.settings.recovery.stale_after_seconds)
    results: list[ItemResult] = []
    pending = list(ops)
    first = True
    while pending:
        if not first and (stop := ctx.stopped()) is not None:
            # Cancelled (or past the deadline) while waiting for keys other batches hold.
            results += [stop(op) for op in pending]
            break
        if not first:
            await asyncio.sleep(CLAIM_POLL_SECONDS)
            keys = [op.idempotency_key for op in pending if op.idempotency_key is not None]
            with store.read() as conn:
                answered, pending = _replay_or_reject(
                    pending, store.idempotency.lookup(conn, scope, keys))
            results += [ctx.item_done(op, answered[op.index]) for op in ops
                        if op.index in answered]
            if not pending:
                break
        first = False
        # Free keys, keys this batch held before a crash, and keys of dead holders are ours.
        claims = store.idempotency.claim(scope, batch_id, pending, stale_after)
        runnable = [op for op in pending
                    if op.idempotency_key is None or op.idempotency_key in claims.mine]
        if claims.mine:
            # A key its holder finished (and released) since this chunk looked is replayed.
            with store.engine.begin() as conn:
                answered, runnable = _replay_or_reject(runnable, store.idempotency.lookup(
                    conn, scope, list(claims.mine)))
                store.idempotency.release(conn, scope, batch_id, [
                    op.idempotency_key for op in pending
                    if op.index in answered and op.idempotency_key is not None])
            results += [ctx.item_done(op, answered[op.index]) for op in pending
                        if op.index in answered]
        if runnable:
            results += await run(runnable)
        pending = [op for op in pending if op.idempotency_key in claims.busy]
    return sorted(results, key=lambda r: r.index)


def _repeated_keys(todo: Sequence[PlannedOperation], to_run: Sequence[PlannedOperation],
                   answered: Mapping[int, ItemResult]) -> dict[int, int]:
    """Items answered from the first item of the chunk with the same idempotency key → it."""
    first = {op.idempotency_key: op.index for op in to_run if op.idempotency_key is not None}
    running = {op.index for op in to_run}
    return {op.index: first[op.idempotency_key] for op in todo
            if op.index not in running and op.index not in answered
            and op.idempotency_key is not None}


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
            kept: dict[int, ItemResult], *, rerun: bool) -> list[ItemResult]:
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
    runtime.store.chunks.record(conn, ref, results, new)
    remember = [(op, by_index[op.index]) for op in to_run
                if op.idempotency_key is not None
                and by_index[op.index].state is ItemState.SUCCEEDED
                and not by_index[op.index].replayed]
    retention = timedelta(hours=runtime.settings.recovery.idempotency_retention_hours)
    runtime.store.idempotency.save(conn, scope, ref.batch_id, remember, retention)
    # Items that ran out of retries, in this run or in a run that checkpointed them before it
    # died (answered from the checkpoint, not replayed); a re-run chunk's items replace their
    # earlier ones.
    own = {**{i: r for i, r in answered.items() if not r.replayed}, **by_index}
    record_dead_letters(conn, scope, ref.batch_id,
                        [(op, own[op.index]) for op in todo if op.index in own],
                        rerun=[op.index for op in todo] if rerun else ())
    return results
