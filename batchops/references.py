"""References between operations: ``{"$ref": "op1.result.id"}`` values in a body.

A reference names another operation of the batch by its ``id`` and a path into that
operation's recorded result: ``op1.result`` is the whole result, ``op1.result.id`` its ``id``
member, ``op1.result.items.0.sku`` goes through objects (by key) and lists (by position). The
id is what comes before the first ``.result`` segment, so an id containing ``.result.`` cannot
be referenced. A reference makes its operation depend on the one it names (as if that id were
in ``depends_on``); it is replaced by the value right before the operation runs, and an
operation whose reference does not resolve then fails with ``ref_unresolved`` (422).

The stored operation keeps its reference, not the value: a retry resolves it again, from the
dependency's newest result.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["REF_KEY", "Reference", "UnresolvedReference", "find_references", "resolve_body"]

REF_KEY = "$ref"
_REF = re.compile(r"^(?P<id>.+?)\.result(?:\.(?P<path>.+))?$", re.DOTALL)

Location = tuple[str | int, ...]


class UnresolvedReference(Exception):
    """A ``$ref`` whose operation has no result, or whose result has nothing at the path."""


@dataclass(frozen=True)
class Reference:
    op_id: str
    path: tuple[str, ...]
    text: str

    @classmethod
    def parse(cls, text: str) -> Reference:
        """``op1.result.id`` → ``Reference("op1", ("id",))``; ``ValueError`` if malformed."""
        m = _REF.match(text)
        if m is None:
            raise ValueError(f"$ref {text!r} must look like '<operation id>.result[.<key>...]'")
        path = tuple(m["path"].split(".")) if m["path"] else ()
        if any(not part for part in path):
            raise ValueError(f"$ref {text!r} has an empty path segment")
        return cls(m["id"], path, text)

    def resolve(self, result: Any) -> Any:
        value = result
        for part in self.path:
            if isinstance(value, Mapping) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                raise UnresolvedReference(
                    f"$ref {self.text!r}: the result of {self.op_id!r} has nothing at {part!r}")
        return value


def _ref_text(value: Mapping[str, Any]) -> str:
    """The reference of a ``{"$ref": text}`` object; ``ValueError`` for other ``$ref`` shapes."""
    text = value[REF_KEY]
    if len(value) != 1 or not isinstance(text, str):
        raise ValueError('a $ref object has exactly one member, a string like "op1.result.id"')
    return text


def find_references(value: Any, loc: Location = ()) -> Iterator[tuple[Location, Reference | str]]:
    """Every ``$ref`` in ``value``: its location and the reference, or why it is malformed."""
    if isinstance(value, dict):
        if REF_KEY in value:
            try:
                yield loc, Reference.parse(_ref_text(value))
            except ValueError as exc:
                yield loc, str(exc)
            return
        for key, item in value.items():
            if isinstance(item, dict | list):
                yield from find_references(item, (*loc, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, dict | list):
                yield from find_references(item, (*loc, i))


def resolve_body(value: Any, results: Mapping[str, Any]) -> Any:
    """``value`` with every ``$ref`` replaced from ``results`` (operation id → result)."""
    if isinstance(value, dict):
        if REF_KEY in value:
            ref = Reference.parse(_ref_text(value))
            if ref.op_id not in results:
                raise UnresolvedReference(f"$ref {ref.text!r}: {ref.op_id!r} has no result")
            return ref.resolve(results[ref.op_id])
        return {k: resolve_body(v, results) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_body(v, results) for v in value]
    return value
