"""Python handlers: functions registered for a method and a path template.

    from batchops.handlers import handler

    @handler("POST", "/emails", body=EmailBody)
    async def send_email(body: EmailBody, params: dict[str, str]) -> dict: ...

A handler receives the validated body (a model instance when ``body=`` is given, else the dict)
and the path parameters. Its return value becomes the item's result; raising
:class:`batchops.errors.ItemError` chooses the item's status and code. The modules that hold
handlers are named by the ``handler_modules`` setting.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from batchops.errors import ConfigurationError

__all__ = ["Handler", "HandlerRegistry", "handler", "load_handler_modules", "registry"]

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def compile_template(template: str) -> re.Pattern[str]:
    """``/reports/{id}`` → a regex with a named group per parameter."""
    if not template.startswith("/"):
        raise ConfigurationError(f"route template must start with '/': {template!r}")
    pattern = _PARAM.sub(lambda m: f"(?P<{m.group(1)}>[^/]+)", re.escape(template).replace(
        r"\{", "{").replace(r"\}", "}"))
    return re.compile(f"^{pattern}$")


@dataclass
class Handler:
    method: str
    template: str
    fn: Callable[..., Any]
    body_model: type[BaseModel] | None = None
    pattern: re.Pattern[str] = field(init=False)
    is_async: bool = field(init=False)

    def __post_init__(self) -> None:
        self.pattern = compile_template(self.template)
        self.is_async = inspect.iscoroutinefunction(self.fn)


class HandlerRegistry:
    """Handlers by method and template; the module-level ``registry`` is the default."""

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, str], Handler] = {}

    def handler(
        self, method: str, template: str, *, body: type[BaseModel] | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self._handlers[(method.upper(), template)] = Handler(method.upper(), template, fn,
                                                                  body)
            return fn

        return register

    def all(self) -> list[Handler]:
        return list(self._handlers.values())


registry = HandlerRegistry()
handler = registry.handler


def load_handler_modules(modules: list[str]) -> None:
    """Import the modules that register handlers (a clear error when one is missing)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigurationError(f"handler module {name!r} cannot be imported: {exc}") from exc
