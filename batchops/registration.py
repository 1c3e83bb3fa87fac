"""Registering a batch: validate every operation, plan chunks, store them, in one transaction."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sized
from contextlib import nullcontext
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from batchops.batch_requests import BatchRequest, BatchRequests
from batchops.callbacks import CallbackRecords
from batchops.errors import EmptyBatch
from batchops.planning import ChunkPlanner, ChunkSizing
from batchops.runtime import Runtime
from batchops.validation import OperationValidator

__all__ = ["new_batch_id", "register_batch", "register_batch_once"]


def new_batch_id() -> str:
    return uuid.uuid4().hex


def register_batch(
    runtime: Runtime,
    operations: Iterable[Any],
    *,
    batch_id: str | None = None,
    concurrency: int | None = None,
    chunk_size: int | None = None,
    max_operations: int | None = None,
    scope: str = "default",
    source: str = "api",
    callback_url: str | None = None,
    status_url: str | None = None,
    deadline_seconds: float | None = None,
    conn: Connection | None = None,
    empty_message: str | None = None,
) -> tuple[str, int]:
    """Validate and store a batch; ``(batch_id, total)``.

    ``operations`` may be any iterable (a CSV reader streams through here): chunks are written
    as they fill (sized by work, :class:`~batchops.planning.ChunkSizing`; ``chunk_size`` fixes
    their size), and the transaction rolls back if any operation is invalid, raising
    :class:`~batchops.errors.ValidationFailed` with every error, or
    :class:`~batchops.errors.BatchTooLarge` past ``max_operations``.

    ``callback_url`` (checked by the caller with
    :func:`~batchops.callback_urls.check_callback_url`, and again before it is called) gets
    the batch's completion callback, which links to ``status_url``.
    With ``deadline_seconds``, no item starts later than that many seconds from now.
    Given ``conn``, the batch is written in that (caller's) transaction instead of one
    of its own. Given ``empty_message``, a batch of no operations is refused with it
    (:class:`~batchops.errors.EmptyBatch`) and nothing is stored.
    """
    settings = runtime.settings
    batch_id = batch_id or new_batch_id()
    validator = OperationValidator(runtime.router,
                                   max_operations or settings.api.max_operations)
    total = len(operations) if isinstance(operations, Sized) else None
    planner = ChunkPlanner(batch_id, ChunkSizing.of(settings, chunk_size), runtime.resources,
                           total=total)
    size = planner.chunk_size
    store = runtime.store
    transaction = store.engine.begin() if conn is None else nullcontext(conn)
    with transaction as tx:
        runtime.lifecycle.register(
            tx, batch_id, concurrency=concurrency or settings.execution.default_concurrency,
            chunk_size=size, scope=scope, source=source, deadline_seconds=deadline_seconds)
        for index, raw in enumerate(operations):
            planned = validator.check(raw, index)
            if planned is None or validator.error_count:
                continue  # keep validating to report every error; nothing will be stored
            plan = planner.add(planned)
            if plan is not None:
                store.chunks.insert(tx, plan.ref, plan.operations, plan.depends_on)
        validator.finish()
        if validator.count == 0 and empty_message is not None:
            raise EmptyBatch("operations", empty_message)
        last = planner.finish()
        if last is not None:
            store.chunks.insert(tx, last.ref, last.operations, last.depends_on)
        store.set_total(tx, batch_id, validator.count)
        if callback_url is not None:
            CallbackRecords(store).add(tx, batch_id, callback_url, status_url)
    return batch_id, validator.count


def register_batch_once(
    runtime: Runtime,
    operations: Iterable[Any],
    *,
    claims: BatchRequests,
    key: str,
    digest: str,
    mode: str,
    batch_id: str,
    scope: str = "default",
    **options: Any,
) -> BatchRequest | None:
    """Claim the batch-level ``Idempotency-Key`` and register the batch in one transaction
    (see :func:`register_batch` for ``options``); ``None`` when this request registered it,
    the earlier request of the key otherwise (nothing is stored then).

    Raises:
        IdempotencyConflict: the key was used with a different body.
    """
    try:
        with runtime.store.engine.begin() as tx:
            earlier = claims.claim(tx, scope, key, digest, batch_id, mode)
            if earlier is None:
                register_batch(runtime, operations, batch_id=batch_id, scope=scope, conn=tx,
                               **options)
            return earlier
    except sa.exc.IntegrityError:
        # A concurrent first use of the key committed while this one waited: that batch is
        # the answer (this request stored nothing).
        earlier = claims.find(scope, key, digest)
        if earlier is None:
            raise
        return earlier
