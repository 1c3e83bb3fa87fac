"""Request bodies read as they stream in, refused past the size limit without reading on.

A ``Content-Length`` over the limit is refused before a byte of the body is read; a body
without one (chunked) is read chunk by chunk and refused as soon as it passes the limit, so
a 1 GB upload costs at most the limit in memory. The ``413`` says ``Connection: close`` and
the server closes the connection, so the rest of the upload is not read either.

A body is read only with a ``Content-Type`` the route reads (415 ``unsupported_media_type``
before any of it is read): ``application/json`` or ``application/*+json``, UTF-8, for JSON;
an HTML form's types (``text/plain``, form-urlencoded, multipart) are never read as JSON, so
a web page cannot post a batch without a CORS preflight.
"""

from __future__ import annotations

import json
import re
from email.message import Message
from typing import Any

from starlette.requests import Request

from batchops.errors import (
    BadRequest,
    BodyTooLarge,
    InvalidText,
    MalformedJson,
    UnsupportedMediaType,
)
from batchops.jsonable import lone_surrogate_at

__all__ = [
    "CSV_MEDIA_TYPES",
    "JSON_MEDIA_TYPES",
    "BodyTooLarge",
    "MalformedJson",
    "media_type",
    "read_body",
    "read_json",
    "require_json",
    "require_media_type",
]

JSON_MEDIA_TYPES = ("application/json", "application/*+json")
CSV_MEDIA_TYPES = ("text/csv", "multipart/form-data")
# UTF-8 cannot carry a surrogate; only a JSON escape (\ud800-\udfff) can spell one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def media_type(request: Request) -> str | None:
    """The request's media type, lowercase and without parameters; ``None`` without one."""
    value = request.headers.get("content-type")
    if value is None or not value.strip():
        return None
    message = Message()
    message["content-type"] = value
    return message.get_content_type()


def _matches(media: str, accepted: str) -> bool:
    kind, _, subtype = accepted.partition("/")
    if subtype.startswith("*+"):  # application/*+json
        return media.startswith(f"{kind}/") and media.endswith(subtype[1:])
    return media == accepted


def require_media_type(request: Request, accepted: tuple[str, ...]) -> str:
    """The request's media type when it is one of ``accepted``; else
    :class:`UnsupportedMediaType` (also for a request without ``Content-Type``)."""
    media = media_type(request)
    if media is None or not any(_matches(media, a) for a in accepted):
        raise UnsupportedMediaType(request.headers.get("content-type"), accepted)
    return media


def require_json(request: Request) -> None:
    """The body is declared JSON, in UTF-8 (the only encoding of JSON, RFC 8259)."""
    require_media_type(request, JSON_MEDIA_TYPES)
    message = Message()
    message["content-type"] = request.headers["content-type"]
    charset = message.get_param("charset")
    if isinstance(charset, str) and charset.lower() not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(request.headers["content-type"],
                                   ("application/json; charset=utf-8",))


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
    """The body parsed as JSON (within ``limit`` bytes); :class:`UnsupportedMediaType` if it
    is not declared JSON, :class:`MalformedJson` if it is not JSON, :class:`InvalidText` if
    a string in it is not Unicode text (a lone surrogate)."""
    require_json(request)
    raw = await read_body(request, limit)
    if not raw.strip():
        raise MalformedJson("the request body is empty; expected a JSON object")
    try:
        document = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MalformedJson(f"the request body is not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(raw):
        where = lone_surrogate_at(document)
        if where is not None:
            raise InvalidText(where)
    return document
