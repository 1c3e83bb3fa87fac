"""Completion callbacks: signed, retried, only to allowed hosts — against a real receiver.

The receiver is a small ASGI app served by uvicorn on 127.0.0.1, recording every request. As
127.0.0.1 is a loopback address, each test allowlists it and sets ``callback_allow_private``
(or leaves it unset, to see the refusal): exactly what the settings are for.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
import uvicorn
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from pydantic import ValidationError

from batchops.callbacks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    CallbackRecords,
    sign,
    verify_signature,
)
from batchops.errors import SignatureVerificationError
from batchops.registration import register_batch
from batchops.runtime import Runtime, get_runtime
from batchops.schemas import BatchState, CallbackState, CallbackStatus
from batchops.settings import Settings
from flows.process_batch import process_batch
from tests.test_api import ApiServer, assert_error, table_rows

pytestmark = pytest.mark.usefixtures("prefect_server")

SECRET = "whsec_test_0123456789"


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    """An HTTP receiver on a free 127.0.0.1 port: records requests, answers scripted statuses
    (then 200)."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.requests: list[Received] = []
        self.statuses = deque(statuses or [])
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(self._app, log_level="warning",
                                                     lifespan="off", interface="asgi3"))
        self._thread = threading.Thread(target=self._server.run, name="callback-receiver",
                                        kwargs={"sockets": [self._sock]}, daemon=True)

    def url(self, host: str = "127.0.0.1", path: str = "/hooks/batchops") -> str:
        return f"http://{host}:{self.port}{path}"

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Received(scope["method"], scope["path"], headers, body,
                                      time.monotonic()))
        status = self.statuses.popleft() if self.statuses else 200
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"noted"})

    def start(self) -> Receiver:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the receiver did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(statuses: list[int] | None = None) -> Receiver:
        started.append(Receiver(statuses).start())
        return started[-1]

    yield start
    for r in started:
        r.stop()


def callback_settings(**overrides: Any) -> dict[str, Any]:
    """Settings for callbacks to this machine's receiver, small retry delays."""
    return {"callback_secret": SECRET, "callback_allowed_hosts": '["127.0.0.1", "localhost"]',
            "callback_allow_private": "true", "callback_backoff_seconds": "0.05",
            "callback_retries": "3", "callback_timeout_seconds": "5", **overrides}


def user(i: int, email: str | None = None) -> dict[str, Any]:
    return {"id": f"op{i}", "method": "POST", "path": "/users",
            "body": {"id": i, "email": email or f"user{i}@example.com", "name": f"User {i}"}}


def run_with_callback(runtime: Runtime, url: str, ops: list[dict[str, Any]] | None = None,
                      ) -> str:
    batch_id, _ = register_batch(runtime, ops or [user(1), user(2)], callback_url=url,
                                 status_url="http://api.test/batches/b/status")
    process_batch(batch_id=batch_id)  # returns normally: a callback never fails the flow
    return batch_id


def delivery(runtime: Runtime, batch_id: str) -> CallbackStatus:
    status = CallbackRecords(runtime.store).get(batch_id)
    assert status is not None
    return status


# -- delivery --------------------------------------------------------------------------------


def test_finished_batch_posts_a_signed_summary_once(
        configure: Callable[..., Runtime], database_url: str,
        receiver: Callable[..., Receiver]) -> None:
    hook = receiver()
    runtime = configure(database_url=database_url, **callback_settings())
    ops = [user(1), user(2), user(3, email="user1@example.com")]  # the third one conflicts

    batch_id = run_with_callback(runtime, hook.url(), ops)

    assert len(hook.requests) == 1
    got = hook.requests[0]
    assert (got.method, got.path) == ("POST", "/hooks/batchops")
    assert got.headers["content-type"] == "application/json"
    assert got.headers[EVENT_HEADER.lower()] == "batch.completed"
    assert got.headers[DELIVERY_HEADER.lower()] == got.headers["idempotency-key"]
    timestamp = verify_signature(SECRET, got.headers[SIGNATURE_HEADER.lower()], got.body)
    assert abs(timestamp - time.time()) < 60
    batch = runtime.store.status(batch_id)
    assert json.loads(got.body) == {
        "event": "batch.completed", "batch_id": batch_id, "status": "completed",
        "summary": {"total": 3, "succeeded": 2, "failed": 1, "skipped": 0},
        "finished_at": batch.finished_at.isoformat().replace("+00:00", "Z")
        if batch.finished_at else None,
        "status_url": "http://api.test/batches/b/status",
    }
    recorded = delivery(runtime, batch_id)
    assert (recorded.status, recorded.attempts, recorded.last_status_code,
            recorded.last_error) == (CallbackState.DELIVERED, 1, 200, None)
    assert recorded.delivery_id == got.headers[DELIVERY_HEADER.lower()]
    assert recorded.delivered_at is not None


def test_receiver_errors_are_retried_with_backoff_until_delivered(
        configure: Callable[..., Runtime], database_url: str,
        receiver: Callable[..., Receiver]) -> None:
    hook = receiver([500, 503])
    runtime = configure(database_url=database_url,
                        **callback_settings(callback_backoff_seconds="0.3"))

    batch_id = run_with_callback(runtime, hook.url())

    assert len(hook.requests) == 3
    first, second, third = hook.requests
    # exponential backoff 0.3 s, 0.6 s, with jitter (never below ~63 % of the delay)
    assert second.at - first.at >= 0.18
    assert third.at - second.at >= 0.37
    assert len({r.headers["idempotency-key"] for r in hook.requests}) == 1  # one delivery
    for r in hook.requests:
        verify_signature(SECRET, r.headers[SIGNATURE_HEADER.lower()], r.body)
    recorded = delivery(runtime, batch_id)
    assert (recorded.status, recorded.attempts, recorded.last_status_code) == (
        CallbackState.DELIVERED, 3, 200)
    assert runtime.store.get_batch(batch_id).status == BatchState.COMPLETED.value


def test_a_4xx_answer_is_not_retried(configure: Callable[..., Runtime], database_url: str,
                                     receiver: Callable[..., Receiver]) -> None:
    hook = receiver([400])
    runtime = configure(database_url=database_url, **callback_settings())

    batch_id = run_with_callback(runtime, hook.url())

    assert len(hook.requests) == 1
    recorded = delivery(runtime, batch_id)
    assert (recorded.status, recorded.attempts, recorded.last_status_code) == (
        CallbackState.FAILED, 1, 400)
    assert "400" in (recorded.last_error or "")
    assert runtime.store.get_batch(batch_id).status == BatchState.COMPLETED.value


def test_unreachable_receiver_is_retried_then_recorded_failed_and_the_batch_completes(
        configure: Callable[..., Runtime], database_url: str) -> None:
    with socket.socket() as closed:  # a port nobody listens on: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    runtime = configure(database_url=database_url, **callback_settings(callback_retries="2"))

    batch_id = run_with_callback(runtime, f"http://127.0.0.1:{port}/hook")

    recorded = delivery(runtime, batch_id)
    assert (recorded.status, recorded.attempts, recorded.last_status_code) == (
        CallbackState.FAILED, 3, None)
    assert "ConnectError" in (recorded.last_error or "")
    batch = runtime.store.get_batch(batch_id)
    assert (batch.status, batch.succeeded) == (BatchState.COMPLETED.value, 2)
    assert batch.flow_run_id is not None
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(UUID(batch.flow_run_id)).state_type.value == "COMPLETED"


def test_private_address_is_refused_again_at_send_time(
        configure: Callable[..., Runtime], database_url: str,
        receiver: Callable[..., Receiver]) -> None:
    hook = receiver()
    runtime = configure(database_url=database_url, **callback_settings())
    batch_id, _ = register_batch(runtime, [user(1)], callback_url=hook.url("localhost"))
    # Between submit and send the address stops being acceptable (as after a DNS change).
    runtime = configure(database_url=database_url,
                        **callback_settings(callback_allow_private="false"))

    process_batch(batch_id=batch_id)

    assert hook.requests == []
    recorded = delivery(runtime, batch_id)
    assert (recorded.status, recorded.attempts) == (CallbackState.REFUSED, 0)
    assert "loopback" in (recorded.last_error or "")
    assert runtime.store.get_batch(batch_id).status == BatchState.COMPLETED.value


def test_batch_without_callback_runs_no_callback_task(
        configure: Callable[..., Runtime], database_url: str) -> None:
    runtime = configure(database_url=database_url, **callback_settings())
    batch_id, _ = register_batch(runtime, [user(1)])

    process_batch(batch_id=batch_id)

    flow_run_id = runtime.store.get_batch(batch_id).flow_run_id
    assert flow_run_id is not None
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
    names = {t.name for t in task_runs}
    assert "chunk 0 (items 0-0)" in names
    assert not any(n.startswith("callback") for n in names)
    assert CallbackRecords(runtime.store).get(batch_id) is None


# -- submitting through the API ----------------------------------------------------------------


@pytest.fixture
def serve_api(configure: Callable[..., Runtime]) -> Iterator[Callable[..., httpx.Client]]:
    started: list[tuple[ApiServer, httpx.Client]] = []

    def start(**settings: Any) -> httpx.Client:
        configure(**settings)
        server = ApiServer().start()
        started.append((server, httpx.Client(base_url=server.url, timeout=60)))
        return started[-1][1]

    yield start
    for server, client in started:
        client.close()
        server.stop()


@pytest.mark.parametrize(("url", "reason"), [
    ("http://hooks.elsewhere.test/x", "not on the callback allowlist"),
    ("https://hooks.example.com.evil.test/x", "not on the callback allowlist"),
    ("ftp://hooks.example.com/x", "scheme"),
    ("http://user:pass@hooks.example.com/x", "credentials"),
    ("http://127.0.0.1:9/x", "not on the callback allowlist"),
])
def test_disallowed_callback_url_answers_422_and_registers_nothing(
        serve_api: Callable[..., httpx.Client], database_url: str, url: str,
        reason: str) -> None:
    api = serve_api(database_url=database_url, callback_secret=SECRET,
                    callback_allowed_hosts='["hooks.example.com", "*.hooks.example.com"]')

    answer = api.post("/batches", json={"operations": [user(1)], "callback_url": url})

    error = assert_error(answer, 422, "callback_url_not_allowed")
    assert reason in error["message"]
    assert [(e["field"], e["index"]) for e in error["errors"]] == [("callback_url", None)]
    assert table_rows(get_runtime(), "batches") == []
    assert table_rows(get_runtime(), "users") == []


def test_without_an_allowlist_no_callback_is_accepted(
        serve_api: Callable[..., httpx.Client], database_url: str) -> None:
    api = serve_api(database_url=database_url)

    answer = api.post("/batches", json={"operations": [user(1)],
                                        "callback_url": "https://hooks.example.com/x"})

    assert "accepts no callbacks" in assert_error(answer, 422, "callback_url_not_allowed")[
        "message"]


def test_private_callback_address_is_refused_unless_allowed(
        serve_api: Callable[..., httpx.Client], database_url: str,
        receiver: Callable[..., Receiver]) -> None:
    hook = receiver()
    strict = serve_api(database_url=database_url, **callback_settings(
        callback_allow_private="false"))
    for host in ("127.0.0.1", "localhost"):  # an address, and a name resolving to loopback
        answer = strict.post("/batches", json={"operations": [user(1)],
                                               "callback_url": hook.url(host)})
        assert "loopback" in assert_error(answer, 422, "callback_url_not_allowed")["message"]
    assert table_rows(get_runtime(), "batches") == []

    api = serve_api(database_url=database_url, **callback_settings())
    answer = api.post("/batches", json={"operations": [user(1)],
                                        "callback_url": hook.url("localhost")})

    assert answer.status_code == 200, answer.text
    batch_id = answer.json()["batch_id"]
    status_url = f"{api.base_url}/batches/{batch_id}/status"
    deadline = time.monotonic() + 30
    while True:  # the callback goes out after the batch has finished
        status = api.get(f"/batches/{batch_id}/status").json()
        if status["callback"]["status"] != "pending" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status["callback"]["status"] == "delivered"
    assert status["callback"]["url"] == hook.url("localhost")
    assert status["callback"]["attempts"] == 1
    assert len(hook.requests) == 1
    assert hook.requests[0].headers["host"] == f"localhost:{hook.port}"
    body = json.loads(hook.requests[0].body)
    assert (body["batch_id"], body["status_url"], body["summary"]) == (
        batch_id, status_url, {"total": 1, "succeeded": 1, "failed": 0, "skipped": 0})


