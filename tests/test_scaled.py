"""The scaled-out topology, for real: 2 Prefect API servers and the services process on
PostgreSQL with prefect-redis, 2 batchops workers on a batchops work pool, 2 batchops APIs
(:mod:`deployments.scaled`, what ``make up-scaled`` starts).

The system runs on databases and a Redis database of this session's own, on free ports, so
other test sessions on the machine are not disturbed — except by the two fault tests at the
end, which restart the machine's PostgreSQL (a few seconds) and stop its Redis (a few seconds).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa

from batchops.devtools import free_port
from deployments.scaled import ScaledSystem, ScaledTopology, claim_empty_redis_database
from tests.conftest import PG_ADMIN_URL
from tests.services import ensure_redis, restart_postgres

pytestmark = pytest.mark.postgres

BATCHES = 20
ITEMS = 500
FINAL = {"completed", "failed", "cancelled"}
REPO = Path(__file__).resolve().parent.parent


def _empty_redis_database() -> int:
    db = claim_empty_redis_database("test-session")
    if db is None:
        pytest.skip("no empty Redis database left")
    return db


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaledSystem]:
    tag = uuid.uuid4().hex[:8]
    db = _empty_redis_database()
    topology = ScaledTopology(
        prefect_ports=(free_port(), free_port()), api_ports=(free_port(), free_port()),
        prefect_database=f"batchops_prefect_test_{tag}", store_database=f"batchops_test_{tag}",
        redis_url=f"redis://127.0.0.1:6379/{db}", data_dir=tmp_path_factory.mktemp("scaled"),
        stale_after_seconds=15, extra_env={"BATCHOPS_CHUNK_RETRIES": "4"})
    system = ScaledSystem(topology)
    try:
        system.start()
        yield system
    finally:
        system.stop()
        ensure_redis()
        redis.Redis(db=db).flushdb()
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for name in (topology.prefect_database, topology.store_database):
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


# -- helpers -----------------------------------------------------------------------------------


def _submit(api_url: str, operations: list[dict[str, Any]]) -> str:
    answer = httpx.post(f"{api_url}/batches", json={"operations": operations},
                        headers={"Prefer": "respond-async"}, timeout=60)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["batch_id"])


def _submit_all(system: ScaledSystem, batches: list[list[dict[str, Any]]]) -> list[str]:
    """Submit concurrently, alternating between the API replicas."""
    urls = system.topology.api_urls
    with ThreadPoolExecutor(len(batches)) as pool:
        return list(pool.map(lambda i: _submit(urls[i % len(urls)], batches[i]),
                             range(len(batches))))


def _get_status(api_url: str, batch_id: str) -> httpx.Response:
    """GET the status; a 503 ``transient_error`` (a pooled connection that died with a
    PostgreSQL restart is dropped by that request) is retried, as the answer asks."""
    for _ in range(5):
        answer = httpx.get(f"{api_url}/batches/{batch_id}/status", timeout=10)
        if answer.status_code != 503:
            break
        time.sleep(0.5)
    return answer


def _status(system: ScaledSystem, batch_id: str) -> dict[str, Any]:
    answer = _get_status(system.topology.api_urls[0], batch_id)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _wait_final(system: ScaledSystem, batch_ids: list[str],
                timeout: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    statuses: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        for batch_id in batch_ids:
            if statuses.get(batch_id, {}).get("status") not in FINAL:
                try:
                    statuses[batch_id] = _status(system, batch_id)
                except httpx.HTTPError:
                    continue
        if all(s.get("status") in FINAL for s in statuses.values()) and len(statuses) == len(
                batch_ids):
            return statuses
        time.sleep(1)
    unfinished = {b: s.get("status") for b, s in statuses.items() if s.get("status") not in FINAL}
    raise AssertionError(f"batches not finished after {timeout:.0f} s: {unfinished}")


def _flow_runs(system: ScaledSystem, batch_ids: list[str]) -> list[Any]:
    """The batches' flow runs, through the Prefect client (one of the API servers)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    names = [f"batch-{b}" for b in batch_ids]
    with SyncPrefectClient(system.topology.prefect_api_urls[1]) as client:
        return list(client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=names)), limit=200))


