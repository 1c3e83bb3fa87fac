"""A store that refuses writes for a while: readiness says so, batches recover by themselves.

The outage is a real read-only PostgreSQL database (``default_transaction_read_only`` on the
test's own database, its sessions ended so new ones are read-only) for readiness, and, for
the batches, statement triggers that answer every write of the store's tables with
PostgreSQL's read-only error (tests.faults) — the same SQLSTATE, without killing the
connections of the run under test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID

import httpx
import pytest
import sqlalchemy as sa
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from batchops.engine import shared_engine
from batchops.registration import register_batch
from batchops.runtime import Runtime
from batchops.schemas import BatchState, ItemState
from flows.process_batch import process_batch
from flows.reaper import reap_stale_batches
from tests.conftest import PG_ADMIN_URL, _truncate_pg
from tests.faults import allow_writes, refuse_writes, refused_writes, remove_write_refusal
from tests.test_api import assert_error, deployment_runner, start_api  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("prefect_server")


class StoreOutage:
    """Every table of the store but ``batches`` refuses writes from :meth:`start` until
    :meth:`end` (the batch's own row stays writable: a store refusing writes at the very start
    of a run leaves its batch queued, another story)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.tables: list[str] = []

    def start(self) -> None:
        with self.runtime.store.engine.begin() as conn:
            self.tables = [r[0] for r in conn.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename "
                "NOT IN ('alembic_version', 'batches', 'write_refusal')")]
            refuse_writes(conn, self.tables)

    def end(self, after: float = 0.0) -> threading.Thread:
        """End it ``after`` seconds past the first write it refused (in a thread, joined by the
        caller)."""
        def later() -> None:
            deadline = time.monotonic() + 120
            while after and time.monotonic() < deadline:
                with self.runtime.store.engine.connect() as conn:
                    if refused_writes(conn):
                        break
                time.sleep(0.01)
            time.sleep(after)
            with self.runtime.store.engine.begin() as conn:
                allow_writes(conn)

        thread = threading.Thread(target=later)
        thread.start()
        return thread


@pytest.fixture
def outage(configure: Callable[..., Runtime], pg_database: str,
           ) -> Iterator[Callable[..., StoreOutage]]:
    """``outage(**settings)``: the runtime on the emptied PostgreSQL database, and an outage
    of its store to start and end."""
    _truncate_pg(pg_database)
    made: list[StoreOutage] = []

    def make(**settings: Any) -> StoreOutage:
        made.append(StoreOutage(configure(database_url=pg_database, **settings)))
        return made[-1]

    yield make
    for each in made:
        with each.runtime.store.engine.begin() as conn:
            remove_write_refusal(conn, each.tables)


def _users(n: int) -> list[dict[str, Any]]:
    return [{"method": "POST", "path": "/users", "body": {"id": i, "email": f"u{i}@x.io"}}
            for i in range(n)]


def _assert_every_user_written_once(runtime: Runtime, batch_id: str, n: int) -> None:
    status = runtime.store.status(batch_id)
    assert (status.status, status.total, status.completed, status.succeeded, status.failed) == (
        BatchState.COMPLETED, n, n, n, 0)
    results = list(runtime.store.results.of_batch(batch_id))
    assert [(r.index, r.status, r.state) for r in results] == [
        (i, 201, ItemState.SUCCEEDED) for i in range(n)]
    with runtime.store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, email FROM users ORDER BY id")).all()
    assert rows == [(i, f"u{i}@x.io") for i in range(n)]


def _chunk_run_counts(flow_run_id: str) -> list[int]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[UUID(flow_run_id)])), limit=100)
    return [r.run_count for r in runs if r.name.startswith("chunk")]


def test_a_sql_batch_run_while_the_store_refuses_writes_completes_exactly(
        outage: Callable[..., StoreOutage]) -> None:
    # The chunks meet a 2 s outage; four retries wait about 0.5 + 1 + 2 + 4 s (jittered).
    store = outage(chunk_size=100, chunk_retries=4, chunk_retry_backoff_seconds=0.5)
    runtime = store.runtime
    batch_id, _ = register_batch(runtime, _users(1000))
    store.start()
    ending = store.end(after=2.0)

    state = process_batch(batch_id=batch_id, return_state=True)
    ending.join()

    assert state.is_completed(), state.message
    _assert_every_user_written_once(runtime, batch_id, 1000)
    # The chunks did meet the outage: they were retried.
    assert max(_chunk_run_counts(runtime.store.get_batch(batch_id).flow_run_id or "")) > 1


def test_an_outage_longer_than_the_retries_leaves_the_batch_to_the_reaper(
        outage: Callable[..., StoreOutage], deployment_runner: str) -> None:  # noqa: F811
    store = outage(chunk_size=100, chunk_retries=0)
    runtime = store.runtime
    batch_id, _ = register_batch(runtime, _users(300))
    store.start()

    state = process_batch(batch_id=batch_id, return_state=True)

    assert state.is_failed()
    batch = runtime.store.get_batch(batch_id)
    # Not failed with items that have no result: processing, with why, for the reaper.
    assert batch.status == BatchState.PROCESSING.value
    assert "read-only transaction" in (batch.error or "") and batch.completed == 0
    store.end().join()

    time.sleep(0.3)
    assert reap_stale_batches(stale_after_seconds=0.2) == [batch_id]
    deadline = time.monotonic() + 90
    while runtime.store.get_batch(batch_id).status != BatchState.COMPLETED.value:
        assert time.monotonic() < deadline, runtime.store.get_batch(batch_id)
        time.sleep(0.2)
    _assert_every_user_written_once(runtime, batch_id, 300)


