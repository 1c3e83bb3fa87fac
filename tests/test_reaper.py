"""No batch left behind: the reaper starts batches whose run never started or is gone.

A batch is registered before its run starts; a process that dies in between (the API killed
after registering a sync batch, or while the batch waited for a thread) leaves it ``queued``
with no flow run, and a flow run deleted from Prefect leaves it pointing at nothing. The
reaper flow, run for real against the Prefect test server, starts each on the deployment
(served by a runner subprocess) and the batch completes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from prefect import get_client

from batchops.registration import register_batch
from batchops.runtime import Runtime
from batchops.schemas import BatchState
from batchops.tables import batches, utcnow
from flows.reaper import reap_stale_batches
from tests.conftest import _truncate_pg
from tests.test_api import deployment_runner, table_rows  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("prefect_server")


def _users(tag: str, n: int) -> list[dict[str, Any]]:
    return [{"method": "POST", "path": "/users", "body": {"email": f"{tag}-{i}@example.com"}}
            for i in range(n)]


def _wait_final(runtime: Runtime, batch_id: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = runtime.store.get_batch(batch_id).status
        if BatchState(status).is_final:
            return status
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} still {status} after {timeout} s")


def test_the_reaper_starts_queued_batches_whose_run_never_started_or_is_gone(
        configure: Callable[..., Runtime], deployment_runner: str) -> None:  # noqa: F811
    _truncate_pg(deployment_runner)
    runtime = configure(database_url=deployment_runner, max_sync_wait_seconds=0)
    never_started, _ = register_batch(runtime, _users("never", 3))
    run_gone, _ = register_batch(runtime, _users("gone", 2))
    runtime.lifecycle.attach_run(run_gone, str(uuid.uuid4()))  # no such flow run
    young, _ = register_batch(runtime, _users("young", 1))  # registered just now
    with runtime.store.engine.begin() as conn:  # the other two were registered an hour ago
        conn.execute(batches.update().where(batches.c.id.in_([never_started, run_gone]))
                     .values(created_at=utcnow() - timedelta(hours=1)))

    restarted = reap_stale_batches(stale_after_seconds=600)

    assert sorted(restarted) == sorted([never_started, run_gone])
    assert _wait_final(runtime, never_started) == "completed"
    assert _wait_final(runtime, run_gone) == "completed"
    assert runtime.store.get_batch(young).status == "queued"
    emails = sorted(u["email"] for u in table_rows(runtime, "users"))
    assert emails == sorted([f"never-{i}@example.com" for i in range(3)]
                            + [f"gone-{i}@example.com" for i in range(2)])
    with get_client(sync_client=True) as client:
        for batch_id in (never_started, run_gone):
            run = client.read_flow_run(uuid.UUID(runtime.store.get_batch(batch_id).flow_run_id))
            assert run.deployment_id is not None
            assert run.name == f"batch-{batch_id}"


def test_a_silent_run_reported_by_prefect_is_resumed_once_its_batch_stopped_beating(
        configure: Callable[..., Runtime], deployment_runner: str) -> None:  # noqa: F811
    from prefect.states import Running

    _truncate_pg(deployment_runner)
    runtime = configure(database_url=deployment_runner, heartbeat_seconds=1)
    batch_id, _ = register_batch(runtime, _users("silent", 2))
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("process-batch/process-batch")
        silent = client.create_flow_run_from_deployment(
            deployment.id, parameters={"batch_id": batch_id}, state=Running())
    assert runtime.lifecycle.start(batch_id, str(silent.id))
    event_id = f"prefect.flow-run.{silent.id}"  # how the trigger names the run

    # Prefect missed its heartbeats, but the batch beat 1 s ago: alive, left alone.
    runtime.store.checkpoints.heartbeat(batch_id)
    assert reap_stale_batches(flow_run_id=event_id) == []
    # Silent for three of its heartbeat periods as well: dead, resumed at once (the sweep
    # would wait for the 60 s stale_after_seconds).
    with runtime.store.engine.begin() as conn:
        conn.execute(batches.update().where(batches.c.id == batch_id)
                     .values(heartbeat_at=utcnow() - timedelta(seconds=4)))
    assert reap_stale_batches(flow_run_id=event_id) == [batch_id]

    assert _wait_final(runtime, batch_id) == "completed"
    assert sorted(u["email"] for u in table_rows(runtime, "users")) == [
        "silent-0@example.com", "silent-1@example.com"]
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(silent.id).state.is_crashed()
