"""Bulk syncs, retry-failed, and the deployments that serve them.

Real Prefect test server, real PostgreSQL and SQLite; the deployments are served by a runner
subprocess, as ``batchops serve`` does.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import pytest
import sqlalchemy as sa
import yaml

from batchops.registration import register_batch
from batchops.runtime import Runtime
from batchops.schemas import BatchState, ItemState
from batchops.sync import BulkSync, read_sync_state
from flows.bulk_sync import bulk_sync
from flows.process_batch import process_batch
from tests.faults import arm_user_insert_fault, disarm_fault, remove_fault
from tests.runner import serving_deployments

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

pytestmark = pytest.mark.usefixtures("prefect_server")

REPO = Path(__file__).resolve().parent.parent
BASE = datetime(2026, 1, 1, tzinfo=UTC)

Configure = Callable[..., Runtime]


# -- helpers -----------------------------------------------------------------------------------


def _source_table(name: str) -> sa.Table:
    return sa.Table(
        name, sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", sa.Text),
        sa.Column("name", sa.Text),
        sa.Column("updated_at", sa.DateTime(timezone=True), index=True),
    )


def write_source(url: str, rows: list[dict[str, Any]], table: str = "source_users") -> None:
    """Create (or empty) the source table and insert ``rows``."""
    engine = sa.create_engine(url)
    source = _source_table(table)
    source.create(engine, checkfirst=True)
    with engine.begin() as conn:
        conn.execute(source.delete())
        conn.execute(source.insert(), rows)
    engine.dispose()


def update_source(url: str, ids: list[int], at: datetime, table: str = "source_users") -> None:
    engine = sa.create_engine(url)
    source = _source_table(table)
    with engine.begin() as conn:
        for i in ids:
            conn.execute(source.update().where(source.c.id == i).values(
                name=f"Renamed {i}", updated_at=at))
    engine.dispose()


def people(ids: range) -> list[dict[str, Any]]:
    """Source rows; 200 rows share each ``updated_at`` value, so batches end among ties."""
    return [{"id": i, "email": f"user{i}@example.com", "name": f"User {i}",
             "updated_at": BASE + timedelta(seconds=i // 200)} for i in ids]


def syncs(**specs: dict[str, Any]) -> str:
    return json.dumps(specs)


def query(runtime: Runtime, sql: str) -> list[tuple[Any, ...]]:
    with runtime.store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(sql))]


def sync_batches(runtime: Runtime) -> list[str]:
    return [r[0] for r in query(runtime, "SELECT id FROM batches WHERE source = 'sync' "
                                         "ORDER BY created_at")]


def cursor_of(watermark: dict[str, Any] | None) -> datetime:
    assert watermark is not None
    value = datetime.fromisoformat(watermark["cursor"])
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite keeps no zone


@pytest.fixture
def source_url(database_url: str, tmp_path: Path) -> str:
    """Beside a SQLite store, a source in its own SQLite file; beside PostgreSQL, a table in
    the store's database."""
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'source.db'}"
    return database_url


# -- bulk sync from a table --------------------------------------------------------------------


