"""Validate every operation before any runs, and report every problem at once."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from batchops.errors import BatchTooLarge, FieldError, ValidationFailed
from batchops.resources import Resource, coerce_value
from batchops.routing import SQL_TARGET, Router, check_path
from batchops.schemas import Operation, PlannedOperation, payload_hash

__all__ = ["OperationValidator", "validate_operations"]

# A report with a million errors helps nobody; the count says how many more there were.
MAX_REPORTED_ERRORS = 1000


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "operation"


class OperationValidator:
    """Checks operations one by one (streaming-friendly) and collects every error.

    Call :meth:`check` for each raw operation in batch order, then :meth:`finish`, which raises
    :class:`ValidationFailed` listing every problem, or :class:`BatchTooLarge`.
    """

    def __init__(self, router: Router, max_operations: int) -> None:
        self.router = router
        self.max_operations = max_operations
        self.errors: list[FieldError] = []
        self.error_count = 0
        self.count = 0
        self._ids: set[str] = set()
        self._keys: dict[str, str] = {}

    def _error(self, index: int, op_id: str | None, field: str, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(FieldError(index, op_id, field, message))

    def check(self, raw: Any, index: int) -> PlannedOperation | None:
        """Validate one operation; ``None`` when it has errors (they are recorded)."""
        self.count += 1
        if self.count > self.max_operations:
            raise BatchTooLarge(self.count, self.max_operations)
        if isinstance(raw, Operation):
            op = raw
        else:
            try:
                op = Operation.model_validate(raw)
            except ValidationError as exc:
                op_id = raw.get("id") if isinstance(raw, dict) else None
                for err in exc.errors(include_url=False):
                    self._error(index, None if op_id is None else str(op_id),
                                _loc(err["loc"]), err["msg"])
                return None
        before = self.error_count
        if op.id is not None:
            if op.id in self._ids:
                self._error(index, op.id, "id", f"duplicate id {op.id!r} in this batch")
            self._ids.add(op.id)
        problem = check_path(op.path)
        if problem:
            self._error(index, op.id, "path", problem)
            return None
        match = self.router.resolve(op.method, op.path)
        if isinstance(match, str):
            self._error(index, op.id, "path", match)
            return None
        body = op.body
        if match.target == SQL_TARGET:
            assert match.resource is not None
            resource = self.router.resources[match.resource]
            body = self._check_sql(resource, op, match.params, index)
        elif match.handler is not None and match.handler.body_model is not None:
            try:
                match.handler.body_model.model_validate(op.body or {})
            except ValidationError as exc:
                for err in exc.errors(include_url=False):
                    self._error(index, op.id, _loc(("body", *err["loc"])), err["msg"])
        # Only keyed operations are compared by payload; hashing every item costs time.
        digest = None
        if op.idempotency_key is not None:
            digest = payload_hash(op.method, op.path, op.body)
            seen = self._keys.get(op.idempotency_key)
            if seen is not None and seen != digest:
                self._error(index, op.id, "idempotency_key",
                            "idempotency key reused in this batch with a different payload")
            self._keys.setdefault(op.idempotency_key, digest)
        if self.error_count > before:
            return None
        return PlannedOperation(
            index=index, id=op.id, method=op.method, path=op.path, body=body,
            headers=op.headers, idempotency_key=op.idempotency_key, payload_hash=digest,
            target=match.target, resource=match.resource, params=match.params,
        )

    def _check_sql(self, resource: Resource, op: Operation, params: dict[str, str],
                   index: int) -> dict[str, Any] | None:
        pk = resource.primary_key
        columns = resource.spec.columns
        if pk in params:
            try:
                resource.coerce_key(params[pk])
            except ValueError as exc:
                self._error(index, op.id, "path", f"{resource.name} {pk}: {exc}")
        if op.method in ("GET", "DELETE"):
            if op.body:
                self._error(index, op.id, "body", f"{op.method} takes no body")
            return None
        if op.body is None or (op.method == "PATCH" and not op.body):
            self._error(index, op.id, "body", f"{op.method} needs a body")
            return None
        for name, value in op.body.items():
            if name not in columns:
                self._error(index, op.id, f"body.{name}",
                            f"{resource.name} has no column {name!r}")
                continue
            try:
                coerce_value(columns[name], value)
            except ValueError as exc:
                self._error(index, op.id, f"body.{name}", str(exc))
        if pk in params and pk in op.body and str(op.body[pk]) != params[pk]:
            self._error(index, op.id, f"body.{pk}", f"{pk} in the body differs from the path")
        if op.method in ("POST", "PUT"):
            for name in resource.required_columns:
                if name not in op.body and not (name == pk and pk in params):
                    self._error(index, op.id, f"body.{name}", "field required")
        return op.body

    def finish(self) -> None:
        if self.error_count:
            message = None
            if self.error_count > len(self.errors):
                message = (f"{self.error_count} validation errors (first {len(self.errors)} "
                           "listed); nothing ran")
            raise ValidationFailed(self.errors, message)


def validate_operations(raw_ops: Iterable[Any], router: Router,
                        max_operations: int) -> list[PlannedOperation]:
    """Validate a whole batch; the planned operations, or ``ValidationFailed`` with all errors."""
    validator = OperationValidator(router, max_operations)
    planned = [validator.check(raw, i) for i, raw in enumerate(raw_ops)]
    validator.finish()
    return [p for p in planned if p is not None]
