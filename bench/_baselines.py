"""Hand-written baselines on plain psycopg2, against the same ``users`` table batchops writes.

(a) one ``INSERT … RETURNING`` + ``COMMIT`` per row, catching the unique violation;
(b) asyncio tasks over a pool of connections (each page runs in a thread): pages of 500 rows
    as one ``INSERT … ON CONFLICT DO NOTHING RETURNING`` (``execute_values``), the rows that did
    not come back re-tried one by one in savepoints to get the database's reason;
(c) ``COPY`` of the non-duplicate rows: the machine's ceiling, no conflict handling at all.

Each returns per-item outcomes ``(succeeded, failed)`` counts so the bench checks them.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg2
import psycopg2.errors
import psycopg2.extras

Row = tuple[int, str, str]

INSERT_ONE = "INSERT INTO users (id, email, name) VALUES (%s, %s, %s) RETURNING id, email, name"
INSERT_PAGE = ("INSERT INTO users (id, email, name) VALUES %s "
               "ON CONFLICT DO NOTHING RETURNING id, email, name")


@dataclass
class BaselineRun:
    seconds: float
    rows: int  # rows of input processed in ``seconds``
    succeeded: int
    failed: int
    failure_codes: dict[str, int]


def _outcome(results: Sequence[tuple[bool, object]], seconds: float) -> BaselineRun:
    codes: dict[str, int] = {}
    ok = 0
    for succeeded, detail in results:
        if succeeded:
            ok += 1
        else:
            code = str(detail)
            codes[code] = codes.get(code, 0) + 1
    return BaselineRun(seconds, len(results), ok, len(results) - ok, codes)


def sequential(dsn: str, rows: Sequence[Row]) -> BaselineRun:
    """(a) One INSERT and one COMMIT per row (what a client calling POST /users N times does)."""
    conn = psycopg2.connect(dsn)
    results: list[tuple[bool, object]] = []
    try:
        cur = conn.cursor()
        started = time.perf_counter()
        for row in rows:
            try:
                cur.execute(INSERT_ONE, row)
                got = cur.fetchone()
                conn.commit()
                results.append((True, got))
            except psycopg2.IntegrityError as exc:
                conn.rollback()
                results.append((False, exc.pgcode))
        seconds = time.perf_counter() - started
    finally:
        conn.close()
    return _outcome(results, seconds)


def _insert_page(conn: psycopg2.extensions.connection,
                 page: Sequence[Row]) -> list[tuple[bool, object]]:
    results: list[tuple[bool, object]] = []
    with conn.cursor() as cur:
        got = psycopg2.extras.execute_values(cur, INSERT_PAGE, page, page_size=len(page),
                                             fetch=True)
        inserted = {r[0]: r for r in got}
        for row in page:
            if row[0] in inserted:
                results.append((True, inserted[row[0]]))
                continue
            cur.execute("SAVEPOINT one")
            try:
                cur.execute(INSERT_ONE, row)
                results.append((True, cur.fetchone()))
                cur.execute("RELEASE SAVEPOINT one")
            except psycopg2.IntegrityError as exc:
                cur.execute("ROLLBACK TO SAVEPOINT one")
                message = exc.diag.message_primary
                results.append((False, exc.pgcode if message else "?"))
    conn.commit()
    return results


async def _paged(conns: Sequence[psycopg2.extensions.connection], rows: Sequence[Row],
                 page_size: int) -> list[tuple[bool, object]]:
    pool: asyncio.Queue[psycopg2.extensions.connection] = asyncio.Queue()
    for c in conns:
        pool.put_nowait(c)

    async def one(page: Sequence[Row]) -> list[tuple[bool, object]]:
        conn = await pool.get()
        try:
            return await asyncio.to_thread(_insert_page, conn, page)
        finally:
            pool.put_nowait(conn)

    pages = [rows[i:i + page_size] for i in range(0, len(rows), page_size)]
    done = await asyncio.gather(*(one(p) for p in pages))
    return [r for page in done for r in page]


def paged(dsn: str, rows: Sequence[Row], *, page_size: int = 500,
          concurrency: int = 4) -> BaselineRun:
    """(b) asyncio + multi-row INSERT … ON CONFLICT DO NOTHING RETURNING, savepoint fallback.

    Connections are opened before the clock starts (a pool a service would keep warm).
    """
    conns = [psycopg2.connect(dsn) for _ in range(concurrency)]
    try:
        started = time.perf_counter()
        results = asyncio.run(_paged(conns, rows, page_size))
        seconds = time.perf_counter() - started
    finally:
        for c in conns:
            c.close()
    return _outcome(results, seconds)


def copy_ceiling(dsn: str, rows: Sequence[Row]) -> BaselineRun:
    """(c) COPY the rows into ``users`` (the caller passes the non-duplicate ones)."""
    conn = psycopg2.connect(dsn)
    try:
        started = time.perf_counter()
        buf = io.StringIO()
        for rid, email, name in rows:
            buf.write(f"{rid}\t{email}\t{name}\n")
        buf.seek(0)
        with conn.cursor() as cur:
            cur.copy_expert("COPY users (id, email, name) FROM STDIN", buf)
        conn.commit()
        seconds = time.perf_counter() - started
    finally:
        conn.close()
    return BaselineRun(seconds, len(rows), len(rows), 0, {})
