"""Alembic, driven from code: ``batchops db upgrade`` and every process that opens the store.

On PostgreSQL the upgrade runs in one transaction holding an advisory lock, so processes that
start at once (API replicas, workers) upgrade one after the other: the first migrates, the
others wait for it and then find the schema current.

A process whose store is already current (the usual start: a CLI command, a worker) learns
that from :func:`is_current` — the version row and the tables, a few queries — without
importing Alembic (~0.2 s of every CLI command's start-up).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = ["MIGRATIONS_DIR", "SCHEMA_LOCK_KEY", "alembic_config", "head_revision",
           "is_current", "upgrade"]

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# pg_advisory_xact_lock key of batchops schema changes (any constant unique to this app).
SCHEMA_LOCK_KEY = 0x62617463686F7073 >> 1  # "batchops", as a positive bigint


_REVISION = re.compile(r"^revision\s*=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)
_DOWN_REVISION = re.compile(r"^down_revision\s*=(.*)$", re.MULTILINE)
_QUOTED = re.compile(r"['\"]([^'\"]+)['\"]")


@functools.cache
def head_revision() -> str | None:
    """The newest migration's revision, from the ``revision`` and ``down_revision`` lines of
    the files in :data:`MIGRATIONS_DIR`: the one revision no other file names as its parent.
    ``None`` when that is not exactly one (Alembic then decides)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        revision = _REVISION.search(text)
        if revision is None:
            continue
        revisions.add(revision.group(1))
        down = _DOWN_REVISION.search(text)
        if down is not None:
            parents.update(_QUOTED.findall(down.group(1)))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def is_current(engine: Engine, tables: Sequence[sa.Table] = ()) -> bool:
    """Whether the store's schema is at :func:`head_revision` and ``tables`` exist in it
    (then :func:`upgrade` has nothing to do)."""
    head = head_revision()
    if head is None:
        return False
    with engine.connect() as conn:
        try:
            versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars()
            if list(versions) != [head]:
                return False
        except sa.exc.DBAPIError:  # no alembic_version table: a new store
            return False
        inspector = sa.inspect(conn)
        return all(inspector.has_table(t.name, schema=t.schema) for t in tables)


def alembic_config(engine: Engine, connection: Connection | None = None) -> Config:
    from alembic.config import Config

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
    from alembic import command

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
