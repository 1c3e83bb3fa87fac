"""Database values → JSON values for item results."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any

__all__ = ["json_value", "lone_surrogate_at", "row_to_json"]

_SURROGATE = re.compile("[\ud800-\udfff]")


def json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        # A number when it round-trips exactly through a float, else its exact text.
        if value == value.to_integral_value() and abs(value) < 2**53:
            return int(value)
        as_float = float(value)
        return as_float if Decimal(repr(as_float)) == value else str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def row_to_json(row: Mapping[str, Any]) -> dict[str, Any]:
    # str(): SQLAlchemy's column names are a str subclass that serializes slowly.
    return {str(k): json_value(v) for k, v in row.items()}


def _shown_key(key: str, limit: int = 60) -> str:
    """A key as a location names it: cut when long (an error does not echo a huge key)."""
    return key if len(key) <= limit else f"{key[:40]}… ({len(key)} characters)"


def lone_surrogate_at(value: Any) -> str | None:
    """Where in a parsed JSON document a string (or key) holds a lone UTF-16 surrogate, which
    JSON's ``\\ud800`` escape can spell but no UTF-8 text (the store, a response) can hold:
    a dotted location like ``operations.0.body.name``, or ``None``."""
    stack: list[tuple[tuple[str, ...], Any]] = [((), value)]
    while stack:
        loc, node = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                return ".".join(loc) or "body"
        elif isinstance(node, dict):
            for key, item in node.items():
                if _SURROGATE.search(key):
                    return (".".join(loc) or "body") + " (a key)"
                stack.append(((*loc, _shown_key(key)), item))
        elif isinstance(node, list):
            stack.extend(((*loc, str(i)), item) for i, item in enumerate(node))
    return None
