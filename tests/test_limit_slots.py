"""Upstream concurrency slots that no live run holds come back: a restarted Prefect server forgot
their leases, or the run that held them died (batchops.limit_leases)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa

from batchops.devtools import free_port
from batchops.devtools.upstream import UpstreamConfig, running_upstream
from batchops.limit_leases import LimitLeases
from batchops.registration import register_batch
from batchops.runtime import Runtime
from batchops.schemas import BatchState, ItemState
from batchops.tables import limit_leases, utcnow
from batchops.targets.http import upstream_limit_name
from deployments.local import wait_for_prefect
from deployments.processes import Supervisor
from flows.process_batch import process_batch
from tests.runner import kill_process_tree, serving_deployments


def crm(url: str, name: str, **spec: Any) -> str:
    return json.dumps({name: {"prefix": "/crm", "base_url": url, "backoff_seconds": 0.01,
                              "max_backoff_seconds": 0.05, **spec}})


def contacts(n: int) -> list[dict[str, Any]]:
    return [{"id": f"c{i}", "method": "POST", "path": "/crm/contacts",
             "body": {"name": f"Contact {i}"}} for i in range(n)]


def active_slots(name: str) -> int:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def take_slots(name: str, slots: int, *, lease: bool = True) -> UUID | None:
    """Occupy slots of the limit: under a lease, or without one — as the slots of a lease a
    restarted server forgot are (the count is in its database, the lease was in memory)."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        if not lease:
            client.increment_concurrency_slots(names=[name], slots=slots, mode="concurrency")
            return None
        response = client.increment_concurrency_slots_with_lease(
            names=[name], slots=slots, mode="concurrency", lease_duration=300)
        return UUID(response.json()["lease_id"])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             whereabouts: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; {whereabouts()}")
        time.sleep(0.1)


@pytest.mark.usefixtures("prefect_server")
def test_reconciling_a_limit_gives_back_the_slots_no_live_run_holds_and_keeps_the_rest(
        runtime: Runtime) -> None:
    from prefect import get_client

    name = f"batchops-upstream-reconciled-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 10)
    leases = LimitLeases.from_settings(runtime.store, runtime.settings)
    live = take_slots(name, 4)
    assert live is not None
    leases.held("live-batch", live, name, 4)
    dead = take_slots(name, 3)
    assert dead is not None
    leases.held("dead-batch", dead, name, 3)
    with runtime.store.engine.begin() as conn:  # its holder stopped renewing it long ago
        conn.execute(limit_leases.update().where(limit_leases.c.lease_id == str(dead)).values(
            renewed_at=utcnow() - 2 * timedelta(
                seconds=runtime.settings.recovery.stale_after_seconds)))
    take_slots(name, 3, lease=False)
    assert active_slots(name) == 10

    done = leases.reconcile(name)

    assert done is not None
    assert (done.released_leases, done.freed_slots, done.active_slots, done.held_slots) == (
        1, 3, 4, 4)
    assert active_slots(name) == 4
    assert runtime.store.leases.of_batch("dead-batch") == []
    assert runtime.store.leases.of_batch("live-batch") == [str(live)]
    again = leases.reconcile(name)
    assert again is not None and (again.freed_slots, again.active_slots) == (0, 4)


@pytest.mark.usefixtures("prefect_server")
def test_a_batch_waiting_for_slots_no_live_run_holds_gets_them_and_completes(
        configure: Any, database_url: str) -> None:
    upstream = f"forgotten{uuid.uuid4().hex[:6]}"
    limit = upstream_limit_name(upstream)
    with running_upstream() as (url, state):
        runtime: Runtime = configure(database_url=database_url,
                                     upstreams=crm(url, upstream, max_concurrency=5),
                                     slot_wait_seconds=1)
        first, _ = register_batch(runtime, contacts(5))
        process_batch(batch_id=first)  # the http target is up in this process
        take_slots(limit, 5, lease=False)  # every slot, held by no run
        second, _ = register_batch(runtime, contacts(20))

        started = time.monotonic()
        run = threading.Thread(target=process_batch, kwargs={"batch_id": second}, daemon=True)
        run.start()
        run.join(60)

        assert not run.is_alive(), "the batch still waits for slots no run holds"
        assert time.monotonic() - started >= 1  # it waited its slot_wait_seconds first
        results = list(runtime.store.results.of_batch(second))
        assert [r.state for r in results] == [ItemState.SUCCEEDED] * 20
        assert len(state.executions) == 25 and set(state.executions.values()) == {1}
        wait_for(lambda: active_slots(limit) == 0, 10, "the slots to be released")
        assert runtime.store.leases.of_batch(second) == []


