"""The HTTP API end to end: a real uvicorn server, the Prefect test server, real databases.

Sync batches run in the API process; async ones are flow runs of the ``process-batch``
deployment, executed by a runner serving it from a subprocess (as ``batchops serve`` does).
"""

from __future__ import annotations

import asyncio
import contextvars
import csv
import io
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import uvicorn

from api.main import create_app, server_options
from batchops.auth import ApiKeyring, check_bind, hash_key
from batchops.errors import ConfigurationError
from batchops.quota import LocalCounter, OperationsQuota, QuotaExceeded, RedisCounter
from batchops.runtime import Runtime, get_runtime
from batchops.settings import Settings, get_settings
from tests.runner import serving_deployments

pytestmark = pytest.mark.usefixtures("prefect_server")

REPO = Path(__file__).resolve().parent.parent
DEPLOYMENT = "process-batch/process-batch"
REDIS_URL = "redis://127.0.0.1:6379/0"


class ApiServer:
    """The API served by uvicorn in a thread, on a free 127.0.0.1 port."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # Served as `batchops api` serves it (its HTTP parser and limits).
        config = uvicorn.Config(create_app(), log_level="warning", lifespan="on",
                                **server_options(get_settings()))
        self._server = uvicorn.Server(config)
        # The test's context (its Prefect settings) goes with the server thread.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, name="api-server", daemon=True,
                                        args=(self._server.run,),
                                        kwargs={"sockets": [self._sock]})

    def start(self) -> ApiServer:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(60)
        self._sock.close()


@pytest.fixture
def start_api(configure: Callable[..., Runtime]) -> Iterator[Callable[..., httpx.Client]]:
    """``start_api(**settings)``: configure batchops, serve the API, return a client for it."""
    started: list[tuple[ApiServer, httpx.Client]] = []

    def start(**settings: Any) -> httpx.Client:
        configure(**settings)
        server = ApiServer().start()
        client = httpx.Client(base_url=server.url, timeout=60)
        started.append((server, client))
        return client

    yield start
    for server, client in started:
        client.close()
        server.stop()


@pytest.fixture
def api(start_api: Callable[..., httpx.Client], database_url: str) -> httpx.Client:
    """The API on the parametrized store database, without API keys."""
    return start_api(database_url=database_url)


@pytest.fixture(scope="module")
def deployment_runner(prefect_server: None, pg_database: str,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A runner serving ``process-batch`` (a subprocess) on the session's PostgreSQL database."""
    from prefect.settings import PREFECT_API_URL

    log_path = tmp_path_factory.mktemp("runner") / "runner.log"
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "BATCHOPS_DATABASE_URL": pg_database, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    with serving_deployments(env, (DEPLOYMENT,), log_path):
        yield pg_database


# -- helpers -----------------------------------------------------------------------------------


def user(i: int, email: str | None = None, op_id: str | None = None) -> dict[str, Any]:
    return {"id": op_id or f"op{i}", "method": "POST", "path": "/users",
            "body": {"id": i, "email": email or f"user{i}@example.com", "name": f"User {i}"}}


def table_rows(runtime: Runtime, table: str) -> list[dict[str, Any]]:
    with runtime.store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(
            sa.text(f"SELECT * FROM {table} ORDER BY 1")).mappings()]


def poll_until_finished(client: httpx.Client, status_url: str, timeout: float = 120,
                        ) -> list[dict[str, Any]]:
    """Every status reading until the batch has finished."""
    readings = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = client.get(status_url)
        assert answer.status_code == 200, answer.text
        readings.append(answer.json())
        if readings[-1]["status"] in ("completed", "failed", "cancelled"):
            return readings
        time.sleep(0.2)
    raise AssertionError(f"batch did not finish in {timeout} s: {readings[-1]}")


def assert_error(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert "Traceback" not in answer.text
    return dict(error)


# -- sync batches ------------------------------------------------------------------------------


def test_small_batch_runs_sync_and_answers_200_with_every_result(
        api: httpx.Client, database_url: str) -> None:
    answer = api.post("/batches", json={"operations": [user(i) for i in range(1, 6)]})

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "completed"
    assert body["summary"] == {"total": 5, "succeeded": 5, "failed": 0, "skipped": 0}
    assert body["results"][0] == {
        "id": "op1", "index": 0, "status": 201, "state": "succeeded",
        "result": {"id": 1, "email": "user1@example.com", "name": "User 1"},
        "attempts": 1, "replayed": False}
    assert [(r["index"], r["status"]) for r in body["results"]] == [(i, 201) for i in range(5)]
    assert [u["email"] for u in table_rows(get_runtime(), "users")] == [
        f"user{i}@example.com" for i in range(1, 6)]


def test_sync_batch_is_a_flow_run_with_its_chunk_task_run_and_artifacts_after_the_answer(
        api: httpx.Client) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    answer = api.post("/batches", json={"operations": [user(i) for i in range(1, 4)]})
    assert answer.status_code == 200, answer.text
    batch_id = answer.json()["batch_id"]
    flow_run_id = uuid.UUID(api.get(f"/batches/{batch_id}/status").json()["flow_run_id"])

    # The answer leaves once the store has the results; Prefect's bookkeeping may finish after.
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            chunks = [t for t in task_runs if t.name == "chunk 0 (items 0-2)"]
            done = (flow_run.state is not None and flow_run.state.is_completed()
                    and chunks and chunks[0].state is not None
                    and chunks[0].state.is_completed()
                    and {a.type for a in artifacts} >= {"table", "markdown"})
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert flow_run.name == f"batch-{batch_id}"
    assert flow_run.state is not None and flow_run.state.is_completed()
    assert len(chunks) == 1 and chunks[0].state is not None and chunks[0].state.is_completed()
    table = next(a for a in artifacts if a.type == "table").data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [(r["index"], r["state"], r["status"]) for r in rows] == [
        (i, "succeeded", 201) for i in range(3)]
    assert any(a.type == "markdown" for a in artifacts)


def test_failed_items_answer_207_with_exact_per_item_results(start_api: Callable[..., httpx.Client],
                                                             tmp_path: Path) -> None:
    api = start_api(database_url=f"sqlite:///{tmp_path / 'store.db'}")
    ops = [user(1), user(2, email="user1@example.com"), {"id": "gone", "method": "DELETE",
                                                         "path": "/users/99"}, user(3)]

    answer = api.post("/batches", json={"operations": ops, "mode": "sync"})

    assert answer.status_code == 207, answer.text
    body = answer.json()
    assert body["status"] == "completed"
    assert body["summary"] == {"total": 4, "succeeded": 2, "failed": 2, "skipped": 0}
    results = body["results"]
    assert [(r["id"], r["state"], r["status"]) for r in results] == [
        ("op1", "succeeded", 201), ("op2", "failed", 409), ("gone", "failed", 404),
        ("op3", "succeeded", 201)]
    assert results[1]["error"]["code"] == "unique_violation"
    assert results[2]["error"]["code"] == "not_found"
    assert "result" not in results[1] and "error" not in results[0]
    # the failed items are also what ?state=failed lists
    failed = api.get(f"/batches/{body['batch_id']}/results", params={"state": "failed"}).json()
    assert [r["id"] for r in failed["items"]] == ["op2", "gone"]
    assert failed["next_after"] is None


def test_sync_wait_over_answers_202_and_the_run_completes(
        start_api: Callable[..., httpx.Client], tmp_path: Path) -> None:
    api = start_api(database_url=f"sqlite:///{tmp_path / 'store.db'}")
    ops = [{"id": f"=cmd{i}", "method": "POST", "path": "/emails",
            "body": {"to": f"u{i}@example.com", "send_latency": 0.3}} for i in range(3)]

    answer = api.post("/batches", json={"operations": ops}, headers={"Prefer": "wait=0"})

    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["status"] in ("queued", "processing")
    assert answer.headers["Location"] == body["status_url"]
    assert body["status_url"] == f"{api.base_url}/batches/{body['batch_id']}/status"
    assert answer.headers["Preference-Applied"] == "wait=0"
    final = poll_until_finished(api, body["status_url"])[-1]
    assert (final["status"], final["total"], final["succeeded"], final["progress"]) == (
        "completed", 3, 3, 1.0)
    assert final["flow_run_id"]
    assert final["ui_url"] == f"http://127.0.0.1:4200/runs/flow-run/{final['flow_run_id']}"
    # results as a CSV download: the input's formula-like ids are escaped
    download = api.get(f"/batches/{body['batch_id']}/results", params={"format": "csv"})
    assert download.status_code == 200
    assert download.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(download.text)))
    assert [(r["index"], r["id"], r["state"], r["status"]) for r in rows] == [
        (str(i), f"'=cmd{i}", "succeeded", "201") for i in range(3)]