def test_ipv6_forms_of_private_ipv4_addresses_are_refused(
        serve_api: Callable[..., httpx.Client], tmp_path: Path) -> None:
    api = serve_api(database_url=f"sqlite:///{tmp_path / 'store.db'}", callback_secret=SECRET,
                    callback_allowed_hosts='["*"]')
    refused = {
        "2002:7f00:1::": "6to4 address of a loopback address (127.0.0.1)",
        "2002:c0a8:101::": "6to4 address of a private address (192.168.1.1)",
        "2002:a9fe:a9fe::1": "6to4 address of a link-local address (169.254.169.254)",
        "2001:0:4136:e378:8000:63bf:80ff:fffe": "Teredo address of a loopback address",
        "64:ff9b::7f00:1": "NAT64 address of a loopback address (127.0.0.1)",
        "64:ff9b::a00:1": "NAT64 address of a private address (10.0.0.1)",
        "64:ff9b:1::a00:1": "local-use NAT64 address",
        "::ffff:7f00:1": "IPv4-mapped address of a loopback address",
        "::ffff:0:a9fe:a9fe": "IPv4-translated address of a link-local address",
        "::7f00:1": "IPv4-compatible address of a loopback address",
    }

    for address, reason in refused.items():
        answer = api.post("/batches", json={"operations": [user(1)],
                                            "callback_url": f"http://[{address}]/hook"})
        assert reason in assert_error(answer, 422, "callback_url_not_allowed")["message"], (
            address)
    assert table_rows(get_runtime(), "batches") == []


# -- the signature, as a receiver checks it ------------------------------------------------------


def test_signature_verifies_and_rejects_tampering_replays_and_wrong_secrets() -> None:
    body = b'{"batch_id":"b1","status":"completed"}'
    now = int(time.time())
    header = sign(SECRET, body, timestamp=now)

    assert verify_signature(SECRET, header, body) == now
    with pytest.raises(SignatureVerificationError, match="does not match"):
        verify_signature(SECRET, header, body.replace(b"completed", b"failed"))
    with pytest.raises(SignatureVerificationError, match="does not match"):
        verify_signature("another secret", header, body)
    old = sign(SECRET, body, timestamp=now - 301)
    with pytest.raises(SignatureVerificationError, match="replay"):
        verify_signature(SECRET, old, body, tolerance=300)
    assert verify_signature(SECRET, old, body, tolerance=600) == now - 301
    for bad in (None, "", "t=abc,v1=00", f"t={now}", "v1=00"):
        with pytest.raises(SignatureVerificationError):
            verify_signature(SECRET, bad, body)


def test_signature_with_rotated_secrets_verifies_with_either() -> None:
    body = b"{}"
    now = int(time.time())
    new, old = sign("new-secret", body, now), sign("old-secret", body, now)
    header = f"{new},{old.split(',', 1)[1]}"  # t=…,v1=<new>,v1=<old>

    assert verify_signature("new-secret", header, body) == now
    assert verify_signature("old-secret", header, body) == now


def test_an_allowlist_without_a_secret_is_a_configuration_error() -> None:
    with pytest.raises(ValidationError, match="callback_secret"):
        Settings(callback_allowed_hosts=["hooks.example.com"])
