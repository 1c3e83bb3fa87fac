"""Engines for the store's and the sql target's databases: one pool per URL in a process, with
the settings each dialect needs (SQLite: threads, WAL, writers that take the lock up front)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

__all__ = ["SQLITE_BUSY_TIMEOUT_MS", "create_engine", "dialect_insert", "read_only",
           "shared_engine"]

SQLITE_BUSY_TIMEOUT_MS = 60_000  # a SQLite writer waits this long for the lock


def create_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with the settings batchops needs for the dialect (SQLite: threads, WAL)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 60}, **kwargs
        )

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let pysqlite not issue BEGIN itself, so SAVEPOINTs work; WAL for readers.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across app crashes
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # Writers take the lock up front (IMMEDIATE): two writers never deadlock on an
            # upgrade from read to write. Readers (``read_only``) do not block anyone in WAL.
            if conn.get_execution_options().get("read_only"):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    # No pre-ping (a round trip per checkout): a connection that died raises, the pool drops
    # it, and the chunk task's retry on connection errors runs the chunk again.
    kwargs.setdefault("pool_recycle", 1800)
    return sa.create_engine(url, **kwargs)


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def shared_engine(url: str) -> Engine:
    """One engine (one pool) per database URL in this process."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = create_engine(url)
        return engine


def read_only(engine: Engine) -> Connection:
    """A connection for reads (on SQLite it does not take the write lock)."""
    return engine.connect().execution_options(read_only=True)


def dialect_insert(conn: Connection) -> Any:
    """The dialect's ``insert`` (it has ``on_conflict_do_nothing``): PostgreSQL's or SQLite's."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert
