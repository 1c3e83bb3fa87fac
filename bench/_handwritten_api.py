"""The seed's reference design, hand-written: the baseline of ``python -m bench.api``.

``POST /batches`` takes ``{operations: [{id?, method, path, body?}]}``, loops over them with an
``asyncio.Semaphore(10)`` and runs each as its own SQL statement and transaction (psycopg2,
autocommit, in a pool of 10 threads with 10 connections), and answers every item's result in
the response: ``200`` when all succeeded, ``207`` otherwise. No batch is stored, nothing is
retried or cached, there is no progress and no async path — the work of the request only.

It serves the same demo resources as batchops' sql target (``users``, ``orders``,
``products``; the tables must exist): ``POST /{resource}`` inserts, ``PUT /{resource}/{id}``
upserts, ``PATCH`` updates, ``DELETE`` deletes, ``GET`` reads.

    BENCH_HANDWRITTEN_DSN="host=... dbname=..." \\
        uvicorn --factory bench._handwritten_api:create_app
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Literal

import psycopg2
import psycopg2.errors
import psycopg2.extras
import psycopg2.pool
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

__all__ = ["CONCURRENCY", "create_app"]

CONCURRENCY = 10
COLUMNS = {
    "users": ("id", "email", "name"),
    "orders": ("id", "status", "total"),
    "products": ("id", "name", "price"),
}


class Operation(BaseModel):
    id: str | None = None
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
    path: str
    body: dict[str, Any] | None = None


class BatchIn(BaseModel):
    operations: list[Operation] = Field(min_length=1, max_length=1000)


class ItemFailed(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _route(op: Operation) -> tuple[str, str | None]:
    parts = [p for p in op.path.split("/") if p]
    if not parts or parts[0] not in COLUMNS or len(parts) > 2:
        raise ItemFailed(404, "unknown_path", f"no resource at {op.path}")
    return parts[0], (parts[1] if len(parts) == 2 else None)


def _fields(table: str, body: dict[str, Any] | None) -> dict[str, Any]:
    body = body or {}
    unknown = set(body) - set(COLUMNS[table])
    if unknown:
        raise ItemFailed(422, "unknown_field", f"not columns of {table}: {sorted(unknown)}")
    return body


def _statement(op: Operation) -> tuple[str, list[Any], int]:
    """SQL, parameters and the success status of one operation (column names come from
    ``COLUMNS`` only, so they are safe to format in)."""
    table, key = _route(op)
    returning = ", ".join(COLUMNS[table])
    if op.method == "POST":
        row = _fields(table, op.body)
        cols = list(row)
        return (f"INSERT INTO {table} ({', '.join(cols)}) VALUES "
                f"({', '.join(['%s'] * len(cols))}) RETURNING {returning}", list(row.values()), 201)
    if key is None:
        raise ItemFailed(405, "method_not_allowed", f"{op.method} needs /{table}/{{id}}")
    if op.method == "GET":
        return f"SELECT {returning} FROM {table} WHERE id = %s", [key], 200
    if op.method == "DELETE":
        return f"DELETE FROM {table} WHERE id = %s RETURNING id", [key], 204
    row = {k: v for k, v in _fields(table, op.body).items() if k != "id"}
    if op.method == "PATCH":
        if not row:
            raise ItemFailed(422, "empty_body", "nothing to update")
        sets = ", ".join(f"{c} = %s" for c in row)
        return (f"UPDATE {table} SET {sets} WHERE id = %s RETURNING {returning}",
                [*row.values(), key], 200)
    cols = ["id", *row]
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in row) or "id = EXCLUDED.id"
    return (f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))}) "
            f"ON CONFLICT (id) DO UPDATE SET {updates} RETURNING {returning}, "
            "(xmax = 0) AS inserted", [key, *row.values()], 200)


def _execute(pool: psycopg2.pool.ThreadedConnectionPool, op: Operation,
             ) -> tuple[int, dict[str, Any] | None]:
    """Run one operation as its own transaction; its HTTP status and row."""
    sql, params, status = _statement(op)
    conn = pool.getconn()
    try:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(sql, params)
            row = cur.fetchone()
    except psycopg2.errors.UniqueViolation as exc:
        raise ItemFailed(409, "unique_violation", str(exc).strip()) from None
    except psycopg2.errors.IntegrityError as exc:
        raise ItemFailed(409, "constraint_violation", str(exc).strip()) from None
    except psycopg2.DataError as exc:
        raise ItemFailed(422, "invalid_value", str(exc).strip()) from None
    finally:
        pool.putconn(conn)
    if row is None:
        raise ItemFailed(404, "not_found", f"{op.path} does not exist")
    if "inserted" in row:
        status = 201 if row.pop("inserted") else 200
    return status, (None if status == 204 else dict(row))


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    dsn = os.environ["BENCH_HANDWRITTEN_DSN"]
    app.state.pool = psycopg2.pool.ThreadedConnectionPool(
        CONCURRENCY, CONCURRENCY, dsn, application_name="bench-handwritten")
    for conn in [app.state.pool.getconn() for _ in range(CONCURRENCY)]:
        conn.autocommit = True  # every statement its own transaction
        app.state.pool.putconn(conn)
    app.state.threads = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="handwritten")
    try:
        yield
    finally:
        app.state.threads.shutdown(wait=True)
        app.state.pool.closeall()


def create_app() -> FastAPI:
    app = FastAPI(title="hand-written batch endpoint", lifespan=_lifespan)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/batches")
    async def create_batch(batch: BatchIn, request: Request) -> JSONResponse:
        pool = request.app.state.pool
        threads = request.app.state.threads
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(CONCURRENCY)

        async def one(index: int, op: Operation) -> dict[str, Any]:
            item: dict[str, Any] = {"id": op.id, "index": index}
            async with slots:
                try:
                    status, row = await loop.run_in_executor(threads, _execute, pool, op)
                except ItemFailed as exc:
                    return {**item, "status": exc.status, "state": "failed",
                            "error": {"code": exc.code, "message": str(exc)}}
            return {**item, "status": status, "state": "succeeded", "result": row}

        results = await asyncio.gather(*(one(i, op) for i, op in enumerate(batch.operations)))
        failed = sum(1 for r in results if r["state"] == "failed")
        body = {"status": "completed",
                "summary": {"total": len(results), "succeeded": len(results) - failed,
                            "failed": failed},
                "results": results}
        return JSONResponse(jsonable_encoder(body), status_code=207 if failed else 200)

    return app
