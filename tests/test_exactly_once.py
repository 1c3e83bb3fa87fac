"""Exactly once per idempotency key: concurrent batches, and a runner killed mid-batch."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from batchops.devtools.upstream import UpstreamConfig, running_upstream
from batchops.registration import register_batch
from batchops.runtime import Runtime
from batchops.schemas import BatchState, ItemState
from flows.process_batch import process_batch
from tests.runner import kill_process_tree, serving_deployments

pytestmark = pytest.mark.usefixtures("prefect_server")


def crm(url: str, name: str = "crm", **spec: Any) -> str:
    return json.dumps({name: {"prefix": "/crm", "base_url": url, "backoff_seconds": 0.01,
                               "max_backoff_seconds": 0.05, **spec}})


def contacts(n: int, key_prefix: str | None = None) -> list[dict[str, Any]]:
    return [{"id": f"c{i}", "method": "POST", "path": "/crm/contacts",
             "body": {"name": f"Contact {i}"},
             **({"idempotency_key": f"{key_prefix}-{i}"} if key_prefix else {})}
            for i in range(n)]


def run_at_once(*batch_ids: str) -> None:
    """Run the batches' flows at the same time, each in a thread of its own."""
    threads = [threading.Thread(target=process_batch, kwargs={"batch_id": b})
               for b in batch_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def test_two_batches_with_the_same_keys_at_once_send_each_key_once(
        configure: Any, database_url: str) -> None:
    with running_upstream(UpstreamConfig(latency_ms=150)) as (url, state):
        runtime: Runtime = configure(database_url=database_url, upstreams=crm(url))
        first, _ = register_batch(runtime, contacts(30, "signup"), concurrency=10)
        second, _ = register_batch(runtime, contacts(30, "signup"), concurrency=10)
        run_at_once(first, second)

        received = Counter(r.key for r in state.requests)
        assert len(received) == 30 and set(received.values()) == {1}
        a = list(runtime.store.results.of_batch(first))
        b = list(runtime.store.results.of_batch(second))
        assert all(r.state is ItemState.SUCCEEDED for r in a + b)
        for x, y in zip(a, b, strict=True):
            # One batch sent the key; the other waited and reports the same stored result.
            assert x.replayed != y.replayed
            assert x.result == y.result and x.status == y.status == 201


def test_a_key_failed_by_one_batch_is_run_by_the_batch_waiting_for_it(
        configure: Any, database_url: str) -> None:
    with running_upstream(UpstreamConfig(latency_ms=100, fail_first=1, error_status=400)
                          ) as (url, state):
        runtime: Runtime = configure(database_url=database_url, upstreams=crm(url))
        first, _ = register_batch(runtime, contacts(5, "k"))
        second, _ = register_batch(runtime, contacts(5, "k"))
        run_at_once(first, second)

        # Whichever went first got the 400; the other ran the key itself, and it worked.
        outcomes = sorted([r.state.value for r in runtime.store.results.of_batch(first)] +
                          [r.state.value for r in runtime.store.results.of_batch(second)])
        assert outcomes == ["failed"] * 5 + ["succeeded"] * 5
        assert Counter(r.key for r in state.requests) == {f"k-{i}": 2 for i in range(5)}


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_batch_survives_kill_9_of_its_runner_and_applies_every_key_once(
        configure: Any, pg_database: str, tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    from tests.conftest import _truncate_pg

    _truncate_pg(pg_database)
    deployments = ("process-batch/process-batch", "reap-stale-batches/reap-stale-batches")
    with running_upstream(UpstreamConfig(latency_ms=20)) as (url, state):
        runtime: Runtime = configure(
            # An upstream name of its own: the killed run's limit slots stay taken for a minute.
            database_url=pg_database, upstreams=crm(url, name="crashed"), heartbeat_seconds="0.5",
            stale_after_seconds="3")
        env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
               "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
        batch_id, total = register_batch(runtime, contacts(2000), concurrency=10,
                                         max_operations=10_000)
        assert total == 2000

        with serving_deployments(env, deployments, tmp_path / "runner-1.log") as runner:
            first_run = run_deployment("process-batch/process-batch",
                                       parameters={"batch_id": batch_id}, timeout=0)
            _wait_for(lambda: len(state.requests) >= 400, 120, "the batch to get going")
            # The machine dies: the runner and the flow-run process it started.
            killed = kill_process_tree(runner.pid)
            runner.wait(10)
        assert len(killed) >= 2  # the runner and the flow run's process
        sent_before_kill = len(state.requests)
        time.sleep(0.5)
        assert len(state.requests) - sent_before_kill <= 10  # nothing runs any more
        assert runtime.store.get_batch(batch_id).status == BatchState.PROCESSING.value

        time.sleep(3.5)  # longer than stale_after_seconds: the batch's heartbeat is old
        with serving_deployments(env, deployments, tmp_path / "runner-2.log"):
            reaper = run_deployment("reap-stale-batches/reap-stale-batches", timeout=120)
            assert reaper.state is not None and reaper.state.is_completed()
            _wait_for(lambda: runtime.store.get_batch(batch_id).status
                      == BatchState.COMPLETED.value, 180, "the batch to complete")

        status = runtime.store.status(batch_id)
        assert (status.total, status.succeeded, status.failed) == (2000, 2000, 0)
        batch = runtime.store.get_batch(batch_id)
        assert batch.recoveries == 1 and batch.flow_run_id != str(first_run.id)
        with get_client(sync_client=True) as client:
            old = client.read_flow_run(UUID(str(first_run.id)))
        assert old.state is not None and old.state.is_crashed()

        # Every operation was applied upstream exactly once. Only what was in flight when the
        # runner died (the batch's concurrency, 10), or answered before its checkpoint was
        # committed, was sent again, with its idempotency key, and the upstream answered it
        # from its record. The writer gathers answers for the linger time (50 ms: at most
        # 10 / 20 ms * 50 ms = 25 of them) while the previous group commits; on a loaded
        # machine a commit takes longer than the linger (65 were resent in one CI run), so the
        # bound allows three lingers' worth besides the group being gathered — still a fraction
        # of the 500-item chunk a run without checkpoints would send again.
        keys = {f"{batch_id}:{i}" for i in range(2000)}
        assert set(state.executions) == keys
        assert set(state.executions.values()) == {1}
        resent = [k for k, n in Counter(r.key for r in state.requests).items() if n > 1]
        linger = runtime.settings.execution.checkpoint_linger_seconds
        assert len(resent) <= 10 + 4 * math.ceil(10 / 0.020 * linger)
        for key in resent:
            outcomes = [r.outcome for r in state.requests if r.key == key]
            assert outcomes[1:] == ["replayed"] * (len(outcomes) - 1), (key, outcomes)