def test_batches_complete_after_the_prefect_server_and_the_runner_are_killed_mid_batch(
        configure: Any, pg_database: str, tmp_path: Path) -> None:
    """The machine dies while a batch holds every slot of its upstream: the restarted Prefect
    server still counts them but forgot their lease. The batch (re-run by the reaper) and a
    new batch to the same upstream both complete, and the slots come back."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.conftest import _truncate_pg

    _truncate_pg(pg_database)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    server_env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      PREFECT_UI_ENABLED="false")
    processes = Supervisor(tmp_path / "logs")

    def start_server() -> None:
        # On the same SQLite database every time. No services: the scheduler's reaper runs
        # (every minute) would take a batch whose run is still starting on a loaded machine
        # (stale after 3 s here) for lost, and run it twice.
        server = processes.start(
            "prefect-server", [sys.executable, "-m", "prefect", "server", "start", "--host",
                               "127.0.0.1", "--port", str(port), "--no-services"],
            server_env, stop_signal=signal.SIGTERM)
        assert wait_for_prefect(api), server.log_path.read_text()

    deployments = ("process-batch/process-batch", "reap-stale-batches/reap-stale-batches")
    limit = upstream_limit_name("restarted")
    with (running_upstream(UpstreamConfig(latency_ms=20)) as (url, state),
          temporary_settings(updates={PREFECT_API_URL: api})):
        try:
            start_server()
            runtime: Runtime = configure(
                database_url=pg_database, upstreams=crm(url, "restarted", max_concurrency=10),
                heartbeat_seconds="0.5", stale_after_seconds="3", slot_wait_seconds="2")
            env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "home"),
                   "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
                   "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_LOGGING_LEVEL": "INFO"}
            first, _ = register_batch(runtime, contacts(600), concurrency=10)

            def where() -> str:  # what a timeout reports: the batches, their runs, the slots
                from prefect import get_client

                with get_client(sync_client=True) as client:
                    runs = [(r.name, r.state_name) for r in client.read_flow_runs()]
                    leases = runtime.store.leases.live(limit, timedelta(hours=1))
                return (f"batches {[runtime.store.status(b).model_dump() for b in (first, second)]}"
                        f"; flow runs {runs}; {len(state.requests)} requests upstream; "
                        f"{active_slots(limit)} slots taken; lease records {leases}")

            with serving_deployments(env, deployments, tmp_path / "runner-1.log") as runner:
                run_deployment("process-batch/process-batch", parameters={"batch_id": first},
                               timeout=0)
                wait_for(lambda: len(state.requests) >= 100, 60, "the batch to get going")
                assert active_slots(limit) == 10
                # The machine dies: the Prefect server, the runner and its flow run.
                processes.get("prefect-server").kill()
                kill_process_tree(runner.pid)
                runner.wait(10)
            died = time.monotonic()
            start_server()
            assert active_slots(limit) == 10  # counted still, by no lease the server knows
            assert runtime.store.get_batch(first).status == BatchState.PROCESSING.value
            time.sleep(max(0.0, 3.5 - (time.monotonic() - died)))  # its heartbeat is stale

            with serving_deployments(env, deployments, tmp_path / "runner-2.log"):
                reaper = run_deployment("reap-stale-batches/reap-stale-batches", timeout=120)
                assert reaper.state is not None and reaper.state.is_completed()
                # (After the reaper: it would take a batch whose run is still starting for lost.)
                second, _ = register_batch(runtime, contacts(100), concurrency=10)
                run_deployment("process-batch/process-batch", parameters={"batch_id": second},
                               timeout=0)
                wait_for(lambda: all(runtime.store.get_batch(b).status
                                     == BatchState.COMPLETED.value for b in (first, second)),
                         120, "both batches to complete", where)
                wait_for(lambda: active_slots(limit) == 0, 30, "the slots to come back", where)
        finally:
            processes.stop_all()

    counts = {b: runtime.store.status(b) for b in (first, second)}
    assert [(s.total, s.succeeded, s.failed) for s in counts.values()] == [
        (600, 600, 0), (100, 100, 0)]
    assert runtime.store.get_batch(first).recoveries == 1
    assert len(state.executions) == 700 and set(state.executions.values()) == {1}
    with runtime.store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(limit_leases)).scalar() == 0
