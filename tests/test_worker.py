"""The batchops worker type: a work pool's flow runs executed warm in the worker's process.

A real worker (``prefect worker start --type batchops``) in a subprocess, on the session's
Prefect test server and PostgreSQL store; batches submitted through the API.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest

from tests.runner import stop_process
from tests.test_api import poll_until_finished, start_api, user  # noqa: F401 - fixture

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def worker(prefect_server: None, pg_database: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The deployments on a ``batchops`` work pool of their own and one worker polling it."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    from deployments.serve import deploy_to_work_pool

    pool = f"batchops-test-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "BATCHOPS_DATABASE_URL": pg_database, "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO"}
    os.environ["BATCHOPS_DATABASE_URL"] = pg_database
    try:
        ids = deploy_to_work_pool(pool)
    finally:
        del os.environ["BATCHOPS_DATABASE_URL"]
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type",
             "batchops", "--limit", "4"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield {"pool": pool, "pid": process.pid, "log": log_path, "database_url": pg_database}
    finally:
        stop_process(process)
        with get_client(sync_client=True) as client:
            for deployment_id in ids:  # the runner tests serve deployments of these names
                client.delete_deployment(deployment_id)
            client.delete_work_pool(pool)


@pytest.fixture(autouse=True)
def _empty_store(worker: dict[str, Any]) -> None:
    """Each test starts from empty tables (the session's database is shared with other
    modules, whose users have the same ids and emails)."""
    from tests.conftest import _truncate_pg

    _truncate_pg(worker["database_url"])


def _flow_run(flow_run_id: str) -> Any:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(flow_run_id))


def _batches(runtime: Any) -> list[Any]:
    from batchops.tables import batches

    with runtime.store.engine.connect() as conn:
        return list(conn.execute(batches.select()))


def _emails(count: int, latency: float) -> list[dict[str, Any]]:
    return [{"id": f"e{i}", "method": "POST", "path": "/emails",
             "body": {"to": f"u{i}@example.com", "send_latency": latency}} for i in range(count)]


def test_async_batches_run_in_the_worker_process_and_complete(
        worker: dict[str, Any], start_api: Callable[..., httpx.Client]) -> None:  # noqa: F811
    api = start_api(database_url=worker["database_url"])
    answers = [api.post("/batches", json={"operations": [user(b * 100 + i) for i in range(50)],
                                          "mode": "async"}) for b in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 202], [a.text for a in answers]

    finals = [poll_until_finished(api, a.json()["status_url"])[-1] for a in answers]

    assert [(f["status"], f["succeeded"], f["failed"]) for f in finals] == [
        ("completed", 50, 0)] * 3
    for final in finals:
        # a batch is final in the store before its run ends (artifacts, the final state)
        deadline = time.monotonic() + 60
        while not (run := _flow_run(final["flow_run_id"])).state.is_final():
            assert time.monotonic() < deadline, run.state
            time.sleep(0.2)
        assert run.state.is_completed()
        assert run.work_pool_name == worker["pool"]
        # executed in the worker's own process (a thread of it), not a process of its own
        _host, pid, flow_run_id = run.infrastructure_pid.split(":")
        assert (int(pid), flow_run_id) == (worker["pid"], str(run.id))


def test_prefect_cancel_of_a_running_batch_stops_it_and_ends_the_run_cancelled(
        worker: dict[str, Any], start_api: Callable[..., httpx.Client]) -> None:  # noqa: F811
    from prefect import get_client
    from prefect.states import Cancelling

    api = start_api(database_url=worker["database_url"])
    answer = api.post("/batches", json={"operations": _emails(400, 0.05), "concurrency": 2,
                                        "mode": "async"})
    assert answer.status_code == 202, answer.text
    status_url = answer.json()["status_url"]
    deadline = time.monotonic() + 90
    while api.get(status_url).json()["status"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # ~60 of the 400 items (10 s in all) have been sent
    flow_run_id = api.get(status_url).json()["flow_run_id"]

    with get_client(sync_client=True) as client:  # what `prefect flow-run cancel` does
        client.set_flow_run_state(UUID(flow_run_id), Cancelling(message="cancelled in the UI"))
    poll_until_finished(api, status_url)  # cancelled at once; the counts once the run stops
    deadline = time.monotonic() + 60
    while ((final := api.get(status_url).json())["finished_at"] is None
           or not _flow_run(flow_run_id).state.is_final()) and time.monotonic() < deadline:
        time.sleep(0.2)

    assert final["status"] == "cancelled"
    assert final["succeeded"] < 300  # stopped within about a second of the cancel (~60 sent)
    assert final["succeeded"] + final["skipped"] == 400
    assert _flow_run(flow_run_id).state.is_cancelled()



def test_a_sync_batch_is_a_run_of_the_deployment_executed_by_the_api_not_the_worker(
        worker: dict[str, Any], start_api: Callable[..., httpx.Client]) -> None:  # noqa: F811
    from prefect import get_client

    api = start_api(database_url=worker["database_url"])
    answer = api.post("/batches", json={"operations": [user(900 + i) for i in range(5)],
                                        "mode": "sync"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["summary"]["succeeded"] == 5

    flow_run_id = api.get(f"/batches/{body['batch_id']}/status").json()["flow_run_id"]
    run = _flow_run(flow_run_id)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("process-batch/process-batch")
    assert run.deployment_id == deployment.id
    assert "batchops" in run.tags
    assert run.name == f"batch-{body['batch_id']}"
    assert run.infrastructure_pid is None  # the worker never picked it up
    deadline = time.monotonic() + 30
    while not (run := _flow_run(flow_run_id)).state.is_final():
        assert time.monotonic() < deadline, run.state
        time.sleep(0.2)
    assert run.state.is_completed()


def test_a_crashed_batch_run_is_resumed_at_once_by_the_reaper_deployment_trigger(
        worker: dict[str, Any], configure: Callable[..., Any]) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.states import Crashed, Running

    from batchops.registration import register_batch

    runtime = configure(database_url=worker["database_url"])
    batch_id, _ = register_batch(runtime, [user(700 + i) for i in range(3)])
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("process-batch/process-batch")
        # A run that no process executes any more (created Running: no worker takes it),
        # its batch processing under it with a fresh heartbeat: the sweep would wait a minute.
        dead = client.create_flow_run_from_deployment(
            deployment.id, parameters={"batch_id": batch_id}, state=Running())
        assert runtime.lifecycle.start(batch_id, str(dead.id))
        # What Prefect's engine, or its zombie detection, does to such a run.
        client.set_flow_run_state(dead.id, Crashed(message="worker lost"), force=True)

    deadline = time.monotonic() + 90
    while (batch := runtime.store.get_batch(batch_id)).status != "completed":
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)

    assert (batch.succeeded, batch.failed, batch.recoveries) == (3, 0, 1)
    assert batch.flow_run_id != str(dead.id)
    with get_client(sync_client=True) as client:
        reapers = client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=["reap-stale-batches"])))
        resumed = client.read_flow_run(UUID(batch.flow_run_id or ""))
    assert {"flow_run_id": f"prefect.flow-run.{dead.id}"} in [r.parameters for r in reapers]
    assert resumed.deployment_id == deployment.id and resumed.name == f"batch-{batch_id}"


def test_prefect_flow_run_retry_reruns_the_failed_items_of_the_same_batch(
        worker: dict[str, Any], configure: Callable[..., Any]) -> None:
    import sqlalchemy as sa
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    from batchops.tables import batches

    runtime = configure(database_url=worker["database_url"])
    operations = [user(810), {"id": "rename", "method": "PATCH", "path": "/users/811",
                              "body": {"name": "Renamed"}}]  # no user 811 yet: 404
    with get_client(sync_client=True) as client:  # a run started from the UI with operations
        deployment = client.read_deployment_by_name("process-batch/process-batch")
        run = client.create_flow_run_from_deployment(deployment.id,
                                                     parameters={"operations": operations})

    def final_state() -> Any:
        deadline = time.monotonic() + 90
        while not (current := _flow_run(str(run.id))).state.is_final():
            assert time.monotonic() < deadline, current.state
            time.sleep(0.2)
        return current.state

    assert final_state().is_completed()
    [batch_id] = [b.id for b in _batches(runtime)]
    first = {r.id: r.status for r in runtime.store.results.of_batch(batch_id)}
    assert first == {"op810": 201, "rename": 404}
    with runtime.store.engine.begin() as conn:  # what the failed item needed
        conn.execute(sa.text("INSERT INTO users (id, email) VALUES (811, 'u811@example.com')"))

    retried = subprocess.run(
        [sys.executable, "-m", "prefect", "flow-run", "retry", str(run.id)], cwd=REPO,
        env={**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())},
        capture_output=True, text=True, timeout=120)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    deadline = time.monotonic() + 30  # the retry is scheduled: wait for it to leave the end
    while _flow_run(str(run.id)).state.is_final() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert final_state().is_completed()

    # The same batch (no second one registered from the operations), its failed item run
    # again and the succeeded one kept (run again, its POST would have answered 409).
    assert [b.id for b in _batches(runtime)] == [batch_id]
    again = {r.id: r.status for r in runtime.store.results.of_batch(batch_id)}
    assert again == {"op810": 201, "rename": 200}
    status = runtime.store.status(batch_id)
    assert (status.status.value, status.succeeded, status.failed) == ("completed", 2, 0)
    with runtime.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT name FROM users WHERE id = 811")).scalar() == \
            "Renamed"
        assert conn.execute(sa.select(batches.c.generation).where(
            batches.c.id == batch_id)).scalar() == 1


def test_a_worker_takes_a_waiting_run_as_soon_as_its_slot_frees_not_at_its_next_poll(
        prefect_server: None, pg_database: str, tmp_path: Path) -> None:
    """One slot, two runs waiting, a poll every 30 s: the second run is taken when the first
    ends (at the next poll it would wait at least 21 s: 30 s less Prefect's 30 % jitter)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType
    from prefect.settings import PREFECT_API_URL

    from deployments.worker import WORKER_TYPE, BatchopsWorker
    from flows.process_batch import process_batch

    pool = f"batchops-handoff-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(
            name=pool, type=WORKER_TYPE,
            base_job_template=BatchopsWorker.get_default_base_job_template()))
        deployment_id = process_batch.to_deployment(
            name=pool, entrypoint_type=EntrypointType.MODULE_PATH,
        ).apply(work_pool_name=pool)  # type: ignore[misc]
        runs = [client.create_flow_run_from_deployment(
            deployment_id, parameters={"operations": _emails(2, 0.2)}) for _ in range(2)]
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "BATCHOPS_DATABASE_URL": pg_database, "PREFECT_WORKER_QUERY_SECONDS": "30",
           "PREFECT_LOGGING_LEVEL": "INFO"}
    with (tmp_path / "worker.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type",
             "batchops", "--limit", "1"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not all(_flow_run(str(r.id)).state.is_final() for r in runs):
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.5)
        with get_client(sync_client=True) as client:
            entered = [{str(s.name): s.timestamp for s in client.read_flow_run_states(r.id)}
                       for r in runs]
    finally:
        stop_process(process)
        with get_client(sync_client=True) as client:
            client.delete_deployment(deployment_id)
            client.delete_work_pool(pool)

    assert all(_flow_run(str(r.id)).state.is_completed() for r in runs)
    first, second = sorted(entered, key=lambda states: states["Pending"])
    handoff = (second["Pending"] - first["Completed"]).total_seconds()
    assert handoff < 10, entered