def test_sync_applies_changed_rows_once_and_moves_the_watermark(
        configure: Configure, database_url: str, source_url: str) -> None:
    write_source(source_url, people(range(1, 2001)))
    runtime = configure(database_url=database_url, syncs=syncs(users={
        "resource": "users", "table": "source_users", "source_url": source_url,
        "batch_rows": 1000}))

    [first] = bulk_sync("users")

    assert (first.rows, first.succeeded, first.failed, len(first.batches)) == (2000, 2000, 0, 2)
    # The first batch ends at id 1000, among the 200 rows that share its updated_at.
    assert [query(runtime, f"SELECT total, status FROM batches WHERE id = '{b}'")[0]
            for b in first.batches] == [(1000, "completed"), (1000, "completed")]
    assert query(runtime, "SELECT id, email, name FROM users ORDER BY id") == [
        (i, f"user{i}@example.com", f"User {i}") for i in range(1, 2001)]
    assert first.watermark is not None and first.watermark["key"] == 2000
    assert cursor_of(first.watermark) == BASE + timedelta(seconds=10)
    state = read_sync_state(runtime.store, "users")
    assert (state.pending_batch_id, state.rows_synced) == (None, 2000)

    [second] = bulk_sync("users")

    assert (second.rows, second.batches, second.watermark) == (0, [], first.watermark)
    assert len(sync_batches(runtime)) == 2

    changed = [5, 199, 200, 801, 999, 1000, 1500, 1777, 1999, 2000]
    update_source(source_url, changed, BASE + timedelta(hours=1))
    [third] = bulk_sync("users")

    assert (third.rows, third.succeeded, len(third.batches)) == (10, 10, 1)
    results = list(runtime.store.results.of_batch(third.batches[0]))
    assert [(r.id, r.status) for r in results] == [(str(i), 200) for i in changed]  # updates
    assert query(runtime, "SELECT id FROM users WHERE name LIKE 'Renamed%' ORDER BY id") == [
        (i,) for i in changed]
    assert third.watermark is not None and third.watermark["key"] == 2000
    assert cursor_of(third.watermark) == BASE + timedelta(hours=1)
    assert read_sync_state(runtime.store, "users").rows_synced == 2010


@pytest.fixture
def faulty_pg(configure: Configure, pg_database: str) -> Iterator[Runtime]:
    from tests.conftest import _truncate_pg

    _truncate_pg(pg_database)
    write_source(pg_database, people(range(1, 2001)))
    # chunks of 500 (not sized by work): the fault halfway leaves some chunks completed
    runtime = configure(database_url=pg_database, chunk_retries=0, chunk_size=500,
                        syncs=syncs(users={"resource": "users", "table": "source_users"}))
    with runtime.store.engine.begin() as conn:
        arm_user_insert_fault(conn)
    yield runtime
    with runtime.store.engine.begin() as conn:
        remove_fault(conn)


def test_a_run_that_fails_halfway_is_resumed_without_a_second_batch(faulty_pg: Runtime) -> None:
    runtime = faulty_pg

    crashed = bulk_sync("users", return_state=True)

    assert crashed.is_failed()
    state = read_sync_state(runtime.store, "users")
    assert state.watermark is None and state.pending_batch_id is not None
    batch = runtime.store.get_batch(state.pending_batch_id)
    # A lost connection is transient: left processing (the reaper, or this sync, resumes it).
    assert batch.status == BatchState.PROCESSING.value and 0 < batch.completed < 2000
    assert query(runtime, "SELECT count(*) FROM users")[0][0] == batch.completed

    with runtime.store.engine.begin() as conn:
        disarm_fault(conn)
    [resumed] = bulk_sync("users")

    assert resumed.batches == [state.pending_batch_id]
    assert sync_batches(runtime) == [state.pending_batch_id]
    assert (resumed.rows, resumed.succeeded, resumed.failed) == (2000, 2000, 0)
    # Every item created its row: none ran twice (a second PUT would have answered 200).
    assert {r.status for r in runtime.store.results.of_batch(batch.id)} == {201}
    assert query(runtime, "SELECT count(*), min(id), max(id) FROM users")[0] == (2000, 1, 2000)
    assert resumed.watermark is not None and resumed.watermark["key"] == 2000
    assert bulk_sync("users")[0].rows == 0


# -- bulk sync at scale: 100,000 rows on PostgreSQL ---------------------------------------------

ROWS_100K = 100_000
# The 1,000 rows changed after the first sync, in the order the sync reads them (one cursor
# value, then id): the first 500 fill the batch's first chunk; the second chunk starts with
# users 1200-1209, which tests.faults refuses while armed, so the run crashes halfway.
CHANGED_1K = [*range(2, 1001, 2), *range(1200, 1210), *range(2000, 100_001, 200)[:490]]

_APPLIED_SQL = """
CREATE TABLE applied_changes (id integer NOT NULL);
CREATE FUNCTION record_applied_change() RETURNS trigger AS $$
BEGIN INSERT INTO applied_changes VALUES (NEW.id); RETURN NEW; END $$ LANGUAGE plpgsql;
CREATE TRIGGER users_applied AFTER UPDATE ON users FOR EACH ROW
  EXECUTE FUNCTION record_applied_change();
"""


