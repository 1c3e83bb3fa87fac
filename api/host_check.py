"""The ``Host`` and ``Origin`` check in front of every route
(:class:`~batchops.auth.HostAllowlist`).

ASGI middleware rather than a dependency: it answers every request, ``/docs`` and unknown
paths included, before any route reads a body.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import batchops_error_response
from batchops.auth import HostAllowlist
from batchops.errors import HostNotAllowed, OriginNotAllowed
from batchops.settings import get_settings

__all__ = ["HostCheckMiddleware"]


class HostCheckMiddleware:
    """Refuses requests whose ``Host`` (or, without API keys, ``Origin``) is not allowed:
    421 ``host_not_allowed``, 403 ``origin_not_allowed``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":  # the API serves no websockets
            # Built when the app starts serving (the lifespan), from the settings then.
            allowlist: HostAllowlist | None = getattr(scope["app"].state, "host_allowlist",
                                                      None)
            if allowlist is None:
                allowlist = HostAllowlist.from_settings(get_settings())
            headers = Headers(scope=scope)
            try:
                allowlist.check(headers.get("host"), headers.get("origin"))
            except (HostNotAllowed, OriginNotAllowed) as exc:
                await batchops_error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)
