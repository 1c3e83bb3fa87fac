"""The one place errors become HTTP responses: ``{"error": {"code", "message", ...}}``.

* a :class:`~batchops.errors.BatchopsError` → its ``http_status``, ``code``, ``message`` and
  details (``Retry-After`` when it carries ``retry_after``), also when middleware refuses a
  request (:func:`batchops_error_response`);
* FastAPI's request validation (query, headers, path) → 422 ``validation_failed`` with
  ``errors: [{index, id, field, message}]``, the shape batch validation uses;
* Starlette's HTTP errors (unknown route, wrong method) → their status, a code from it;
* the store's database unreachable → 503 ``transient_error``;
* anything else → 500 ``internal_error``: the traceback goes to the log, never to the client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from batchops.errors import BatchopsError

__all__ = ["batchops_error_response", "error_response", "install_error_handlers"]

logger = logging.getLogger("api")


def error_response(status: int, code: str, message: str, *,
                   headers: Mapping[str, str] | None = None, **details: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **details}},
                        status_code=status, headers=headers)


def batchops_error_response(exc: BatchopsError) -> JSONResponse:
    """The response for ``exc`` (also for middleware, which runs outside the handlers)."""
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if getattr(exc, "close_connection", False):  # the request body was left unread
        headers["Connection"] = "close"
    return JSONResponse({"error": exc.as_dict()}, status_code=exc.http_status,
                        headers=headers or None)


async def _batchops_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BatchopsError)
    if exc.http_status >= 500:
        logger.error("%s %s: %s: %s", request.method, request.url.path, exc.code, exc.message)
    return batchops_error_response(exc)


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "request"


async def _request_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"index": None, "id": None, "field": _field(tuple(e.get("loc", ()))),
               "message": e.get("msg", "invalid")} for e in exc.errors()]
    return error_response(422, "validation_failed",
                          f"{len(errors)} validation error(s) in the request", errors=errors)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = "error"
    code = phrase.lower().replace(" ", "_").replace("-", "_")
    message = exc.detail if isinstance(exc.detail, str) else phrase
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    logger.error("%s %s: the batch store is unavailable: %s", request.method,
                 request.url.path, exc)
    return error_response(503, "transient_error",
                          "the batch store's database is unavailable; retry shortly",
                          headers={"Retry-After": "5"})


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # The server logs the traceback too (Starlette re-raises after this response is sent).
    logger.error("%s %s failed: %s: %s", request.method, request.url.path,
                 type(exc).__name__, exc)
    return error_response(500, "internal_error",
                          "an unexpected error occurred; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(BatchopsError, _batchops_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(sa.exc.OperationalError, _database_unavailable)
    app.add_exception_handler(sa.exc.InterfaceError, _database_unavailable)
    app.add_exception_handler(Exception, _unexpected_error)
