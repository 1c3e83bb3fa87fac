"""Acting on a batch: cancel it, retry its failed items, follow its items as they finish, and
import a CSV file as a new batch."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.body import CSV_MEDIA_TYPES, require_media_type
from api.deps import QuotaDep, RunnerDep, RuntimeDep, ScopeDep
from api.responses import BatchAccepted, BatchId, accepted, error_responses, item_json, owned_batch
from batchops import batch_runs, cancellation
from batchops.csvio import CsvImport, count_operations, open_operations
from batchops.errors import (
    BadRequest,
    BatchExceedsQuota,
    BatchTooLarge,
    BodyTooLarge,
)
from batchops.quota import OperationsQuota
from batchops.registration import register_batch
from batchops.runtime import Runtime
from batchops.schemas import MAX_ITEM_INDEX, BatchState, BatchStatus, ItemResult, Method

__all__ = ["router"]

router = APIRouter(tags=["batches"])

_EVENTS_POLL_SECONDS = 0.25
# What CSV error messages call the upload (not the server's temporary file).
_UPLOAD_NAME = "the uploaded CSV"
_NO_ROWS = "the file has no rows after its header; a batch needs at least one operation"
_UPLOAD_PART = 1 << 16


@router.post("/batches/{batch_id}/cancel", name="cancel_batch", response_model=BatchStatus,
             summary="Stop a batch: no further item starts",
             responses=error_responses(401, 404, 409))
def cancel_batch(batch_id: BatchId, runtime: RuntimeDep, scope: ScopeDep) -> BatchStatus:
    """The status becomes ``cancelled`` at once and no further item starts (a running chunk
    notices within about half a second; a sql chunk on the store's database, one
    transaction, finishes); items already started finish and keep their results. Every item
    not started gets a result, ``skipped`` with error code ``cancelled``; ``finished_at`` is
    set once they all have one, and the flow run ends ``Cancelled``.
    Cancelling a cancelled batch answers its status again; a batch that has completed or
    failed cannot be cancelled (409 ``batch_finished``)."""
    owned_batch(runtime, batch_id, scope)
    cancellation.cancel_batch(runtime, batch_id)
    return runtime.store.status(batch_id, ui_url=runtime.settings.prefect_ui_url)


@router.post("/batches/{batch_id}/retry", name="retry_batch", response_model=BatchAccepted,
             status_code=202,
             summary="Run the failed and skipped items of a finished batch again",
             responses={200: {"model": BatchStatus}, **error_responses(401, 404, 409)})
async def retry_batch(batch_id: BatchId, request: Request, runtime: RuntimeDep,
                      scope: ScopeDep, runner: RunnerDep) -> JSONResponse:
    """A new flow run of the same batch runs only its failed, skipped (and never-run) items;
    items that succeeded keep their results. A batch with ``deadline_seconds`` gets that long
    again, from now. ``202`` with the status URL, or ``200`` with the status when no item
    needs another run. A batch still running answers 409."""
    owned_batch(runtime, batch_id, scope)
    retried = await asyncio.to_thread(batch_runs.retry, runtime, batch_id)
    if retried.flow_run_id is None:
        status = runtime.store.status(batch_id, ui_url=runtime.settings.prefect_ui_url)
        return JSONResponse(status.model_dump(mode="json"))
    return accepted(request, batch_id, BatchState.QUEUED)


@router.get("/batches/{batch_id}/events", name="batch_events",
            summary="Item results as NDJSON, streamed as they finish",
            responses={200: {"content": {"application/x-ndjson": {}}}, **error_responses(401, 404)})
async def batch_events(
    batch_id: BatchId, runtime: RuntimeDep, scope: ScopeDep,
    after: Annotated[int, Query(ge=-1, le=MAX_ITEM_INDEX,
                                description="resume after this item index")] = -1,
) -> StreamingResponse:
    """One JSON line per item, in index order, as chunks record them; the stream ends with a
    ``{"event": "end", ...}`` line once the batch has finished. Reconnect with
    ``after=<last index seen>`` to resume."""
    owned_batch(runtime, batch_id, scope)
    store = runtime.store

    async def lines() -> AsyncIterator[str]:
        last = after
        while True:
            # Read the status first: items recorded before a terminal status are all listed.
            batch = await asyncio.to_thread(store.get_batch, batch_id)
            items = await asyncio.to_thread(_recorded_after, runtime, batch_id, last)
            # Chunks finish out of order: emit only the unbroken run of indexes after `last`.
            for item in items:
                if item.index != last + 1 and not BatchState(batch.status).is_final:
                    break
                last = item.index
                yield json.dumps(item_json(item)) + "\n"
            if BatchState(batch.status).is_final:
                yield json.dumps({"event": "end", "status": batch.status, "last": last}) + "\n"
                return
            await asyncio.sleep(_EVENTS_POLL_SECONDS)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _recorded_after(runtime: Runtime, batch_id: str, after: int) -> list[ItemResult]:
    return list(runtime.store.results.of_batch(batch_id, after=after))


async def _spool_upload(request: Request, limit: int, *, multipart: bool) -> FilePath:
    """The uploaded CSV (multipart ``file`` field or a ``text/csv`` body) in a temp file."""
    out = tempfile.NamedTemporaryFile(suffix=".csv", delete=False)  # noqa: SIM115
    path = FilePath(out.name)
    size = 0
    try:
        with out:
            if multipart:
                form = await request.form(max_files=1, max_fields=10)
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise BadRequest("multipart upload needs a 'file' field with the CSV")
                while part := await upload.read(_UPLOAD_PART):
                    size += len(part)
                    if size > limit:
                        raise BodyTooLarge(size, limit)
                    out.write(part)
            else:
                async for part in request.stream():
                    size += len(part)
                    if size > limit:
                        raise BodyTooLarge(size, limit)
                    out.write(part)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _count_rows(path: FilePath, spec: CsvImport, quota: OperationsQuota,
                max_rows: int) -> int:
    """The file's operations, counted only as far as the quota or the row limit allows:
    :class:`BatchExceedsQuota` or :class:`BatchTooLarge` as soon as it is over one."""
    stop_after = min(quota.limit, max_rows)
    count = count_operations(path, csv=spec, stop_after=stop_after, name=_UPLOAD_NAME)
    if count > max_rows:
        raise BatchTooLarge(count, max_rows)
    if count > quota.limit:
        raise BatchExceedsQuota(count, quota.limit, at_least=True)
    return count


@router.post("/batches/import", name="import_batch", response_model=BatchAccepted,
             status_code=202, summary="Import a CSV file as a batch on one resource",
             responses=error_responses(400, 401, 413, 415, 422, 429))
async def import_batch(
    request: Request, runtime: RuntimeDep, scope: ScopeDep, quota: QuotaDep, runner: RunnerDep,
    resource: Annotated[str, Query(description="the resource every row applies to")],
    method: Annotated[Method, Query(description="POST inserts rows; PUT/PATCH/DELETE by id")],
) -> JSONResponse:
    """Each row becomes one operation (``POST /{resource}`` with the row as body, or
    ``{METHOD} /{resource}/{id}``); every row is validated first (422 lists each bad row's
    line), then the batch runs as a flow run of the deployment: ``202`` with the status URL.
    Results (``format=csv``) carry each item's input line number in ``row``.

    The body is ``text/csv`` or ``multipart/form-data`` with the file in ``file`` (else 415).
    The rows are counted against the caller's quota before anything is stored: more rows
    than it allows in a minute is 413 ``batch_exceeds_quota`` (counting stops there), more
    than it has left this minute 429 ``quota_exceeded`` with ``Retry-After``."""
    settings = runtime.settings
    media = require_media_type(request, CSV_MEDIA_TYPES)
    spec = CsvImport.for_route(runtime.router, resource, method)
    path = await _spool_upload(request, settings.api.max_import_bytes,
                               multipart=media == "multipart/form-data")
    charge: str | None = None
    counted = 0
    try:
        if quota.limit:
            counted = await asyncio.to_thread(_count_rows, path, spec, quota,
                                              settings.api.max_import_rows)
            charge = await quota.charge(scope, counted)

        def register() -> tuple[str, int]:
            with open_operations(path, csv=spec, name=_UPLOAD_NAME) as operations:
                return register_batch(runtime, operations, scope=scope, source="import",
                                      max_operations=settings.api.max_import_rows,
                                      empty_message=_NO_ROWS)

        batch_id, _ = await asyncio.to_thread(register)
        await runner.start_deployment(runtime, batch_id)
    except BaseException:
        await quota.refund(charge, counted)  # nothing of the batch ran
        raise
    finally:
        path.unlink(missing_ok=True)
    return accepted(request, batch_id, BatchState.QUEUED)