# -- async batches (the deployment, run by the runner) -----------------------------------------


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_large_batch_runs_async_with_monotonic_progress_and_exact_counts(
        deployment_runner: str, start_api: Callable[..., httpx.Client],
        database_url: str) -> None:
    api = start_api(database_url=database_url)
    ops = [user(i) for i in range(600)]
    dupes = {120, 450, 599}
    for i in dupes:
        ops[i] = user(i, email=f"user{i - 100}@example.com")

    answer = api.post("/batches", json={"operations": ops})
    # a small batch goes async too when the client prefers it
    small = api.post("/batches", json={"operations": [user(1000)]},
                     headers={"Prefer": "respond-async"})

    assert answer.status_code == 202, answer.text
    assert small.status_code == 202, small.text
    assert small.headers["Preference-Applied"] == "respond-async"
    body = answer.json()
    assert answer.headers["Location"] == body["status_url"]
    readings = poll_until_finished(api, body["status_url"])
    for before, after in pairwise(readings):
        assert after["completed"] >= before["completed"]
        assert after["progress"] >= before["progress"]
    final = readings[-1]
    assert (final["status"], final["total"], final["completed"], final["succeeded"],
            final["failed"], final["progress"]) == ("completed", 600, 600, 597, 3, 1.0)
    assert final["flow_run_id"] and final["ui_url"].endswith(final["flow_run_id"])
    assert poll_until_finished(api, small.json()["status_url"])[-1]["succeeded"] == 1

    failed = api.get(f"/batches/{body['batch_id']}/results", params={"state": "failed"}).json()
    assert {r["index"] for r in failed["items"]} == dupes
    assert {r["error"]["code"] for r in failed["items"]} == {"unique_violation"}
    pages, after = [], -1
    while after is not None:
        page = api.get(f"/batches/{body['batch_id']}/results",
                       params={"limit": 250, "after": after}).json()
        pages.append(page["items"])
        after = page["next_after"]
    assert [len(p) for p in pages] == [250, 250, 100]
    assert [r["index"] for p in pages for r in p] == list(range(600))
    assert len(table_rows(get_runtime(), "users")) == 598


# -- batch-level idempotency -------------------------------------------------------------------


def test_same_idempotency_key_and_body_replays_the_same_batch_without_a_second_run(
        start_api: Callable[..., httpx.Client], tmp_path: Path) -> None:
    api = start_api(database_url=f"sqlite:///{tmp_path / 'store.db'}")
    request = {"operations": [user(1), user(2)]}
    headers = {"Idempotency-Key": "import-2026-11-23"}

    first = api.post("/batches", json=request, headers=headers)
    # the same body with its keys in another order is the same request
    again = api.post("/batches", content=json.dumps({"operations": [
        {"body": op["body"], "path": op["path"], "method": op["method"], "id": op["id"]}
        for op in request["operations"]]}),
        headers={**headers, "Content-Type": "application/json"})
    other = api.post("/batches", json={"operations": [user(3)]}, headers=headers)

    assert first.status_code == 200, first.text
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert_error(other, 409, "idempotency_key_reused")
    runtime = get_runtime()
    assert len(table_rows(runtime, "batches")) == 1
    assert len(table_rows(runtime, "users")) == 2


def test_idempotency_key_is_free_again_after_an_invalid_request(
        start_api: Callable[..., httpx.Client], tmp_path: Path) -> None:
    api = start_api(database_url=f"sqlite:///{tmp_path / 'store.db'}")
    headers = {"Idempotency-Key": "k1"}

    bad = api.post("/batches", json={"operations": [{"method": "POST", "path": "/users",
                                                     "body": {"id": "x"}}]}, headers=headers)
    good = api.post("/batches", json={"operations": [user(1)]}, headers=headers)

    assert_error(bad, 422, "validation_failed")
    assert good.status_code == 200, good.text


# -- request errors ----------------------------------------------------------------------------


def test_invalid_operations_answer_422_with_every_error_and_run_nothing(
        start_api: Callable[..., httpx.Client], tmp_path: Path) -> None:
    api = start_api(database_url=f"sqlite:///{tmp_path / 'store.db'}")
    ops = [user(1),
           {"id": "a", "method": "POST", "path": "/users", "body": {"id": "x", "email": "e"}},
           {"id": "b", "method": "FETCH", "path": "/users"},
           {"id": "c", "method": "POST", "path": "/nowhere", "body": {}},
           {"id": "d", "method": "PATCH", "path": "/users/1", "body": {"colour": "red"}}]

    answer = api.post("/batches", json={"operations": ops, "concurrency": 0})

    error = assert_error(answer, 422, "validation_failed")
    found = {(e["index"], e["id"], e["field"]) for e in error["errors"]}
    assert found == {(None, None, "concurrency"), (1, "a", "body.id"), (2, "b", "method"),
                     (3, "c", "path"), (4, "d", "body.colour")}
    assert all(e["message"] for e in error["errors"])
    assert table_rows(get_runtime(), "batches") == []
    assert table_rows(get_runtime(), "users") == []