def _settled_flow_runs(system: ScaledSystem, batch_ids: list[str],
                       timeout: float = 60) -> list[Any]:
    """The batches' flow runs once each is in a final state (or ``timeout`` passed). A batch is
    final in the store before its flow run is: the run writes its artifacts after that."""
    deadline = time.monotonic() + timeout
    runs = _flow_runs(system, batch_ids)
    while not all(r.state.is_final() for r in runs) and time.monotonic() < deadline:
        time.sleep(0.5)
        runs = _flow_runs(system, batch_ids)
    return runs


def _whereabouts(system: ScaledSystem, batch_ids: list[str]) -> str:
    """The batches' flow runs and the reaper's runs, with their states and workers."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    def show(runs: list[Any]) -> list[tuple[str, str, str, str]]:
        return [(r.name, r.state_name, r.labels.get("prefect.worker.name", "-"),
                 str(r.state.timestamp.time()) if r.state else "-") for r in runs]

    try:
        with SyncPrefectClient(system.topology.prefect_api_urls[1]) as client:
            reapers = client.read_flow_runs(flow_filter=FlowFilter(
                name=FlowFilterName(any_=["reap-stale-batches"])), limit=50)
        return f"batch runs: {show(_flow_runs(system, batch_ids))}; reaper runs: {show(reapers)}"
    except Exception as exc:  # the failure's own message matters more
        return f"(runs not read: {exc!r})"


def _store(system: ScaledSystem) -> sa.Engine:
    return sa.create_engine(system.topology.store_url, poolclass=sa.pool.NullPool)


def _users(tag: str, batch: int) -> list[dict[str, Any]]:
    return [{"method": "POST", "path": "/users", "idempotency_key": f"{tag}-{batch}-{i}",
             "body": {"email": f"{tag}-{batch}-{i}@example.com", "name": f"U {i}"}}
            for i in range(ITEMS)]


# -- tests -------------------------------------------------------------------------------------


def test_store_upgrades_started_at_once_take_turns(scaled: ScaledSystem) -> None:
    name = f"batchops_migrate_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        env = scaled.topology.env("migrate")
        env["BATCHOPS_DATABASE_URL"] = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
        procs = [subprocess.Popen([sys.executable, "-m", "cli", "db", "upgrade"], env=env,
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for _ in range(4)]
        outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
        assert all("(head)" in out for out in outputs)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def test_twenty_batches_through_both_apis_complete_on_both_workers(scaled: ScaledSystem) -> None:
    tag = uuid.uuid4().hex[:6]
    batches = [_users(tag, b) for b in range(BATCHES)]

    batch_ids = _submit_all(scaled, batches)
    statuses = _wait_final(scaled, batch_ids, timeout=240)

    assert {(s["status"], s["total"], s["succeeded"], s["failed"]) for s in statuses.values()
            } == {("completed", ITEMS, ITEMS, 0)}
    with _store(scaled).connect() as conn:
        created = conn.execute(sa.text("SELECT count(*) FROM users WHERE email LIKE :p"),
                               {"p": f"{tag}-%"}).scalar_one()
    assert created == BATCHES * ITEMS
    runs = _settled_flow_runs(scaled, batch_ids)
    assert len(runs) == BATCHES
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state) for r in runs]
    assert {r.work_pool_name for r in runs} == {"batchops"}
    workers = [r.labels.get("prefect.worker.name") for r in runs]
    assert set(workers) == {"worker-1", "worker-2"}, workers


def test_batches_of_a_killed_worker_finish_on_the_other_once_per_key(
        scaled: ScaledSystem) -> None:
    tag = uuid.uuid4().hex[:6]
    batch_ids = _submit_all(scaled, [_users(tag, b) for b in range(8)])
    deadline = time.monotonic() + 60
    taken: dict[int, list[str]] = {}
    while not taken:  # kill a worker (and its flow-run processes) while it runs batches
        assert time.monotonic() < deadline, "no worker took a batch"
        for run in _flow_runs(scaled, batch_ids):
            worker = run.labels.get("prefect.worker.name", "")
            if worker.startswith("worker-") and (run.state.is_pending()
                                                 or run.state.is_running()):
                taken.setdefault(int(worker.removeprefix("worker-")), []).append(run.name)
        time.sleep(0.2)
    # Whichever worker the pool gave batches to first (both poll every 2 s) is the one killed.
    victim = min(taken)
    survivor = f"worker-{3 - victim}"
    scaled.processes.get(f"worker-{victim}").kill()
    try:
        statuses = _wait_final(scaled, batch_ids, timeout=200)
    except AssertionError as exc:  # say where they stopped: the runs and the reaper's runs
        raise AssertionError(f"{exc}; killed worker-{victim}; {_whereabouts(scaled, batch_ids)}"
                             ) from None
    finally:
        scaled.start_worker(victim)  # leave the system as the test found it

    assert {(s["status"], s["succeeded"], s["failed"]) for s in statuses.values()} == {
        ("completed", ITEMS, 0)}
    runs = _settled_flow_runs(scaled, batch_ids)
    for name in taken[victim]:  # its run crashed; a new run of the batch finished elsewhere
        of_batch = [r for r in runs if r.name == name]
        assert any(r.state.is_crashed() for r in of_batch), [r.state for r in of_batch]
        assert any(r.state.is_completed() and r.labels.get("prefect.worker.name") == survivor
                   for r in of_batch), [(r.state, r.labels) for r in of_batch]
    with _store(scaled).connect() as conn:
        users = conn.execute(sa.text("SELECT count(DISTINCT email), count(*) FROM users "
                                     "WHERE email LIKE :p"), {"p": f"{tag}-%"}).one()
        keys = conn.execute(sa.text("SELECT count(*) FROM idempotency_records WHERE key LIKE :p"),
                            {"p": f"{tag}-%"}).scalar_one()
    assert tuple(users) == (8 * ITEMS, 8 * ITEMS)
    assert keys == 8 * ITEMS
    # Every item was executed once: a second POST of one key would have answered 409.
    for batch_id in batch_ids:
        results = httpx.get(f"{scaled.topology.api_urls[1]}/batches/{batch_id}/results",
                            params={"limit": 1000}, timeout=30).json()
        assert len(results["items"]) == ITEMS
        assert {item["status"] for item in results["items"]} == {201}


@pytest.mark.disruptive
def test_batches_complete_after_a_postgres_restart(scaled: ScaledSystem) -> None:
    tag = uuid.uuid4().hex[:6]
    batch_ids = _submit_all(scaled, [_users(tag, b) for b in range(6)])
    deadline = time.monotonic() + 60
    while not any(r.state.is_running() for r in _flow_runs(scaled, batch_ids)):
        assert time.monotonic() < deadline, "no batch started"
        time.sleep(0.2)
    restart_postgres()

    statuses = _wait_final(scaled, batch_ids, timeout=200)

    assert {(s["status"], s["succeeded"], s["failed"]) for s in statuses.values()} == {
        ("completed", ITEMS, 0)}
    with _store(scaled).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM users WHERE email LIKE :p"),
                            {"p": f"{tag}-%"}).scalar_one() == 6 * ITEMS


@pytest.mark.disruptive
def test_with_redis_stopped_status_reads_fall_back_to_the_store(scaled: ScaledSystem) -> None:
    batch_id = _submit_all(scaled, [_users(uuid.uuid4().hex[:6], 0)])[0]
    done = _wait_final(scaled, [batch_id], timeout=120)[batch_id]
    apis = scaled.topology.api_urls
    assert httpx.get(f"{apis[0]}/readyz", timeout=20).json()["checks"]["redis"] == "ok"

    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], check=False,
                   capture_output=True, timeout=20)
    try:
        statuses = [_get_status(url, batch_id) for url in apis]
        ready = httpx.get(f"{apis[1]}/readyz", timeout=20)
    finally:
        ensure_redis()

    assert [s.status_code for s in statuses] == [200, 200]
    assert all(s.json() == done for s in statuses)
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "degraded"
    assert ready.json()["checks"]["redis"] != "ok"
    assert ready.json()["checks"]["store"] == "ok"