def table_checksum(runtime: Runtime, table: str) -> tuple[int, str]:
    """Row count and an md5 of every ``(id, email, name)`` in id order."""
    [(count, digest)] = query(
        runtime, f"SELECT count(*), md5(string_agg(id || '|' || email || '|' || name, ',' "
                 f"ORDER BY id)) FROM {table}")
    return count, digest


@pytest.fixture
def source_100k(configure: Configure, pg_database: str) -> Iterator[Runtime]:
    """100,000 source rows in the store's PostgreSQL database; batches of 25,000 rows."""
    from tests.conftest import _truncate_pg

    _truncate_pg(pg_database)
    write_source(pg_database, people(range(1, ROWS_100K + 1)))
    runtime = configure(database_url=pg_database, chunk_retries=0, chunk_size=500, syncs=syncs(
        users={"resource": "users", "table": "source_users", "batch_rows": 25_000}))
    yield runtime
    with runtime.store.engine.begin() as conn:
        remove_fault(conn)
        conn.exec_driver_sql("DROP TRIGGER IF EXISTS users_applied ON users; "
                             "DROP FUNCTION IF EXISTS record_applied_change(); "
                             "DROP TABLE IF EXISTS applied_changes")


@pytest.mark.postgres
def test_a_100k_row_sync_applies_once_skips_no_change_and_resumes_a_crash(
        source_100k: Runtime) -> None:
    runtime = source_100k

    [first] = bulk_sync("users")

    assert (first.rows, first.succeeded, first.failed) == (ROWS_100K, ROWS_100K, 0)
    assert [query(runtime, f"SELECT total, status FROM batches WHERE id = '{b}'")[0]
            for b in first.batches] == [(25_000, "completed")] * 4
    assert table_checksum(runtime, "users") == table_checksum(runtime, "source_users")
    assert first.watermark is not None and first.watermark["key"] == ROWS_100K
    assert cursor_of(first.watermark) == BASE + timedelta(seconds=ROWS_100K // 200)
    assert read_sync_state(runtime.store, "users").rows_synced == ROWS_100K

    [unchanged] = bulk_sync("users")

    assert (unchanged.rows, unchanged.batches, unchanged.watermark) == (0, [], first.watermark)
    assert sync_batches(runtime) == first.batches

    changed_at = BASE + timedelta(hours=1)
    update_source(runtime.settings.database_url, CHANGED_1K, changed_at)
    with runtime.store.engine.begin() as conn:
        conn.exec_driver_sql(_APPLIED_SQL)  # every row write to users from here on
        arm_user_insert_fault(conn)

    crashed = bulk_sync("users", return_state=True)

    assert crashed.is_failed()
    state = read_sync_state(runtime.store, "users")
    assert state.watermark == first.watermark and state.pending_batch_id is not None
    batch = runtime.store.get_batch(state.pending_batch_id)
    assert (batch.status, batch.total, batch.completed) == (
        BatchState.PROCESSING.value, 1000, 500)
    assert query(runtime, "SELECT id FROM applied_changes ORDER BY id") == [
        (i,) for i in CHANGED_1K[:500]]

    with runtime.store.engine.begin() as conn:
        disarm_fault(conn)
    [resumed] = bulk_sync("users")

    assert resumed.batches == [state.pending_batch_id]
    assert (resumed.rows, resumed.succeeded, resumed.failed) == (1000, 1000, 0)
    assert sync_batches(runtime) == [*first.batches, state.pending_batch_id]
    # Every change was written to the target exactly once: the first chunk was not run again.
    assert query(runtime, "SELECT id, count(*) FROM applied_changes GROUP BY id ORDER BY id"
                 ) == [(i, 1) for i in sorted(CHANGED_1K)]
    assert [(r.id, r.status) for r in runtime.store.results.of_batch(batch.id)] == [
        (str(i), 200) for i in CHANGED_1K]
    assert query(runtime, "SELECT id FROM users WHERE name LIKE 'Renamed%' ORDER BY id") == [
        (i,) for i in sorted(CHANGED_1K)]
    assert table_checksum(runtime, "users") == table_checksum(runtime, "source_users")
    assert resumed.watermark is not None and resumed.watermark["key"] == CHANGED_1K[-1]
    assert cursor_of(resumed.watermark) == changed_at
    assert read_sync_state(runtime.store, "users").rows_synced == ROWS_100K + 1000
    assert bulk_sync("users")[0].batches == []


def test_a_run_that_stopped_before_processing_or_registering_is_finished_next_time(
        configure: Configure, tmp_path: Path) -> None:
    source_url = f"sqlite:///{tmp_path / 'source.db'}"
    write_source(source_url, people(range(1, 101)))
    runtime = configure(database_url=f"sqlite:///{tmp_path / 'store.db'}", syncs=syncs(users={
        "resource": "users", "table": "source_users", "source_url": source_url}))

    # A run that registered its batch and stopped before running it.
    registered = BulkSync(runtime, "users").next_batch()
    assert registered is not None and registered.total == 100
    [summary] = bulk_sync("users")
    assert (summary.batches, summary.rows) == ([registered.batch_id], 100)
    assert query(runtime, "SELECT count(*) FROM users")[0][0] == 100

    # A run that fixed its range and stopped before its batch was stored.
    update_source(source_url, [3, 4, 5], BASE + timedelta(hours=1))
    fixed = BulkSync(runtime, "users").next_batch()
    assert fixed is not None
    with runtime.store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM batches WHERE id = :id"), {"id": fixed.batch_id})
    [summary] = bulk_sync("users")
    assert (summary.batches, summary.rows) == ([fixed.batch_id], 3)
    assert query(runtime, "SELECT id FROM users WHERE name LIKE 'Renamed%' ORDER BY id") == [
        (3,), (4,), (5,)]
    assert len(sync_batches(runtime)) == 2


def test_invalid_source_rows_run_nothing_and_hold_the_watermark(
        configure: Configure, tmp_path: Path) -> None:
    source_url = f"sqlite:///{tmp_path / 'source.db'}"
    rows = people(range(1, 51))
    rows[9]["email"] = None  # users.email is NOT NULL
    write_source(source_url, rows)
    runtime = configure(database_url=f"sqlite:///{tmp_path / 'store.db'}", syncs=syncs(
        users={"resource": "users", "table": "source_users", "source_url": source_url},
        names={"resource": "products", "table": "source_users", "source_url": source_url,
               "columns": {"id": "id", "name": "name"}}))

    failed = bulk_sync(return_state=True)  # every sync, as the schedule runs it

    assert failed.is_failed() and "users: ValidationFailed" in (failed.message or "")
    assert query(runtime, "SELECT count(*) FROM users")[0][0] == 0
    assert read_sync_state(runtime.store, "users").watermark is None
    # The other sync ran all the same.
    assert query(runtime, "SELECT count(*) FROM products")[0][0] == 50
    assert read_sync_state(runtime.store, "names").rows_synced == 50

    engine = sa.create_engine(source_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE source_users SET email = 'fixed@example.com' WHERE id = 10"))
    engine.dispose()
    [summary] = bulk_sync("users")
    assert (summary.rows, summary.failed) == (50, 0)
    assert query(runtime, "SELECT email FROM users WHERE id = 10") == [("fixed@example.com",)]


# -- bulk sync from CSV files ------------------------------------------------------------------


def write_csv(directory: Path, name: str, rows: list[tuple[int, str]], mtime: int) -> None:
    path = directory / name
    lines = ["id,email,name"] + [f"{i},user{i}@example.com,{label}" for i, label in rows]
    path.write_text("\n".join(lines) + "\n")
    os.utime(path, ns=(mtime * 10**9, mtime * 10**9))


def test_csv_directory_sync_reads_new_files_only(configure: Configure, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    start = int(time.time()) - 3600
    write_csv(inbox, "a.csv", [(i, "first") for i in range(1, 301)], start)
    write_csv(inbox, "b.csv", [(i, "second") for i in range(251, 401)], start + 10)
    (inbox / "notes.txt").write_text("not a CSV file")
    runtime = configure(database_url=f"sqlite:///{tmp_path / 'store.db'}", syncs=syncs(inbox={
        "resource": "users", "csv_dir": str(inbox), "batch_rows": 200}))

    [first] = bulk_sync("inbox")

    assert (first.rows, first.failed, len(first.batches)) == (450, 0, 2)  # a file per batch
    assert query(runtime, "SELECT name, count(*) FROM users GROUP BY name ORDER BY name") == [
        ("first", 250), ("second", 150)]
    results = list(runtime.store.results.of_batch(first.batches[1]))
    assert (results[0].id, results[0].status) == ("b.csv line 2", 200)
    assert first.watermark == {"cursor": (start + 10) * 10**9, "key": "b.csv"}

    write_csv(inbox, "c.csv", [(7, "third"), (1000, "third")], start + 20)
    [second] = bulk_sync("inbox")
    assert (second.rows, second.succeeded) == (2, 2)  # only the new file
    assert query(runtime, "SELECT id FROM users WHERE name = 'third' ORDER BY id") == [
        (7,), (1000,)]


# -- deployments -------------------------------------------------------------------------------


def test_prefect_yaml_declares_the_deployments() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.flows import load_flow_from_entrypoint

    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)  # the shape `prefect deploy` accepts
    configs = {d["name"]: d for d in raw["deployments"]}
    assert [d.name for d in model.deployments] == [
        "process-batch", "bulk-sync", "retry-failed", "reap-stale-batches", "replay-dead-letters"]
    for name, config in configs.items():
        assert config["enforce_parameter_schema"] is True
        assert load_flow_from_entrypoint(str(REPO / config["entrypoint"])).name == name
    [schedule] = [_schedule_config_to_deployment_schedule(s)
                  for s in configs["bulk-sync"]["schedules"]]
    assert schedule["active"] is False and schedule["schedule"].cron == "*/15 * * * *"
    assert configs["bulk-sync"]["concurrency_limit"] == 1
    [reaper] = [_schedule_config_to_deployment_schedule(s)
                for s in configs["reap-stale-batches"]["schedules"]]
    assert reaper["active"] is True and reaper["schedule"].cron == "0 * * * *"
    [crashed] = configs["reap-stale-batches"]["triggers"]
    assert crashed["expect"] == ["prefect.flow-run.Crashed"]
    assert crashed["parameters"] == {"flow_run_id": "{{ event.resource.id }}"}


@pytest.fixture
def runner(configure: Configure, pg_database: str, tmp_path: Path) -> Iterator[Runtime]:
    """``serve_deployments()`` in a subprocess, on the session's PostgreSQL database."""
    from prefect.settings import PREFECT_API_URL

    from tests.conftest import _truncate_pg

    _truncate_pg(pg_database)
    products = [{"id": i, "name": f"Product {i}", "price": f"{i}.50",
                 "updated_at": BASE + timedelta(seconds=i)} for i in range(1, 301)]
    engine = sa.create_engine(pg_database)
    table = sa.Table("source_products", sa.MetaData(),
                     sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
                     sa.Column("name", sa.Text), sa.Column("price", sa.Numeric),
                     sa.Column("updated_at", sa.DateTime(timezone=True)))
    table.create(engine, checkfirst=True)
    with engine.begin() as conn:
        conn.execute(table.insert(), products)
    engine.dispose()
    runtime = configure(database_url=pg_database, syncs=syncs(products={
        "resource": "products", "table": "source_products"}))
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    with serving_deployments(env, ("process-batch/process-batch", "bulk-sync/bulk-sync",
                                   "retry-failed/retry-failed"), tmp_path / "runner.log"):
        yield runtime


def wait_for_runs(ids: list[UUID], timeout: float = 180) -> list[FlowRun]:
    """The flow runs, once every one of them has finished."""
    from prefect import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(i) for i in ids]
            if all(r.state is not None and r.state.is_final() for r in runs):
                return runs
            if time.monotonic() > deadline:
                raise AssertionError(f"flow runs still going: {[r.state for r in runs]}")
            time.sleep(0.5)


def test_deployments_run_end_to_end_from_a_runner(runner: Runtime) -> None:
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError

    runtime = runner
    with get_client(sync_client=True) as client:
        deployments = {name: client.read_deployment_by_name(f"{name}/{name}")
                       for name in ("process-batch", "bulk-sync", "retry-failed")}
    assert all(d.enforce_parameter_schema for d in deployments.values())
    scheduled = deployments["bulk-sync"]
    assert [(s.active, getattr(s.schedule, "cron", None)) for s in scheduled.schedules] == [
        (False, "*/15 * * * *")]  # declared, and paused
    assert scheduled.global_concurrency_limit is not None
    assert scheduled.global_concurrency_limit.limit == 1

    # The parameter schema is enforced: a malformed run is refused before it is created.
    with pytest.raises(PrefectHTTPStatusError, match="409"):
        run_deployment("process-batch/process-batch", parameters={"operations": "nope"},
                       timeout=0)

    # A finished batch with a failed item (its email was taken), and the email freed again.
    with runtime.store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users (id, email) VALUES (99, 'u103@x.io')"))
    failed_batch, _ = register_batch(runtime, [
        {"method": "POST", "path": "/users", "body": {"id": i, "email": f"u{i}@x.io"}}
        for i in range(101, 106)])
    process_batch(batch_id=failed_batch)
    assert runtime.store.status(failed_batch).failed == 1
    with runtime.store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM users WHERE id = 99"))

    # The three deployments at once: the runner runs them side by side.
    operations = [{"id": f"op{i}", "method": "POST", "path": "/users",
                   "body": {"id": i, "email": f"u{i}@x.io"}} for i in range(1, 6)]
    runs = [
        run_deployment("process-batch/process-batch", parameters={"operations": operations},
                       timeout=0),
        run_deployment("retry-failed/retry-failed", parameters={"batch_id": failed_batch},
                       timeout=0),
        run_deployment("bulk-sync/bulk-sync", parameters={"sync_name": "products"},
                       timeout=0),
    ]
    finished = wait_for_runs([run.id for run in runs])
    for run in finished:
        assert run.state is not None and run.state.is_completed(), (run.name, run.state)

    [(batch_id, succeeded)] = query(
        runtime, "SELECT id, succeeded FROM batches WHERE source = 'flow'")
    assert succeeded == 5
    assert finished[0].name == f"batch-{batch_id}"  # named after the batch it registered
    # retry-failed ran the failed item again, in a new process-batch run of the same batch;
    # the 4 successes were not run again (their inserts would now be 409 conflicts).
    assert runtime.store.status(failed_batch).failed == 0
    assert [(r.status, r.state) for r in runtime.store.results.of_batch(failed_batch)] == [
        (201, ItemState.SUCCEEDED)] * 5
    generation = runtime.store.get_batch(failed_batch).generation
    assert generation == 1
    retry_run = runtime.store.get_batch(failed_batch).flow_run_id
    assert retry_run is not None and retry_run != str(finished[1].id)
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(UUID(retry_run)).deployment_id == deployments[
            "process-batch"].id
    # Nothing failed any more: a second retry-failed run changes nothing and starts no run.
    [again] = wait_for_runs([run_deployment("retry-failed/retry-failed",
                                            parameters={"batch_id": failed_batch},
                                            timeout=0).id])
    assert again.state is not None and again.state.is_completed()
    assert runtime.store.get_batch(failed_batch).generation == generation
    assert runtime.store.get_batch(failed_batch).flow_run_id == retry_run
    assert query(runtime, "SELECT id FROM users ORDER BY id") == [
        (i,) for i in [*range(1, 6), *range(101, 106)]]
    assert query(runtime, "SELECT count(*), sum(price) FROM products")[0] == (
        300, sum(i + 0.5 for i in range(1, 301)))
    watermark = read_sync_state(runtime.store, "products").watermark
    assert watermark is not None and watermark["key"] == 300
    assert cursor_of(watermark) == BASE + timedelta(seconds=300)