def test_malformed_json_answers_400(start_api: Callable[..., httpx.Client],
                                    tmp_path: Path) -> None:
    api = start_api(database_url=f"sqlite:///{tmp_path / 'store.db'}")

    assert_error(api.post("/batches", content=b'{"operations": [', headers={
        "Content-Type": "application/json"}), 400, "malformed_json")
    assert_error(api.post("/batches", content=b"NaN", headers={
        "Content-Type": "application/json"}), 400, "malformed_json")
    assert_error(api.post("/batches", json=[user(1)]), 422, "validation_failed")


def test_over_a_thousand_operations_answers_413_before_validating(
        start_api: Callable[..., httpx.Client], tmp_path: Path) -> None:
    api = start_api(database_url=f"sqlite:///{tmp_path / 'store.db'}")
    ops = [{"method": "BOGUS", "path": "nowhere"}] * 1001

    error = assert_error(api.post("/batches", json={"operations": ops}), 413, "batch_too_large")

    assert error["limit"] == 1000


def test_body_over_the_size_limit_is_refused_while_it_streams(
        start_api: Callable[..., httpx.Client], tmp_path: Path) -> None:
    api = start_api(database_url=f"sqlite:///{tmp_path / 'store.db'}")
    total = 20 * 1024 * 1024
    piece = b" " * (256 * 1024)
    sent = 0

    def body() -> Iterator[bytes]:  # chunked: no Content-Length to refuse it by
        nonlocal sent
        yield b'{"operations": ['
        while sent < total:
            sent += len(piece)
            yield piece

    answer = api.post("/batches", content=body(), headers={"Content-Type": "application/json"})

    error = assert_error(answer, 413, "batch_too_large")
    assert error["limit_bytes"] == 10 * 1024 * 1024
    assert answer.headers["Connection"] == "close"
    assert sent < total, "the server read the whole upload"
    # a declared length over the limit is refused before any of the body is sent
    with socket.create_connection(("127.0.0.1", api.base_url.port or 80), timeout=10) as sock:
        sock.sendall(b"POST /batches HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json"
                     b"\r\nContent-Length: 1073741824\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")


def test_dry_run_answers_the_plan_and_executes_nothing(
        api: httpx.Client, database_url: str) -> None:
    ops = [user(i) for i in range(700)]
    ops += [{"method": "PUT", "path": "/orders/1", "body": {"status": "new"}},
            {"method": "POST", "path": "/emails", "body": {"to": "a@example.com"}}]

    answer = api.post("/batches", params={"dry_run": "true"}, json={"operations": ops})

    assert answer.status_code == 200, answer.text
    assert answer.json() == {"dry_run": True, "total": 702, "chunks": 2, "mode": "async",
                             "by_target_method": {"python POST": 1, "sql POST": 700,
                                                  "sql PUT": 1}}
    runtime = get_runtime()
    assert table_rows(runtime, "batches") == []
    assert table_rows(runtime, "users") == []
    assert table_rows(runtime, "outbox") == []
    bad = api.post("/batches", params={"dry_run": "true"},
                   json={"operations": [{"method": "POST", "path": "/users", "body": {}}]})
    assert_error(bad, 422, "validation_failed")


def test_unknown_batch_answers_404(api: httpx.Client) -> None:
    assert_error(api.get("/batches/nope/status"), 404, "batch_not_found")
    assert_error(api.get("/batches/nope/results"), 404, "batch_not_found")
    assert_error(api.get("/nothing-here"), 404, "not_found")
    assert_error(api.get("/batches/x/results", params={"limit": 0}), 422, "validation_failed")


# -- API keys and quota ------------------------------------------------------------------------


def test_api_keys_are_required_and_scope_the_batches(
        start_api: Callable[..., httpx.Client], tmp_path: Path) -> None:
    key_a, key_b = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"
    api = start_api(database_url=f"sqlite:///{tmp_path / 'store.db'}",
                    api_keys=json.dumps([key_a, f"sha256:{hash_key(key_b)}"]))
    request = {"operations": [user(1)]}

    assert_error(api.post("/batches", json=request), 401, "unauthorized")
    assert_error(api.post("/batches", json=request, headers={"X-API-Key": "wrong"}),
                 401, "unauthorized")
    assert_error(api.get("/batches/x/status", headers={"Authorization": "Bearer wrong"}),
                 401, "unauthorized")
    created = api.post("/batches", json=request, headers={"Authorization": f"Bearer {key_a}"})
    assert created.status_code == 200, created.text
    status_path = f"/batches/{created.json()['batch_id']}/status"
    assert api.get(status_path, headers={"X-API-Key": key_a}).status_code == 200
    # another key's batch does not exist for this caller
    assert_error(api.get(status_path, headers={"X-API-Key": key_b}), 404, "batch_not_found")
    assert api.get("/healthz").status_code == 200  # operations endpoints stay open


