"""The python target: registered handler functions, called per item, ``concurrency`` at a time."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from typing import Any

from batchops.errors import ItemError
from batchops.handlers import Handler
from batchops.jsonable import json_value
from batchops.routing import Router
from batchops.schemas import ItemResult, PlannedOperation
from batchops.targets import ChunkContext

__all__ = ["PythonTarget"]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return json_value(value)


class PythonTarget:
    """Calls the handler each item routes to; sync handlers run in worker threads."""

    name = "python"

    def __init__(self, router: Router) -> None:
        self.router = router

    async def execute(self, items: Sequence[PlannedOperation],
                      ctx: ChunkContext) -> list[ItemResult]:
        slots = asyncio.Semaphore(ctx.concurrency)

        async def one(op: PlannedOperation) -> ItemResult:
            async with slots:
                if (stop := ctx.stopped()) is not None:  # cancelled, or past the deadline
                    return stop(op)
                return ctx.item_done(op, await self._call(op))

        return list(await asyncio.gather(*(one(op) for op in items)))

    async def _call(self, op: PlannedOperation) -> ItemResult:
        match = self.router.resolve(op.method, op.path)
        if isinstance(match, str) or match.handler is None:
            return ItemResult.fail(op, 404, "no_handler", f"no handler for {op.method} {op.path}")
        h: Handler = match.handler
        body: Any = op.body or {}
        if h.body_model is not None:
            body = h.body_model.model_validate(body)
        available = {"body": body, "params": match.params, "headers": op.headers or {},
                     "operation": op, **match.params}
        wanted = inspect.signature(h.fn).parameters
        kwargs = {k: v for k, v in available.items() if k in wanted}
        try:
            if h.is_async:
                value = await h.fn(**kwargs)
            else:
                value = await asyncio.to_thread(h.fn, **kwargs)
        except ItemError as exc:
            return ItemResult.fail(op, exc.status, exc.code, exc.message)
        except Exception as exc:
            # A handler bug fails its item, never the batch; the message says what happened.
            return ItemResult.fail(op, 500, "handler_error", f"{type(exc).__name__}: {exc}")
        status = 201 if op.method == "POST" else 204 if op.method == "DELETE" else 200
        return ItemResult.ok(op, status, _jsonable(value))
