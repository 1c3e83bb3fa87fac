"""The route table: which target executes ``METHOD /path``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from batchops.errors import ConfigurationError
from batchops.handlers import Handler
from batchops.resources import Resource
from batchops.settings import UpstreamSpec

__all__ = ["RouteMatch", "Router", "check_path"]

SQL_TARGET = "sql"
PYTHON_TARGET = "python"
HTTP_TARGET = "http"

_COLLECTION_METHODS = {"POST"}
_ITEM_METHODS = {"GET", "PUT", "PATCH", "DELETE"}


@dataclass(frozen=True, slots=True)
class RouteMatch:
    target: str
    resource: str | None
    params: dict[str, str]
    handler: Handler | None = None


_PLAIN_PATH = re.compile(r"/[A-Za-z0-9_~-]+(?:/[A-Za-z0-9_~-]+)*/?")


def check_path(path: str) -> str | None:
    """Why ``path`` is not a safe relative API path, or ``None`` when it is."""
    if _PLAIN_PATH.fullmatch(path):
        return None  # the common case, nothing to decode
    if not path.startswith("/") or path.startswith("//"):
        return "must be a relative path starting with '/' (no scheme or host)"
    if "://" in path:
        return "must not contain a scheme or host"
    decoded = unquote(path.split("?", 1)[0])
    if any(seg in ("..", ".") for seg in decoded.split("/")):
        return "must not contain '.' or '..' segments"
    if any(ord(ch) < 0x20 or ch == "\\" for ch in decoded):
        return "must not contain control characters or backslashes"
    return None


class Router:
    """Resolves a method and path to a target: handlers first, then upstreams (the longest
    prefix), then sql resources."""

    def __init__(self, resources: dict[str, Resource], handlers: list[Handler],
                 upstreams: dict[str, UpstreamSpec] | None = None) -> None:
        self.resources = resources
        self.handlers = handlers
        self.upstreams = dict(sorted((upstreams or {}).items(),
                                     key=lambda kv: -len(kv[1].prefix)))
        for h in handlers:
            first = h.template.strip("/").split("/", 1)[0]
            if first in resources:
                raise ConfigurationError(
                    f"handler {h.method} {h.template} overlaps the sql resource {first!r}"
                )
        for name, up in self.upstreams.items():
            first = up.prefix.strip("/").split("/", 1)[0]
            if first in resources:
                raise ConfigurationError(
                    f"upstream {name!r} (prefix {up.prefix}) overlaps the sql resource {first!r}")

    def upstream_for(self, path: str) -> str | None:
        """The name of the upstream whose prefix ``path`` falls under."""
        for name, up in self.upstreams.items():
            if path == up.prefix or path.startswith(up.prefix + "/") or \
                    path.startswith(up.prefix + "?"):
                return name
        return None

    def resolve(self, method: str, path: str) -> RouteMatch | str:
        """The match, or a message saying why nothing matches."""
        bare = path.split("?", 1)[0]
        for h in self.handlers:
            m = h.pattern.match(bare)
            if m and h.method == method:
                return RouteMatch(PYTHON_TARGET, None, m.groupdict(), h)
        upstream = self.upstream_for(path)
        if upstream is not None:
            return RouteMatch(HTTP_TARGET, upstream, {})
        segments = bare.strip("/").split("/")
        resource = self.resources.get(segments[0])
        if resource is not None and len(segments) <= 2:
            if "?" in path:
                return "query strings are not supported for sql resources"
            allowed = _COLLECTION_METHODS if len(segments) == 1 else _ITEM_METHODS
            if method not in allowed:
                shape = f"/{resource.name}" + ("" if len(segments) == 1 else "/{id}")
                return f"{method} is not supported on {shape} (use {', '.join(sorted(allowed))})"
            params = {} if len(segments) == 1 else {resource.primary_key: unquote(segments[1])}
            return RouteMatch(SQL_TARGET, resource.name, params)
        if any(h.pattern.match(bare) for h in self.handlers):
            return f"{method} is not supported on this path"
        return f"no target serves {bare!r}"