_BUG_SQL = """
CREATE OR REPLACE FUNCTION users_bug() RETURNS trigger AS $$
BEGIN
  IF NEW.id BETWEEN 100 AND 109 THEN
    RAISE EXCEPTION 'users_bug: not a passing outage';
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER users_bug BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION users_bug();
"""


def test_a_chunk_that_fails_for_good_records_its_items_failed_and_a_retry_runs_them(
        outage: Callable[..., StoreOutage]) -> None:
    runtime = outage(chunk_size=100, chunk_retries=1, chunk_retry_backoff_seconds=0).runtime
    with runtime.store.engine.begin() as conn:
        conn.exec_driver_sql(_BUG_SQL)
    try:
        batch_id, _ = register_batch(runtime, _users(300))
        state = process_batch(batch_id=batch_id, return_state=True)

        assert state.is_failed()
        status = runtime.store.status(batch_id)
        # Failed, and every item says what became of it: chunk 1's are failed, not missing.
        assert (status.status, status.completed, status.succeeded, status.failed) == (
            BatchState.FAILED, 300, 200, 100)
        results = list(runtime.store.results.of_batch(batch_id))
        assert [r.index for r in results] == list(range(300))
        broken = [r for r in results if r.state is ItemState.FAILED]
        assert [r.index for r in broken] == list(range(100, 200))
        assert {(r.status, r.error.code if r.error else None) for r in broken} == {
            (500, "chunk_failed")}
        assert "users_bug" in (broken[0].error.message if broken[0].error else "")
    finally:
        with runtime.store.engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER users_bug ON users")

    assert runtime.lifecycle.retry(batch_id) == 100
    assert process_batch(batch_id=batch_id, return_state=True).is_completed()
    _assert_every_user_written_once(runtime, batch_id, 300)


@pytest.fixture
def read_only_database(pg_database: str) -> Iterator[Callable[[bool], None]]:
    """``read_only(True)``: the test's own database becomes read-only for new sessions and
    its sessions are ended (as in a failover to a replica); ``read_only(False)`` undoes it."""
    name = pg_database.rsplit("/", 1)[1]
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")

    def read_only(on: bool) -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" '
                                 + ("SET default_transaction_read_only = on" if on
                                    else "RESET default_transaction_read_only"))
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = :name AND pid <> pg_backend_pid()"),
                         {"name": name})

    yield read_only
    read_only(False)
    admin.dispose()
    shared_engine(pg_database).dispose()  # its connections were ended: the next test's are new


def test_readiness_fails_while_the_store_is_read_only(
        start_api: Callable[..., httpx.Client],  # noqa: F811
        read_only_database: Callable[[bool], None], pg_database: str) -> None:
    _truncate_pg(pg_database)
    api = start_api(database_url=pg_database)
    assert api.get("/readyz").status_code == 200

    read_only_database(True)
    try:
        # The first probe may meet a connection ended with the sessions; then the read-only one.
        error = _ready_until(api, lambda r: "read-only" in r.text, 503)
        assert_error(error, 503, "not_ready")
        body = error.json()["error"]
        assert "store" in body["message"] and body["checks"]["prefect"] == "ok"
        assert "read-only transaction" in body["checks"]["store"]
        assert api.get("/healthz").status_code == 200  # alive: it is the store that is not
    finally:
        read_only_database(False)
    ready = _ready_until(api, lambda r: r.status_code == 200, 200)
    assert ready.json()["status"] == "ready"


def _ready_until(api: httpx.Client, done: Callable[[httpx.Response], bool],
                 status: int) -> httpx.Response:
    deadline = time.monotonic() + 20
    while True:
        answer = api.get("/readyz")
        if done(answer) or time.monotonic() > deadline:
            assert answer.status_code == status, answer.text
            return answer
        time.sleep(0.1)


def test_the_readiness_probe_refuses_a_read_only_sqlite_file_but_not_a_busy_one(
        tmp_path: Any) -> None:
    from batchops.engine import create_engine
    from batchops.errors import TransientError
    from batchops.store import Store

    path = tmp_path / "store.db"
    store = Store(f"sqlite:///{path}", engine=create_engine(f"sqlite:///{path}"))
    store.migrate()
    store.check_writable()
    # Another writer holds the lock: the file is writable, so the store is ready (in ~1 s).
    with store.engine.begin() as busy:
        busy.exec_driver_sql("UPDATE batches SET status = status")
        started = time.monotonic()
        store.check_writable()
        assert 0.9 < time.monotonic() - started < 5  # it waited for the lock, then said ready
    read_only = sa.create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    with pytest.raises(TransientError, match="refuses writes: attempt to write a readonly"):
        Store(f"sqlite:///{path}", engine=read_only).check_writable()
    read_only.dispose()
    store.engine.dispose()
