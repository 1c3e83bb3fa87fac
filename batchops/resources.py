"""Declared resources: tables exposed as REST resources, their columns and value types."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from pydantic import TypeAdapter, ValidationError

from batchops.settings import ColumnSpec, ResourceSpec

__all__ = ["Resource", "build_resources", "coerce_value"]

_SQL_TYPES: dict[str, Callable[[], sa.types.TypeEngine[Any]]] = {
    "integer": sa.Integer,
    "text": sa.Text,
    "numeric": sa.Numeric,
    "float": sa.Float,
    "boolean": sa.Boolean,
    "timestamp": lambda: sa.DateTime(timezone=True),
    "date": sa.Date,
    "json": sa.JSON,
}

_DATETIME = TypeAdapter(datetime)
_DATE = TypeAdapter(date)


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value.strip())
    raise ValueError(f"expected an integer, got {value!r}")


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {type(value).__name__}")


def _numeric(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        result = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"expected a number, got {value!r}") from None
    if not result.is_finite():
        raise ValueError("expected a finite number")
    return result


def _float(value: Any) -> float:
    result = float(_numeric(value))
    if math.isinf(result):
        raise ValueError("number out of range")
    return result


_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"expected a boolean, got {value!r}")


def _timestamp(value: Any) -> datetime:
    try:
        return _DATETIME.validate_python(value)
    except ValidationError:
        raise ValueError(f"expected an ISO 8601 timestamp, got {value!r}") from None


def _date(value: Any) -> date:
    try:
        return _DATE.validate_python(value)
    except ValidationError:
        raise ValueError(f"expected an ISO 8601 date, got {value!r}") from None


_COERCERS: dict[str, Callable[[Any], Any]] = {
    "integer": _integer,
    "text": _text,
    "numeric": _numeric,
    "float": _float,
    "boolean": _boolean,
    "timestamp": _timestamp,
    "date": _date,
    "json": lambda v: v,
}


def coerce_value(spec: ColumnSpec, value: Any) -> Any:
    """Convert a JSON value to the column's Python type; ``ValueError`` explains a misfit."""
    if value is None:
        if not spec.nullable:
            raise ValueError("may not be null")
        return None
    return _COERCERS[spec.type](value)


@dataclass(frozen=True)
class Resource:
    """A declared table, with the SQLAlchemy ``Table`` built from its spec."""

    name: str
    spec: ResourceSpec

    @property
    def primary_key(self) -> str:
        return self.spec.primary_key

    @property
    def database_url(self) -> str | None:
        return self.spec.database_url

    @cached_property
    def table(self) -> sa.Table:
        metadata = sa.MetaData()
        columns = []
        for name, col in self.spec.columns.items():
            is_pk = name == self.primary_key
            columns.append(
                sa.Column(
                    name,
                    _SQL_TYPES[col.type](),
                    primary_key=is_pk,
                    nullable=col.nullable and not is_pk,
                    unique=col.unique and not is_pk,
                    autoincrement=is_pk and col.type == "integer",
                )
            )
        return sa.Table(self.spec.table or self.name, metadata, *columns)

    @cached_property
    def has_json_columns(self) -> bool:
        return any(c.type == "json" for c in self.spec.columns.values())

    @cached_property
    def unique_columns(self) -> tuple[str, ...]:
        return tuple(n for n, c in self.spec.columns.items() if c.unique and n != self.primary_key)

    @cached_property
    def required_columns(self) -> tuple[str, ...]:
        """Columns an insert must name: not null and without a generated value."""
        return tuple(
            n
            for n, c in self.spec.columns.items()
            if not c.nullable and not (n == self.primary_key and c.type == "integer")
        )

    def coerce_key(self, raw: str) -> Any:
        return coerce_value(self.spec.columns[self.primary_key], raw)

    def coerce_row(self, body: dict[str, Any]) -> dict[str, Any]:
        """Body → column values (already validated, so this does not fail)."""
        cols = self.spec.columns
        return {k: coerce_value(cols[k], v) for k, v in body.items()}


def build_resources(specs: dict[str, ResourceSpec]) -> dict[str, Resource]:
    return {name: Resource(name, spec) for name, spec in specs.items()}
