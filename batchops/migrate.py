"""Alembic, driven from code: ``batchops db upgrade`` and every process that opens the store.

On PostgreSQL the upgrade runs in one transaction holding an advisory lock, so processes that
start at once (API replicas, workers) upgrade one after the other: the first migrates, the
others wait for it and then find the schema current.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, Engine

__all__ = ["MIGRATIONS_DIR", "SCHEMA_LOCK_KEY", "alembic_config", "upgrade"]

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# pg_advisory_xact_lock key of batchops schema changes (any constant unique to this app).
SCHEMA_LOCK_KEY = 0x62617463686F7073 >> 1  # "batchops", as a positive bigint


def alembic_config(engine: Engine, connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolates '%': a socket path or a password holding one is escaped
    url = engine.url.render_as_string(hide_password=False).replace("%", "%%")
    cfg.set_main_option("sqlalchemy.url", url)
    cfg.attributes["engine"] = engine
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: Engine, revision: str = "head",
            then: Callable[[Connection], None] | None = None) -> None:
    """Apply migrations up to ``revision`` (a no-op when the schema is current), then ``then``
    (more schema work, e.g. declared tables) under the same lock."""
    if engine.dialect.name != "postgresql":
        command.upgrade(alembic_config(engine), revision)
        if then is not None:
            with engine.begin() as conn:
                then(conn)
        return
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        command.upgrade(alembic_config(engine, conn), revision)
        if then is not None:
            then(conn)
