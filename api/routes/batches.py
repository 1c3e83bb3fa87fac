"""``/batches``: submit a batch (sync or async), read its status and its results.

``POST /batches`` reads the body (declared JSON, within the size limit), checks the envelope
and, for a ``callback_url``, its allowlist and public address (``422
callback_url_not_allowed``); chooses sync or async (``mode``, ``Prefer``), and submits the
batch (:func:`batchops.submission.submit`: idempotency key, quota, validation and storage,
the async flow run). Then a sync batch runs in this process and the answer waits for it
(``200``/``207``), or becomes ``202`` when the wait is over; an async one answers ``202``.
A replayed request (same batch ``Idempotency-Key``, same body) answers its earlier batch.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from api.body import read_json
from api.deps import QuotaDep, RunnerDep, RuntimeDep, ScopeDep
from api.responses import (
    BatchAccepted,
    BatchId,
    accepted,
    error_responses,
    item_json,
    owned_batch,
    status_url,
)
from api.runs import SyncRun
from batchops.batch_requests import request_hash
from batchops.callback_urls import check_callback_url
from batchops.callbacks import CallbackRecords
from batchops.csvio import write_results_csv
from batchops.errors import (
    BatchTooLarge,
    EmptyBatch,
    FieldError,
    TransientError,
    ValidationFailed,
)
from batchops.planning import ChunkSizing, chunk_operations
from batchops.runtime import Runtime
from batchops.schemas import (
    MAX_ITEM_INDEX,
    BatchCreate,
    BatchState,
    BatchStatus,
    BatchSummary,
    ItemResult,
    ItemState,
)
from batchops.submission import Submission, Submitted, choose_mode, submit, sync_wait
from batchops.validation import validate_operations

__all__ = ["parse_prefer", "router"]

router = APIRouter(tags=["batches"])

_CSV_PAGE = 1000
_FINAL_POLL = 0.25  # seconds between two looks at a sync batch's status (also told at once)


# -- response models (for the OpenAPI document) ------------------------------------------------


class BatchOutcome(BaseModel):
    """``200``/``207``: a sync batch's summary and every item's result."""

    batch_id: str
    status: BatchState
    summary: BatchSummary
    results: list[ItemResult]


class ResultsPage(BaseModel):
    batch_id: str
    items: list[ItemResult]
    next_after: int | None


class DryRunPlan(BaseModel):
    dry_run: Literal[True]
    total: int
    chunks: int
    mode: Literal["sync", "async"]
    by_target_method: dict[str, int]


# -- Prefer (RFC 7240) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Preferences:
    respond_async: bool = False
    wait: float | None = None


def parse_prefer(values: list[str] | None) -> Preferences:
    """``respond-async`` and ``wait=N`` from ``Prefer`` headers; other preferences ignored."""
    respond_async, wait = False, None
    for value in values or []:
        for token in value.split(","):
            name, _, raw = token.split(";", 1)[0].partition("=")
            name = name.strip().lower()
            if name == "respond-async":
                respond_async = True
            elif name == "wait":
                try:
                    seconds = float(raw.strip().strip('"'))
                except ValueError:
                    continue
                if seconds >= 0:
                    wait = seconds
    return Preferences(respond_async, wait)


# -- helpers -----------------------------------------------------------------------------------


def _status(runtime: Runtime, batch_id: str) -> BatchStatus:
    status = runtime.store.status(batch_id, ui_url=runtime.settings.prefect_ui_url)
    callback = CallbackRecords(runtime.store).get(batch_id)
    return status.model_copy(update={"callback": callback}) if callback else status


def _parse_request(raw: Any, max_operations: int) -> tuple[BatchCreate, list[Any]]:
    """The envelope (mode, concurrency, callback_url) and the raw operations.

    Operations are validated later, by the core; envelope errors are reported together with
    theirs.
    """
    if not isinstance(raw, dict):
        raise ValidationFailed([FieldError(None, None, "body",
                                           "expected a JSON object with 'operations'")])
    operations = raw.get("operations")
    if not isinstance(operations, list):
        message = "field required" if operations is None else "expected a list of operations"
        raise ValidationFailed([FieldError(None, None, "operations", message)])
    if len(operations) > max_operations:
        raise BatchTooLarge(len(operations), max_operations)
    if not operations:
        raise EmptyBatch("operations", "the batch has no operations; at least one is required")
    try:
        envelope = BatchCreate.model_validate({**raw, "operations": []})
    except ValidationError as exc:
        errors = [FieldError(None, None, ".".join(str(p) for p in e["loc"]), e["msg"])
                  for e in exc.errors(include_url=False)]
        raise ValidationFailed(errors) from None
    return envelope, operations


def _envelope_and_operation_errors(raw: Any, exc: ValidationFailed, runtime: Runtime,
                                   ) -> ValidationFailed:
    """``exc`` (envelope errors) with the operations' own errors added: every error at once."""
    operations = raw.get("operations") if isinstance(raw, dict) else None
    if not isinstance(operations, list) or not operations:
        return exc
    try:
        validate_operations(operations, runtime.router, runtime.settings.api.max_operations)
    except ValidationFailed as ops_exc:
        return ValidationFailed([*exc.errors, *ops_exc.errors])
    return exc


def _dry_run(runtime: Runtime, operations: list[Any], mode: str) -> dict[str, Any]:
    settings = runtime.settings
    planned = validate_operations(operations, runtime.router, settings.api.max_operations)
    chunks = sum(1 for _ in chunk_operations("dry-run", planned, ChunkSizing.of(settings),
                                             runtime.resources))
    by_target_method = Counter(f"{op.target} {op.method}" for op in planned)
    return {"dry_run": True, "total": len(planned), "chunks": chunks, "mode": mode,
            "by_target_method": dict(sorted(by_target_method.items()))}


def _outcome(runtime: Runtime, batch_id: str) -> tuple[int, dict[str, Any]]:
    """The final answer of a finished batch: 200 when every item succeeded, else 207."""
    status = _status(runtime, batch_id)
    results = [item_json(r) for r in runtime.store.results.of_batch(batch_id)]
    all_ok = (status.status is BatchState.COMPLETED and status.failed == 0
              and status.succeeded == status.total)
    body = {
        "batch_id": batch_id, "status": status.status.value,
        "summary": {"total": status.total, "succeeded": status.succeeded,
                    "failed": status.failed, "skipped": status.skipped},
        "results": results,
    }
    return (200 if all_ok else 207), body


async def _await_terminal(runtime: Runtime, batch_id: str, seconds: float) -> BatchState:
    """Poll the store until the batch has finished or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    delay = 0.05
    while True:
        status = (await asyncio.to_thread(runtime.store.get_batch, batch_id)).status
        state = BatchState(status)
        if state.is_final or time.monotonic() >= deadline:
            return state
        await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0.01)))
        delay = min(delay * 2, 0.5)


async def _finished(runtime: Runtime, run: SyncRun, seconds: float) -> bool:
    """Wait until the batch is final in the store or its run has ended, at most ``seconds``.

    The run's thread says so as it marks the batch final (the store tells the runner): the
    flow run still sends artifacts and its Completed state then, and the answer need not wait
    for that. The status is also read every ``_FINAL_POLL`` seconds (a cancel from elsewhere).
    """
    deadline = time.monotonic() + seconds
    while True:
        if await run.wait(min(_FINAL_POLL, max(deadline - time.monotonic(), 0))):
            return True
        batch = await asyncio.to_thread(runtime.store.get_batch, run.batch_id)
        if BatchState(batch.status).is_final:
            return True
        if time.monotonic() >= deadline:
            return False


async def _replay(request: Request, runtime: Runtime, earlier: Submitted,
                  wait: float) -> Response:
    """The answer for a repeated request: the same batch, no second run."""
    headers = {"Idempotent-Replayed": "true"}
    if earlier.mode == "sync":
        state = await _await_terminal(runtime, earlier.batch_id, wait)
        if state.is_final:
            code, body = await asyncio.to_thread(_outcome, runtime, earlier.batch_id)
            return JSONResponse(body, status_code=code, headers=headers)
    else:
        state = BatchState((await asyncio.to_thread(runtime.store.get_batch,
                                                    earlier.batch_id)).status)
    return accepted(request, earlier.batch_id, state, headers)


# -- routes ------------------------------------------------------------------------------------


_BATCH_CREATE_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BatchCreate"}}},
}


@router.post(
    "/batches",
    name="create_batch",
    summary="Submit a batch of operations",
    openapi_extra={"requestBody": _BATCH_CREATE_BODY},
    responses={
        200: {"model": BatchOutcome, "description": "sync: every item succeeded"},
        202: {"model": BatchAccepted, "description": "async, or the sync wait is over"},
        207: {"model": BatchOutcome, "description": "sync: some or all items failed"},
        **error_responses(400, 401, 409, 413, 415, 422, 429, 503),
    },
)
async def create_batch(
    request: Request,
    runtime: RuntimeDep,
    scope: ScopeDep,
    quota: QuotaDep,
    runner: RunnerDep,
    dry_run: Annotated[bool, Query(description="validate and plan only; run nothing")] = False,
    prefer: Annotated[list[str] | None, Header(
        description="RFC 7240: respond-async, wait=N (seconds)")] = None,
    idempotency_key: Annotated[str | None, Header(
        min_length=1, max_length=255,
        description="makes the whole request idempotent for 24 h")] = None,
) -> Response:
    """Validate every operation, store the batch, and run it.

    ``mode`` ``auto`` runs up to 100 operations synchronously (``200``/``207`` with every
    item's result) and larger batches asynchronously (``202`` with ``status_url``).
    ``Prefer: respond-async`` forces async; ``Prefer: wait=N`` bounds the sync wait, after
    which the answer is ``202`` and the run goes on.
    """
    settings = runtime.settings
    raw = await read_json(request, settings.api.max_body_bytes)
    try:
        envelope, operations = _parse_request(raw, settings.api.max_operations)
    except ValidationFailed as exc:
        raise await asyncio.to_thread(_envelope_and_operation_errors, raw, exc,
                                      runtime) from None
    prefs = parse_prefer(prefer)
    mode = choose_mode(envelope.mode, len(operations), settings,
                       respond_async=prefs.respond_async)
    applied = ["respond-async"] if prefs.respond_async else []
    preferred_wait = prefs.wait if mode == "sync" else None
    if preferred_wait is not None:
        applied.append(f"wait={preferred_wait:g}")
    wait = sync_wait(settings, preferred_wait)
    if envelope.callback_url is not None:  # resolves the host: off the event loop
        await asyncio.to_thread(check_callback_url, envelope.callback_url, settings)

    if dry_run:
        plan = await asyncio.to_thread(_dry_run, runtime, operations, mode)
        return JSONResponse(plan)

    submission = Submission(
        scope=scope, mode=mode, concurrency=envelope.concurrency,
        callback_url=envelope.callback_url, deadline_seconds=envelope.deadline_seconds,
        idempotency_key=idempotency_key,
        request_hash=request_hash(raw) if idempotency_key is not None else "")
    submitted = await submit(runtime, submission, operations, quota=quota,
                             status_url=lambda batch_id: status_url(request, batch_id))
    if submitted.earlier is not None:
        return await _replay(request, runtime, submitted, wait)
    batch_id = submitted.batch_id
    metrics = request.app.state.metrics
    metrics.batches_submitted.labels(mode).inc()
    metrics.operations_submitted.inc(len(operations))
    headers = {"Preference-Applied": ", ".join(applied)} if applied else {}

    if mode == "async":
        return accepted(request, batch_id, BatchState.QUEUED, headers)
    run = runner.start_in_process(batch_id)
    if not await _finished(runtime, run, wait) or run.ran_elsewhere():
        # The run goes on (in this process, or in the flow run the reaper gave it), unless it
        # has just made the batch final: then its results are the answer.
        state = BatchState((await asyncio.to_thread(runtime.store.get_batch, batch_id)).status)
        if not state.is_final:
            return accepted(request, batch_id, state, headers)
    code, body = await asyncio.to_thread(_outcome, runtime, batch_id)
    if not BatchState(body["status"]).is_final:
        await asyncio.to_thread(_could_not_run, runtime, batch_id, run)
    return JSONResponse(body, status_code=code, headers=headers)


def _could_not_run(runtime: Runtime, batch_id: str, run: SyncRun) -> None:
    """A sync run ended without finishing its batch: the flow could not run at all (for
    example the Prefect API is unreachable). The batch is marked failed, so it can be retried."""
    error = run.error()
    reason = f"{type(error).__name__}: {error}" if error else "the flow run did not finish"
    runtime.lifecycle.finish(batch_id, BatchState.FAILED, f"could not run: {reason}")
    raise TransientError(f"batch {batch_id} could not run ({reason}); retry it")


@router.get(
    "/batches/{batch_id}/status",
    name="get_batch_status",
    response_model=BatchStatus,
    summary="A batch's status and progress",
    responses=error_responses(401, 404),
)
def get_batch_status(batch_id: BatchId, runtime: RuntimeDep, scope: ScopeDep) -> BatchStatus:
    """Counters only grow while a batch runs: ``completed``/``progress`` never go backwards."""
    owned_batch(runtime, batch_id, scope)
    return _status(runtime, batch_id)


@router.get(
    "/batches/{batch_id}/results",
    name="get_batch_results",
    summary="A batch's item results: paged JSON, or a CSV download",
    response_model=ResultsPage,
    responses={200: {"content": {"text/csv": {}}}, **error_responses(401, 404)},
)
def get_batch_results(
    batch_id: BatchId,
    runtime: RuntimeDep,
    scope: ScopeDep,
    state: Annotated[ItemState | None, Query(description="only items in this state")] = None,
    fmt: Annotated[Literal["json", "csv"], Query(alias="format")] = "json",
    after: Annotated[int, Query(ge=-1, le=MAX_ITEM_INDEX,
                                description="only items with a larger index")] = -1,
    limit: Annotated[int | None, Query(ge=1, le=10_000,
                                       description="JSON page size (default 1000)")] = None,
) -> Response:
    """Items recorded so far, in index order. JSON pages continue with ``after=next_after``;
    ``format=csv`` streams every matching item (spreadsheet formulas escaped)."""
    owned_batch(runtime, batch_id, scope)
    store = runtime.store
    if fmt == "csv":
        results = store.results.of_batch(batch_id, state=state, after=after, limit=limit)
        return StreamingResponse(
            _csv_pages(results), media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition":
                     f'attachment; filename="batch-{batch_id}-results.csv"'})
    size = limit or 1000
    items = list(store.results.of_batch(batch_id, state=state, after=after, limit=size))
    next_after = items[-1].index if len(items) == size else None
    return JSONResponse({"batch_id": batch_id, "items": [item_json(r) for r in items],
                         "next_after": next_after})


def _csv_pages(results: Iterator[ItemResult]) -> Iterator[str]:
    """The results CSV (``batchops.csvio``'s columns and escaping), a page at a time."""
    first = True
    while True:
        page = [r for _, r in zip(range(_CSV_PAGE), results, strict=False)]
        if not page and not first:
            return
        out = io.StringIO()
        write_results_csv(page, out)
        text = out.getvalue()
        yield text if first else text.split("\n", 1)[1]
        if len(page) < _CSV_PAGE:
            return
        first = False
