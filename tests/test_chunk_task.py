"""The chunk task's retry condition and cache key."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from prefect.states import Failed

from batchops.errors import TransientError
from batchops.schemas import ChunkRef
from tasks.chunks import chunk_cache_key, retry_transient_failures


def _failed_with(exc: BaseException) -> Any:
    return Failed(data=exc, message=str(exc))


def test_connection_errors_are_retried_and_other_failures_are_not() -> None:
    lost = sa.exc.OperationalError("INSERT", {}, Exception("server closed the connection"))
    conflict = sa.exc.IntegrityError("INSERT", {}, Exception("duplicate key"))
    assert retry_transient_failures(None, None, _failed_with(lost))  # type: ignore[arg-type]
    assert retry_transient_failures(None, None,  # type: ignore[arg-type]
                                    _failed_with(TransientError("database unavailable")))
    assert not retry_transient_failures(None, None, _failed_with(conflict))  # type: ignore[arg-type]
    assert not retry_transient_failures(None, None,  # type: ignore[arg-type]
                                        _failed_with(ValueError("a bug")))


def test_cache_key_names_the_batch_the_chunk_its_keys_and_the_generation() -> None:
    ref = ChunkRef(batch_id="b1", chunk_index=3, start=1500, end=2000, cache_token="abc")
    key = chunk_cache_key(None, {"ref": ref, "generation": 2})  # type: ignore[arg-type]
    assert key == "batchops-chunk-b1-3-abc-g2"
    other = ref.model_copy(update={"cache_token": "abd"})
    assert chunk_cache_key(None, {"ref": other, "generation": 2}) != key  # type: ignore[arg-type]


def _write_error(engine: sa.Engine, setup: str | None = None) -> sa.exc.DBAPIError:
    """The error a real database raises for a write it refuses."""
    try:
        with engine.begin() as conn:
            if setup:
                conn.exec_driver_sql(setup)
            conn.exec_driver_sql("UPDATE refused SET id = id")
    except sa.exc.DBAPIError as exc:
        return exc
    raise AssertionError("the write went through")


def test_a_store_refusing_writes_for_now_is_retried(pg_database: str, tmp_path: Any) -> None:
    pg = sa.create_engine(pg_database)
    path = tmp_path / "store.db"
    sqlite = sa.create_engine(f"sqlite:///{path}")
    try:
        for engine in (pg, sqlite):
            with engine.begin() as conn:
                conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS refused (id integer)")
        # A PostgreSQL replica, a failover under way, default_transaction_read_only: 25006.
        read_only_pg = _write_error(pg, "SET TRANSACTION READ ONLY")
        # A SQLite file that cannot be written (read-only mount, immutable file).
        read_only_sqlite = _write_error(
            sa.create_engine(f"sqlite:///file:{path}?mode=ro&uri=true"))
    finally:
        with pg.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS refused")
        pg.dispose()
    assert "read-only transaction" in str(read_only_pg)
    assert "readonly database" in str(read_only_sqlite)
    for exc in (read_only_pg, read_only_sqlite):
        assert retry_transient_failures(None, None, _failed_with(exc))  # type: ignore[arg-type]
