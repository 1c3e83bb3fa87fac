"""Database values → JSON values for item results."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any

__all__ = ["json_value", "row_to_json"]


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
