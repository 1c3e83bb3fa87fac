"""Fixtures: a real PostgreSQL database and SQLite files, one Prefect test server per session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.services import ensure_postgres, ensure_redis

# Settings for every test process, before Prefect or batchops read them.
os.environ["BATCHOPS_CONFIG_FILE"] = "/nonexistent/batchops.toml"
os.environ.setdefault("BATCHOPS_DEMO", "true")  # the demo tables and handlers the tests use
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_UI_ENABLED", "false")
# Rich wraps CLI output at the terminal's width; long temporary paths must stay on one line.
os.environ["COLUMNS"] = "250"

PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session", autouse=True)
def _services() -> None:
    ensure_postgres()
    ensure_redis()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One Prefect test server (SQLite) for the session; results under a temporary folder."""
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(tmp_path_factory.mktemp("prefect-results"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def pg_database(_services: None) -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    name = f"batchops_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        from batchops.engine import _engines

        for url, engine in list(_engines.items()):
            if name in url:
                engine.dispose()
                _engines.pop(url, None)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _truncate_pg(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        names = [r[0] for r in conn.exec_driver_sql(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename <> 'alembic_version'")]
        if names:
            conn.exec_driver_sql(
                f"TRUNCATE {', '.join(names)} RESTART IDENTITY CASCADE")
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The store's database: a new SQLite file, or the session's PostgreSQL database emptied."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'batchops.db'}"
    else:
        url = request.getfixturevalue("pg_database")
        _truncate_pg(url)
        yield url


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Set ``BATCHOPS_*`` settings for this test and rebuild the runtime from them."""
    from batchops.runtime import get_runtime, reset_runtime

    def apply(**settings: object):  # type: ignore[no-untyped-def]
        for key, value in settings.items():
            monkeypatch.setenv(f"BATCHOPS_{key.upper()}", str(value))
        reset_runtime()
        return get_runtime()

    yield apply
    reset_runtime()


@pytest.fixture
def runtime(configure, database_url: str):  # type: ignore[no-untyped-def]
    """The batchops runtime on the parametrized database (store migrated, demo tables made)."""
    return configure(database_url=database_url)


# The longest test files (one module-scoped topology or many flow runs each), in the order
# they should start. `make test` hands whole files to three workers (--dist loadfile) in
# collection order; a long file collected last would run alone at the end.
LONGEST_FIRST = ("test_scaled.py", "test_dead_letters.py", "test_flow.py",
                 "test_sync_deployments.py", "test_http_target.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file stays
