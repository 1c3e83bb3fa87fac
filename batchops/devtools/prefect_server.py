"""The embedded Prefect server on SQLite, with write transactions that wait their turn.

    python -m batchops.devtools.prefect_server --host 127.0.0.1 --port 4200

Runs ``prefect server start`` (same options) in this process, with one change when the
server's database is SQLite: every transaction Prefect opens to write begins with
``BEGIN IMMEDIATE`` instead of ``BEGIN DEFERRED``.

Why: Prefect creates a flow run in a DEFERRED transaction that reads (the flow's labels)
before it inserts. When another connection commits a write in between, SQLite cannot upgrade
the read to a write (``SQLITE_BUSY_SNAPSHOT``: the busy timeout does not apply), the server
answers ``503 database is locked``, and Prefect's client retries two seconds later. With
several processes writing to one server (the API's sync runs, the runner's polls, the log
worker, the server's own services) about one sync batch in five waited those 2 s. An
IMMEDIATE transaction takes the write lock first and waits for it (up to the busy timeout);
readers are not blocked (WAL). On PostgreSQL nothing changes.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Any


def use_immediate_sqlite_writes() -> bool:
    """Make the server's SQLite write transactions IMMEDIATE; False when not on SQLite."""
    from prefect.server.database import dependencies
    from prefect.server.database.configurations import AioSqliteConfiguration
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = PREFECT_API_DATABASE_CONNECTION_URL.value()
    if not url or not url.startswith("sqlite"):
        return False

    class ImmediateWritesSqliteConfiguration(AioSqliteConfiguration):
        @asynccontextmanager
        async def begin_transaction(
            self, session: Any, with_for_update: bool = False,
        ) -> AsyncGenerator[Any, None]:
            async with super().begin_transaction(session, with_for_update=True) as tx:
                yield tx

    dependencies.MODELS_DEPENDENCIES["database_config"] = ImmediateWritesSqliteConfiguration(
        connection_url=url)
    return True


def command(host: str, port: int) -> list[str]:
    """The command line that starts this server (``make up``, the benches, the tests)."""
    return [sys.executable, "-m", "batchops.devtools.prefect_server", "--host", host,
            "--port", str(port)]


def main(argv: list[str] | None = None) -> None:
    from prefect.cli import app

    use_immediate_sqlite_writes()
    # Prefect's CLI reads sys.argv itself.
    sys.argv = [sys.argv[0], "server", "start", *(sys.argv[1:] if argv is None else argv)]
    app()


if __name__ == "__main__":
    main()
