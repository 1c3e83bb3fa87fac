"""Declared resources: tables exposed as REST resources, their columns and value types."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from pydantic import TypeAdapter, ValidationError

from batchops.settings import ColumnSpec, ResourceSpec

__all__ = ["Resource", "build_resources", "coerce_value", "column_type", "integer_range"]

_SQL_TYPES: dict[str, Callable[[], sa.types.TypeEngine[Any]]] = {
    "integer": sa.Integer,
    "bigint": sa.BigInteger,
    "text": sa.Text,
    "numeric": sa.Numeric,
    "float": sa.Float,
    "boolean": sa.Boolean,
    "timestamp": lambda: sa.DateTime(timezone=True),
    "date": sa.Date,
    "json": sa.JSON,
}

_INTEGER_TYPES = ("integer", "bigint")
_DATETIME = TypeAdapter(datetime)
_DATE = TypeAdapter(date)


# An integer as text: an optional sign and ASCII digits (``str.isdigit`` takes any script's).
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")
# A key in a path names one record: its canonical spelling only (no ``+``, spaces, zeros).
_CANONICAL_INTEGER = re.compile(r"0|-?[1-9][0-9]*")
# The largest integer column is 64-bit: 19 digits; a longer text is out of range unread.
_MAX_INTEGER_DIGITS = 20


def integer_range(column_type: sa.types.TypeEngine[Any]) -> tuple[int, int]:
    """The values an integer column of ``column_type`` holds: ``SmallInteger`` 16-bit,
    ``BigInteger`` 64-bit, any other ``Integer`` 32-bit (what PostgreSQL stores)."""
    bits = (16 if isinstance(column_type, sa.SmallInteger)
            else 64 if isinstance(column_type, sa.BigInteger) else 32)
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _short(value: Any) -> str:
    """``repr(value)``, cut to a length an error message can carry."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}… ({len(text)} characters)"


def _in_range(value: int, bounds: tuple[int, int]) -> int:
    low, high = bounds
    if not low <= value <= high:
        raise ValueError(f"{_short(value)} is out of range: the column holds integers from "
                         f"{low} to {high}")
    return value


def _integer(value: Any, bounds: tuple[int, int]) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(value, int):
        return _in_range(value, bounds)
    if isinstance(value, float) and value.is_integer():
        return _in_range(int(value), bounds)
    if isinstance(value, str) and _INTEGER_TEXT.fullmatch(text := value.strip()):
        if len(text.lstrip("+-").lstrip("0")) > _MAX_INTEGER_DIGITS:
            raise ValueError(f"{_short(value)} is out of range: the column holds integers "
                             f"from {bounds[0]} to {bounds[1]}")
        return _in_range(int(text), bounds)
    raise ValueError(f"expected an integer, got {_short(value)}")


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {type(value).__name__}")


def _numeric(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError(f"expected a number, got {_short(value)}")
    try:
        result = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"expected a number, got {_short(value)}") from None
    if not result.is_finite():
        raise ValueError("expected a finite number")
    return result


# PostgreSQL's ``numeric`` without a precision: digits before and after the point.
_PG_NUMERIC_DIGITS = (131072, 16383)
# SQLAlchemy reads SQLite's numbers back at this scale.
_SQLITE_NUMERIC_SCALE = 10


def _digits(value: Decimal) -> tuple[int, int]:
    """Digits before the point (0 for a value below 1) and after it, of ``value``."""
    _sign, digits, exponent = value.normalize().as_tuple()
    assert isinstance(exponent, int)  # a finite value
    if digits == (0,):
        return 0, 0
    return max(len(digits) + exponent, 0), max(-exponent, 0)


def _numeric_for(column_type: sa.Numeric[Any], dialect: str | None) -> Callable[[Any], Decimal]:
    """A numeric value, refused when the column would not store it exactly: beyond its
    declared precision and scale, or, undeclared, beyond what the database keeps."""
    precision, scale = column_type.precision, column_type.scale or 0

    def check(value: Any) -> Decimal:
        result = _numeric(value)
        before, after = _digits(result)
        if precision is not None:
            if before > precision - scale or after > scale:
                raise ValueError(
                    f"{_short(value)} does not fit the column: numeric({precision}, {scale}) "
                    f"holds at most {precision - scale} digit(s) before the point and "
                    f"{scale} after it")
        elif dialect == "sqlite":
            # SQLite keeps a numeric column's values as 64-bit floats.
            stored = Decimal(f"{float(result):.{_SQLITE_NUMERIC_SCALE}f}")
            if stored != result:
                raise ValueError(
                    f"{_short(value)} cannot be stored exactly: on SQLite the column keeps "
                    "numbers as 64-bit floats (about 15 significant digits, "
                    f"{_SQLITE_NUMERIC_SCALE} after the point)")
        elif before > _PG_NUMERIC_DIGITS[0] or after > _PG_NUMERIC_DIGITS[1]:
            raise ValueError(
                f"{_short(value)} does not fit the column: numeric holds at most "
                f"{_PG_NUMERIC_DIGITS[0]} digits before the point and "
                f"{_PG_NUMERIC_DIGITS[1]} after it")
        return result

    return check


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
        raise ValueError(f"expected an ISO 8601 timestamp, got {_short(value)}") from None


