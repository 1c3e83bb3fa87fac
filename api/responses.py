"""What the routes share: the error and ``202`` response models, a batch id in a path, the
caller's own batch, and an item as the API shows it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from batchops.errors import BatchNotFound
from batchops.runtime import Runtime
from batchops.schemas import BatchState, ItemResult, ItemState
from batchops.store import BatchRecord

__all__ = ["BatchAccepted", "BatchId", "ErrorBody", "accepted", "error_responses", "item_json",
           "owned_batch", "status_url"]

BatchId = Annotated[str, Path(max_length=64, description="the batch's id")]


class BatchAccepted(BaseModel):
    """``202``: the batch runs on; follow ``status_url``."""

    batch_id: str
    status: BatchState
    status_url: str


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of these error status codes (every one an :class:`ErrorBody`)."""
    return {code: {"model": ErrorBody} for code in codes}


def item_json(result: ItemResult) -> dict[str, Any]:
    """An item as the API shows it: ``result`` when it succeeded, else ``error``."""
    data = result.model_dump(mode="json")
    data.pop("error" if result.state is ItemState.SUCCEEDED else "result", None)
    return data


def owned_batch(runtime: Runtime, batch_id: str, scope: str) -> BatchRecord:
    """The batch, if it is the caller's: another key's batch does not exist for this caller.

    Raises:
        BatchNotFound: no such batch, or another scope's.
    """
    batch = runtime.store.get_batch(batch_id)
    if batch.scope != scope:
        raise BatchNotFound(batch_id)
    return batch


def status_url(request: Request, batch_id: str) -> str:
    """The batch's ``GET /batches/{id}/status`` URL."""
    return str(request.url_for("get_batch_status", batch_id=batch_id))


def accepted(request: Request, batch_id: str, status: BatchState,
             headers: dict[str, str] | None = None) -> JSONResponse:
    """``202`` with the batch's status URL (also in ``Location``)."""
    url = status_url(request, batch_id)
    return JSONResponse({"batch_id": batch_id, "status": status.value, "status_url": url},
                        status_code=202, headers={"Location": url, **(headers or {})})
