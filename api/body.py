"""Request bodies read as they stream in, refused past the size limit without reading on.

A ``Content-Length`` over the limit is refused before a byte of the body is read; a body
without one (chunked) is read chunk by chunk and refused as soon as it passes the limit, so
a 1 GB upload costs at most the limit in memory. The ``413`` says ``Connection: close`` and
the server closes the connection, so the rest of the upload is not read either.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from batchops.errors import BadRequest, BodyTooLarge, MalformedJson

__all__ = ["BodyTooLarge", "MalformedJson", "read_body", "read_json"]


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes; :class:`BodyTooLarge` as soon as it is over."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
        if size > limit:
            raise BodyTooLarge(size, limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(len(body), limit)
    return bytes(body)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, limit: int) -> Any:
    """The body parsed as JSON (within ``limit`` bytes); :class:`MalformedJson` if it is not."""
    raw = await read_body(request, limit)
    if not raw.strip():
        raise MalformedJson("the request body is empty; expected a JSON object")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MalformedJson(f"the request body is not valid JSON: {exc}") from None
