"""Validate every operation before any runs, and report every problem at once.

Dependencies (``depends_on`` ids and ``$ref`` values, see :mod:`batchops.references`) must
name operations earlier in the batch: a batch runs in its order, which is also the order the
planner keeps for operations on one record. Unknown ids, later ids and cycles are errors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from batchops.errors import BatchTooLarge, FieldError, ValidationFailed
from batchops.references import Location, find_references
from batchops.resources import Resource
from batchops.routing import SQL_TARGET, Router, check_path
from batchops.schemas import Operation, PlannedOperation, payload_hash

__all__ = ["OperationValidator", "validate_operations"]

# A report with a million errors helps nobody; the count says how many more there were.
MAX_REPORTED_ERRORS = 1000
# An id longer than an id may be is shown cut in errors (a 100,000-character id once).
MAX_SHOWN_ID = 200


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
        self._ids: dict[str, int] = {}  # id → index of the operation that has it
        self._keys: dict[str, str] = {}
        # Dependency edges by operation id, and the ones that name no earlier operation:
        # (index, id, field, dependency id), judged in finish() once every id is known.
        self._edges: dict[str, list[str]] = {}
        self._unresolved: list[tuple[int, str | None, str, str]] = []

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
                shown = None if op_id is None else _shown_id(op_id)
                for err in exc.errors(include_url=False):
                    self._error(index, shown, _loc(err["loc"]), err["msg"])
                return None
        before = self.error_count
        if op.id is not None:
            if op.id in self._ids:
                self._error(index, op.id, "id", f"duplicate id {op.id!r} in this batch")
            self._ids.setdefault(op.id, index)
        depends_on, refs = self._check_dependencies(op, index)
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
            body = self._check_sql(resource, op, match.params, index, refs)
        elif match.handler is not None and match.handler.body_model is not None:
            try:
                match.handler.body_model.model_validate(op.body or {})
            except ValidationError as exc:
                for err in exc.errors(include_url=False):
                    if not _under_ref(err["loc"], refs):  # checked once resolved
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
            depends_on=depends_on,
        )

    def _check_dependencies(self, op: Operation, index: int) -> tuple[list[int], set[Location]]:
        """Indexes of the earlier operations ``op`` depends on, and where its ``$ref``s are."""
        named = [(dep, "depends_on") for dep in op.depends_on or ()]
        refs: set[Location] = set()
        if op.body:
            for loc, ref in find_references(op.body):
                field = _loc(("body", *loc))
                if isinstance(ref, str):
                    self._error(index, op.id, field, ref)
                    continue
                refs.add(loc)
                named.append((ref.op_id, field))
        deps: set[int] = set()
        for dep, field in named:
            if dep == op.id:
                self._error(index, op.id, field, f"dependency cycle: {dep!r} depends on itself")
                continue
            if op.id is not None:
                self._edges.setdefault(op.id, []).append(dep)
            earlier = self._ids.get(dep)
            if earlier is not None and earlier < index:
                deps.add(earlier)
            else:
                self._unresolved.append((index, op.id, field, dep))
        return sorted(deps), refs

    def _dependency_errors(self) -> None:
        cyclic = _on_cycles(self._edges)
        for index, op_id, field, dep in self._unresolved:
            if dep not in self._ids:
                self._error(index, op_id, field, f"depends on {dep!r}: no operation has that id")
            elif op_id is not None and cyclic.get(op_id, -1) == cyclic.get(dep, -2):
                path = " → ".join(repr(n) for n in _cycle_path(self._edges, op_id, dep))
                self._error(index, op_id, field, f"dependency cycle: {path}")
            else:
                self._error(index, op_id, field,
                            f"depends on {dep!r}, which comes later in the batch; an operation "
                            "runs after its dependencies, so list them before it")

    def _check_sql(self, resource: Resource, op: Operation, params: dict[str, str],
                   index: int, refs: set[Location]) -> dict[str, Any] | None:
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
        if () in refs:
            return op.body  # the whole body is a $ref: checked once resolved
        for name, value in op.body.items():
            if name not in columns:
                self._error(index, op.id, f"body.{name}",
                            f"{resource.name} has no column {name!r}")
                continue
            if (name,) in refs:
                continue  # a $ref: its value is checked once resolved, before the item runs
            try:
                resource.coerce_column(name, value)
            except ValueError as exc:
                self._error(index, op.id, f"body.{name}", str(exc))
        if (pk in params and pk in op.body and (pk,) not in refs
                and str(op.body[pk]) != params[pk]):
            self._error(index, op.id, f"body.{pk}", f"{pk} in the body differs from the path")
        if op.method in ("POST", "PUT"):
            for name in resource.required_columns:
                if name not in op.body and not (name == pk and pk in params):
                    self._error(index, op.id, f"body.{name}", "field required")
        return op.body

    def finish(self) -> None:
        if self._unresolved:
            self._dependency_errors()
            self.errors.sort(key=lambda e: -1 if e.index is None else e.index)
        if self.error_count:
            message = None
            if self.error_count > len(self.errors):
                message = (f"{self.error_count} validation errors (first {len(self.errors)} "
                           "listed); nothing ran")
            raise ValidationFailed(self.errors, message)


def _shown_id(op_id: Any) -> str:
    """An invalid operation's id as an error names it: cut when it is over the id limit."""
    text = str(op_id) if isinstance(op_id, str | int | float) else repr(op_id)
    if len(text) <= MAX_SHOWN_ID:
        return text
    return f"{text[:MAX_SHOWN_ID // 2]}… ({len(text)} characters)"


def _under_ref(loc: Sequence[int | str], refs: set[Location]) -> bool:
    return any(tuple(loc[:len(ref)]) == ref for ref in refs)


def _on_cycles(edges: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """The strongly connected component of every id on a cycle (Tarjan's, iteratively)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    component: dict[str, int] = {}
    for root in edges:
        if root in order:
            continue
        order[root] = low[root] = len(order)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(edges.get(root, ())))]
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in order:
                    order[nxt] = low[nxt] = len(order)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(edges.get(nxt, ()))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], order[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == order[node]:
                    members = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        members.append(member)
                        if member == node:
                            break
                    if len(members) > 1:
                        number = len(component)
                        component.update((m, number) for m in members)
    return component


def _cycle_path(edges: Mapping[str, Sequence[str]], start: str, dep: str) -> list[str]:
    """``start → dep → … → start``: the shortest way back from ``dep`` (breadth first)."""
    came_from: dict[str, str] = {dep: start}
    queue = deque([dep])
    while queue:
        node = queue.popleft()
        if node == start:
            break
        for nxt in edges.get(node, ()):
            if nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    path = [start]
    node = came_from.get(start, dep)
    while node != start:
        path.append(node)
        node = came_from[node]
    return [start, *reversed(path[1:]), start]


def validate_operations(raw_ops: Iterable[Any], router: Router,
                        max_operations: int) -> list[PlannedOperation]:
    """Validate a whole batch; the planned operations, or ``ValidationFailed`` with all errors."""
    validator = OperationValidator(router, max_operations)
    planned = [validator.check(raw, i) for i, raw in enumerate(raw_ops)]
    validator.finish()
    return [p for p in planned if p is not None]