def test_operations_quota_counts_operations_and_answers_429_with_retry_after(
        start_api: Callable[..., httpx.Client], tmp_path: Path) -> None:
    key = f"quota-{uuid.uuid4().hex}"  # a fresh scope: the Redis counter is shared
    api = start_api(database_url=f"sqlite:///{tmp_path / 'store.db'}", redis_url=REDIS_URL,
                    quota_ops_per_minute=10, api_keys=json.dumps([key]))
    headers = {"X-API-Key": key, "Prefer": "wait=0"}

    first = api.post("/batches", json={"operations": [user(i) for i in range(1, 7)]},
                     headers=headers)
    over = api.post("/batches", json={"operations": [user(i) for i in range(7, 13)]},
                    headers=headers)
    fits = api.post("/batches", json={"operations": [user(i) for i in range(7, 11)]},
                    headers=headers)

    assert first.status_code == 202, first.text
    error = assert_error(over, 429, "quota_exceeded")
    assert 1 <= int(over.headers["Retry-After"]) <= 60
    assert error["limit"] == 10
    assert fits.status_code == 202, fits.text  # the refused request's operations were not counted
    assert_error(api.post("/batches", json={"operations": [user(11)]}, headers=headers),
                 429, "quota_exceeded")


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_quota_window_counts_operations_per_scope(backend: str) -> None:
    now = [1_000_000 * 60 + 15.0]
    scope = f"test-{uuid.uuid4().hex}"

    async def scenario() -> None:
        counter = LocalCounter() if backend == "local" else RedisCounter(REDIS_URL)
        quota = OperationsQuota(5, counter, clock=lambda: now[0])
        try:
            await quota.charge(scope, 5)
            with pytest.raises(QuotaExceeded) as refused:
                await quota.charge(scope, 1)
            assert refused.value.retry_after == 45
            await quota.charge(f"{scope}-other", 5)  # other scopes have their own count
            now[0] += 45  # the next minute starts afresh
            await quota.charge(scope, 5)
        finally:
            await quota.close()

    asyncio.run(scenario())


def test_without_api_keys_the_server_binds_to_loopback_only() -> None:
    no_keys = Settings(api_keys=[])
    check_bind("127.0.0.1", no_keys)
    with pytest.raises(ConfigurationError):
        check_bind("0.0.0.0", no_keys)
    with pytest.raises(ConfigurationError):
        check_bind("192.168.1.20", no_keys)
    check_bind("::1", no_keys)
    check_bind("0.0.0.0", Settings(api_keys=["k"]))  # type: ignore[list-item]
    assert ApiKeyring.from_settings(no_keys).scope_for(None) == "default"


# -- operations --------------------------------------------------------------------------------


def test_health_readiness_metrics_and_docs(api: httpx.Client) -> None:
    api.post("/batches", json={"operations": [user(1), user(2, email="user1@example.com")]})

    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready", "checks": {"store": "ok", "prefect": "ok"}}
    metrics = api.get("/metrics")
    assert metrics.status_code == 200
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in metrics.text.splitlines() if line and not line.startswith("#")}
    assert samples['batchops_batches{state="completed"}'] == 1
    assert samples['batchops_items{state="succeeded"}'] == 1
    assert samples['batchops_items{state="failed"}'] == 1
    assert samples["batchops_item_latency_seconds_count"] == 2
    assert samples['batchops_item_latency_seconds_bucket{le="+Inf"}'] == 2
    assert samples["batchops_item_retries_total"] == 0
    assert samples['batchops_api_batches_submitted_total{mode="sync"}'] == 1
    docs = api.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = api.get("/openapi.json").json()
    assert "BatchCreate" in schema["components"]["schemas"]


def test_readiness_fails_when_the_prefect_api_is_unreachable(
        start_api: Callable[..., httpx.Client], tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{unused.getsockname()[1]}/api"
    with temporary_settings(updates={PREFECT_API_URL: dead}):
        api = start_api(database_url=f"sqlite:///{tmp_path / 'store.db'}")

    error = assert_error(api.get("/readyz"), 503, "not_ready")

    assert error["checks"]["store"] == "ok"
    assert error["checks"]["prefect"] != "ok"
