"""Submitting a batch: the use case behind ``POST /batches`` and ``batchops run``.

:func:`submit` does, in order:

1. with a batch-level idempotency key already used with the same body, nothing: the earlier
   batch is the answer (:attr:`Submitted.earlier`);
2. the caller's operations-per-minute quota is charged (when there is one);
3. every operation is validated and the batch stored (:func:`~batchops.registration.
   register_batch`), in the same transaction as the key's claim when there is a key;
4. an async batch gets its flow run of the deployment (:func:`~batchops.batch_runs.
   start_run`); a sync one is run by the caller (the API's embedded worker, the CLI's
   process).

Whatever fails on the way refunds the quota: nothing of the batch ran. :func:`choose_mode`
and :func:`sync_wait` are the rules for sync or async and for how long a sync answer waits.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from batchops import batch_runs
from batchops.batch_requests import BatchRequest, BatchRequests
from batchops.quota import OperationsQuota
from batchops.registration import new_batch_id, register_batch, register_batch_once
from batchops.runtime import Runtime
from batchops.settings import Settings

__all__ = ["Mode", "Submission", "Submitted", "choose_mode", "submit", "sync_wait"]

Mode = Literal["sync", "async"]


def choose_mode(requested: str, operations: int, settings: Settings, *,
                respond_async: bool = False) -> Mode:
    """``async`` when asked for (the batch's ``mode`` or ``Prefer: respond-async``), ``sync``
    when asked for, else ``sync`` up to ``sync_threshold`` operations and ``async`` above."""
    if respond_async or requested == "async":
        return "async"
    if requested == "sync":
        return "sync"
    return "sync" if operations <= settings.api.sync_threshold else "async"


def sync_wait(settings: Settings, preferred: float | None = None) -> float:
    """How long a sync answer waits for its batch: ``preferred`` (``Prefer: wait``) or the
    configured wait, at most ``max_sync_wait_seconds``."""
    wait = settings.api.sync_wait_seconds if preferred is None else preferred
    return min(wait, settings.api.max_sync_wait_seconds)


@dataclass(frozen=True)
class Submission:
    """How a batch is to be run, and for whom (its operations are passed beside it).

    ``idempotency_key`` with ``request_hash`` (:func:`~batchops.batch_requests.request_hash`
    of the whole request) makes the submission idempotent for ``idempotency_retention_hours``.
    """

    scope: str
    mode: Mode
    source: str = "api"
    concurrency: int | None = None
    chunk_size: int | None = None
    max_operations: int | None = None
    callback_url: str | None = None
    deadline_seconds: float | None = None
    idempotency_key: str | None = None
    request_hash: str = ""


@dataclass(frozen=True)
class Submitted:
    """What :func:`submit` did: the batch registered (``total`` operations, run ``mode``), or
    — ``earlier`` set — the batch an earlier request with the same idempotency key made
    (nothing was registered or charged)."""

    batch_id: str
    mode: Mode
    total: int = 0
    earlier: BatchRequest | None = None


def _replay(earlier: BatchRequest) -> Submitted:
    mode: Mode = "sync" if earlier.mode == "sync" else "async"
    return Submitted(earlier.batch_id, mode, earlier=earlier)


async def submit(runtime: Runtime, submission: Submission, operations: Iterable[Any], *,
                 quota: OperationsQuota | None = None,
                 status_url: Callable[[str], str] | None = None) -> Submitted:
    """Register the batch and, when async, start its flow run (see the module's steps).

    ``status_url`` gives the status URL of a batch id, for the completion callback of a batch
    with a ``callback_url`` (checked by the caller, :func:`~batchops.callback_urls.
    check_callback_url`). ``operations`` may stream (an iterable) when there is no quota to
    charge; with a quota they are counted first.

    Raises:
        QuotaExceeded, BatchExceedsQuota: the quota refuses the batch (nothing stored).
        ValidationFailed, BatchTooLarge, EmptyBatch: invalid operations (nothing stored).
        IdempotencyConflict: the key was used with a different body.
        TransientError: the async flow run could not be created (the batch is marked failed).
    """
    settings = runtime.settings
    key = submission.idempotency_key
    claims = BatchRequests(runtime.store,
                           timedelta(hours=settings.recovery.idempotency_retention_hours))
    if key is not None:
        earlier = await asyncio.to_thread(claims.find, submission.scope, key,
                                          submission.request_hash)
        if earlier is not None:
            return _replay(earlier)

    if quota is not None:
        operations = list(operations)
    count = len(operations) if isinstance(operations, list) else 0
    batch_id = new_batch_id()
    options: dict[str, Any] = {
        "batch_id": batch_id, "concurrency": submission.concurrency,
        "chunk_size": submission.chunk_size, "max_operations": submission.max_operations,
        "scope": submission.scope, "source": submission.source,
        "callback_url": submission.callback_url,
        "status_url": (status_url(batch_id) if status_url is not None
                       and submission.callback_url is not None else None),
        "deadline_seconds": submission.deadline_seconds}
    charge: str | None = None
    earlier = None
    total = 0
    try:
        if quota is not None:
            charge = await quota.charge(submission.scope, count)
        if key is None:
            _, total = await asyncio.to_thread(
                functools.partial(register_batch, runtime, operations, **options))
        else:
            earlier = await asyncio.to_thread(
                functools.partial(register_batch_once, runtime, operations, claims=claims,
                                  key=key, digest=submission.request_hash,
                                  mode=submission.mode, **options))
            total = count
        if earlier is None and submission.mode == "async":
            await asyncio.to_thread(batch_runs.start_run, runtime, batch_id)
    except BaseException:
        if quota is not None:
            await quota.refund(charge, count)  # nothing of the batch ran
        raise
    if earlier is not None:  # a concurrent first use of the key won: its batch is the answer
        if quota is not None:
            await quota.refund(charge, count)
        return _replay(earlier)
    return Submitted(batch_id, submission.mode, total)