def _date(value: Any) -> date:
    try:
        return _DATE.validate_python(value)
    except ValidationError:
        raise ValueError(f"expected an ISO 8601 date, got {_short(value)}") from None


_COERCERS: dict[str, Callable[[Any], Any]] = {
    "text": _text,
    "float": _float,
    "boolean": _boolean,
    "timestamp": _timestamp,
    "date": _date,
    "json": lambda v: v,
}


def column_type(spec: ColumnSpec) -> sa.types.TypeEngine[Any]:
    """The SQLAlchemy type of a declared column."""
    if spec.type == "numeric":
        return sa.Numeric(spec.precision, spec.scale)
    return _SQL_TYPES[spec.type]()


def _coercer(spec: ColumnSpec, dialect: str | None) -> Callable[[Any], Any]:
    """The conversion of a JSON value to ``spec``'s Python type, within what it can hold."""
    sql_type = column_type(spec)
    if isinstance(sql_type, sa.Integer):
        bounds = integer_range(sql_type)
        return lambda value: _integer(value, bounds)
    if isinstance(sql_type, sa.Numeric) and not isinstance(sql_type, sa.Float):
        return _numeric_for(sql_type, dialect)
    return _COERCERS[spec.type]


def coerce_value(spec: ColumnSpec, value: Any, dialect: str | None = None) -> Any:
    """Convert a JSON value to the column's Python type; ``ValueError`` explains a misfit
    (the wrong type, out of the column's range, more digits than it stores exactly on
    ``dialect``)."""
    if value is None:
        if not spec.nullable:
            raise ValueError("may not be null")
        return None
    return _coercer(spec, dialect)(value)


@dataclass(frozen=True)
class Resource:
    """A declared table, with the SQLAlchemy ``Table`` built from its spec."""

    name: str
    spec: ResourceSpec
    dialect: str | None = None  # of the database the table is in (what it stores exactly)

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
                    column_type(col),
                    primary_key=is_pk,
                    nullable=col.nullable and not is_pk,
                    unique=col.unique and not is_pk,
                    autoincrement=is_pk and col.type in _INTEGER_TYPES,
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
            if not c.nullable and not (n == self.primary_key and c.type in _INTEGER_TYPES)
        )

    @cached_property
    def _coercers(self) -> dict[str, Callable[[Any], Any]]:
        return {name: _coercer(spec, self.dialect) for name, spec in self.spec.columns.items()}

    def coerce_column(self, name: str, value: Any) -> Any:
        """``value`` as column ``name`` stores it; ``ValueError`` when it does not fit."""
        if value is None:
            if not self.spec.columns[name].nullable:
                raise ValueError("may not be null")
            return None
        return self._coercers[name](value)

    def coerce_key(self, raw: str) -> Any:
        """The primary key named in a path; an integer key only in its canonical spelling
        (ASCII digits, no ``+``, spaces or leading zeros), so one record has one path."""
        if (self.spec.columns[self.primary_key].type in _INTEGER_TYPES
                and not _CANONICAL_INTEGER.fullmatch(raw)):
            raise ValueError(f"expected an integer in canonical form (ASCII digits, no sign "
                             f"or leading zeros, '-' for a negative), got {_short(raw)}")
        return self.coerce_column(self.primary_key, raw)

    def coerce_row(self, body: dict[str, Any]) -> dict[str, Any]:
        """Body → column values (already validated, so this does not fail)."""
        coercers = self._coercers
        return {k: None if v is None else coercers[k](v) for k, v in body.items()}


def build_resources(specs: dict[str, ResourceSpec],
                    store_url: str | None = None) -> dict[str, Resource]:
    """The declared resources; ``store_url`` is the database of those that name none."""
    resources = {}
    for name, spec in specs.items():
        url = spec.database_url or store_url
        dialect = sa.make_url(url).get_backend_name() if url else None
        resources[name] = Resource(name, spec, dialect)
    return resources
