"""The HTTP edge of the API: content types, Host and Origin, quota refusals, header sizes, list
settings. A real uvicorn server (as ``batchops api`` serves it), the Prefect test server, a
SQLite store; every refusal is checked for what it leaves behind: nothing."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchops.runtime import get_runtime
from tests.test_api import assert_error, start_api, table_rows, user  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("prefect_server")

StartApi = Callable[..., httpx.Client]
BATCH = json.dumps({"operations": [user(1)]})


def nothing_stored() -> bool:
    runtime = get_runtime()
    return table_rows(runtime, "batches") == [] and table_rows(runtime, "users") == []


def csv_rows(count: int, start: int = 1) -> str:
    return "".join(f"{i},user{i}@example.com,User {i}\n" for i in range(start, start + count))


@pytest.fixture
def sqlite_api(start_api: StartApi, tmp_path: Path) -> Callable[..., httpx.Client]:  # noqa: F811
    def start(**settings: Any) -> httpx.Client:
        return start_api(database_url=f"sqlite:///{tmp_path / 'store.db'}", **settings)

    return start


# -- item 4: Content-Type ----------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [
    None, "text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", "application/xml", "application/json; charset=latin-1",
])
def test_a_batch_body_not_declared_json_is_a_415_and_nothing_runs(
        sqlite_api: Callable[..., httpx.Client], content_type: str | None) -> None:
    api = sqlite_api()
    headers = {"Content-Type": content_type} if content_type else {}

    answer = api.post("/batches", content=BATCH, headers=headers)

    error = assert_error(answer, 415, "unsupported_media_type")
    assert "application/json" in error["message"]
    assert nothing_stored()


def test_json_with_a_charset_or_a_json_suffix_type_runs(
        sqlite_api: Callable[..., httpx.Client]) -> None:
    api = sqlite_api()

    for i, content_type in enumerate(["application/json; charset=UTF-8",
                                      "application/vnd.batch+json"], start=1):
        answer = api.post("/batches", content=json.dumps({"operations": [user(i)]}),
                          headers={"Content-Type": content_type})
        assert answer.status_code == 200, answer.text

    assert len(table_rows(get_runtime(), "users")) == 2


def test_a_replay_body_not_declared_json_is_a_415(
        sqlite_api: Callable[..., httpx.Client]) -> None:
    api = sqlite_api()

    for headers in ({"Content-Type": "text/plain"}, {}):
        answer = api.post("/dead-letters/replay", content=b'{"all": true}', headers=headers)
        assert_error(answer, 415, "unsupported_media_type")
    assert table_rows(get_runtime(), "batches") == []


def test_a_csv_import_takes_a_csv_body_or_a_multipart_upload_only(
        sqlite_api: Callable[..., httpx.Client]) -> None:
    api = sqlite_api()
    rows = "id,email,name\n" + csv_rows(3)

    for headers in ({}, {"Content-Type": "application/json"},
                    {"Content-Type": "application/x-www-form-urlencoded"}):
        answer = api.post("/batches/import", params={"resource": "users", "method": "POST"},
                          content=rows, headers=headers)
        error = assert_error(answer, 415, "unsupported_media_type")
        assert error["accepted"] == ["text/csv", "multipart/form-data"]
    assert nothing_stored()


# -- item 4: Host and Origin -------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.nip.io",
                                  "localhost.evil.example", "10.0.0.5", "[::2]:80"])
def test_without_api_keys_a_request_for_another_host_is_refused(
        sqlite_api: Callable[..., httpx.Client], host: str) -> None:
    api = sqlite_api()

    for method, path in (("POST", "/batches"), ("GET", "/healthz"), ("GET", "/docs"),
                         ("GET", "/nothing-here")):
        answer = api.request(method, path, content=BATCH,
                             headers={"Host": host, "Content-Type": "application/json"})
        error = assert_error(answer, 421, "host_not_allowed")
        assert "localhost" in error["message"]
    assert nothing_stored()


def test_without_api_keys_loopback_hosts_are_answered_on_any_port(
        sqlite_api: Callable[..., httpx.Client]) -> None:
    api = sqlite_api()

    for host in ("localhost", "LOCALHOST:1234", "127.0.0.1", "127.0.0.1:8000", "[::1]",
                 "[::1]:8000", "localhost."):
        answer = api.get("/healthz", headers={"Host": host})
        assert answer.status_code == 200, (host, answer.text)


def test_allowed_hosts_setting_names_the_hosts_answered_with_or_without_keys(
        sqlite_api: Callable[..., httpx.Client]) -> None:
    key = f"k-{uuid.uuid4().hex}"
    keyed = sqlite_api(api_keys=json.dumps([key]))
    # With API keys and no allowed_hosts, any Host is answered.
    assert keyed.get("/healthz", headers={"Host": "api.example.com"}).status_code == 200

    api = sqlite_api(allowed_hosts="api.example.com, *.internal.test", api_keys=key)
    auth = {"X-API-Key": key}
    for host in ("api.example.com", "api.example.com:443", "batch.internal.test"):
        assert api.get("/healthz", headers={"Host": host, **auth}).status_code == 200, host
    for host in ("127.0.0.1", "internal.test", "evil.example"):
        assert_error(api.get("/healthz", headers={"Host": host, **auth}),
                     421, "host_not_allowed")


def test_without_api_keys_a_page_of_another_host_cannot_post_a_form(
        sqlite_api: Callable[..., httpx.Client]) -> None:
    api = sqlite_api()
    upload = {"file": ("users.csv", "id,email,name\n" + csv_rows(2), "text/csv")}
    params = {"resource": "users", "method": "POST"}

    for origin in ("http://evil.example", "https://127.0.0.1.evil.example", "null"):
        answer = api.post("/batches/import", params=params, files=upload,
                          headers={"Origin": origin})
        assert_error(answer, 403, "origin_not_allowed")
    assert nothing_stored()
    # A page served from this machine may (the API's own /docs, a local tool).
    answer = api.post("/batches", content=BATCH, headers={
        "Origin": "http://localhost:3000", "Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text


# -- item 7: quota refusals --------------------------------------------------------------------


def test_a_batch_larger_than_the_quota_is_413_not_a_retryable_429_and_stores_nothing(
        sqlite_api: Callable[..., httpx.Client]) -> None:
    api = sqlite_api(quota_ops_per_minute=5)

    answer = api.post("/batches", json={"operations": [user(i) for i in range(1, 7)]})

    error = assert_error(answer, 413, "batch_exceeds_quota")
    assert (error["limit"], error["operations"], error["at_least"]) == (5, 6, False)
    assert "Retry-After" not in answer.headers
    assert nothing_stored()
    # A batch that fits the quota but not what is left of this minute: 429, stores nothing.
    assert api.post("/batches", json={"operations": [user(i) for i in range(1, 5)]}
                    ).status_code == 200
    late = api.post("/batches", json={"operations": [user(i) for i in range(5, 7)]},
                    headers={"Idempotency-Key": "late"})
    assert_error(late, 429, "quota_exceeded")
    assert 1 <= int(late.headers["Retry-After"]) <= 60
    assert len(table_rows(get_runtime(), "batches")) == 1
    assert len(table_rows(get_runtime(), "users")) == 4


def test_a_csv_import_larger_than_the_quota_is_413_before_the_file_is_read_and_stores_nothing(
        sqlite_api: Callable[..., httpx.Client]) -> None:
    api = sqlite_api(quota_ops_per_minute=100)
    params = {"resource": "users", "method": "POST"}
    header = "id,email,name\n"
    big = header + csv_rows(30_000)
    # Rows past the first pages a parser reads that would fail it: counting must stop first.
    broken_tail = header + csv_rows(25_000) + '7,"unterminated\n' + csv_rows(10, 25_001)

    for body in (big, broken_tail):
        answer = api.post("/batches/import", params=params, content=body,
                          headers={"Content-Type": "text/csv"})
        error = assert_error(answer, 413, "batch_exceeds_quota")
        assert (error["limit"], error["at_least"]) == (100, True)
        assert "more than 100" in error["message"]
        assert "Retry-After" not in answer.headers
    assert nothing_stored()


def test_a_csv_import_over_what_is_left_of_the_minute_is_429_and_stores_nothing(
        sqlite_api: Callable[..., httpx.Client]) -> None:
    api = sqlite_api(quota_ops_per_minute=10)
    assert api.post("/batches", json={"operations": [user(i) for i in range(1, 7)]}
                    ).status_code == 200

    answer = api.post("/batches/import", params={"resource": "users", "method": "POST"},
                      content="id,email,name\n" + csv_rows(5, 100),
                      headers={"Content-Type": "text/csv"})

    assert_error(answer, 429, "quota_exceeded")
    assert 1 <= int(answer.headers["Retry-After"]) <= 60
    assert len(table_rows(get_runtime(), "batches")) == 1  # only the first batch
    # The refused import was not counted: 4 more operations fit.
    assert api.post("/batches", json={"operations": [user(i) for i in range(7, 11)]}
                    ).status_code == 200


# -- item 9: header size -----------------------------------------------------------------------


def _read_status(sock: socket.socket) -> bytes:
    received = b""
    try:
        while b"\r\n" not in received:
            part = sock.recv(65536)
            if not part:
                break
            received += part
    except ConnectionResetError:
        pass
    return received.split(b"\r\n", 1)[0]


def test_a_request_head_over_the_header_limit_is_refused_quickly_and_the_server_answers_on(
        sqlite_api: Callable[..., httpx.Client]) -> None:
    api = sqlite_api()
    port = api.base_url.port
    assert port is not None
    line = b"X-Padding: " + b"a" * (1 << 20) + b"\r\n"

    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # The server may refuse (and close) before the whole line is sent.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + line + b"\r\n")
        status = _read_status(sock)
    seconds = time.monotonic() - started

    assert status.startswith(b"HTTP/1.1 4"), status
    assert seconds < 5, f"{seconds:.1f} s to refuse"
    assert api.get("/healthz").status_code == 200
    # A head within the limit (a long token, say) is answered.
    assert api.get("/healthz", headers={"X-Padding": "a" * 8000}).status_code == 200


# -- item 11: list settings --------------------------------------------------------------------


def test_api_keys_may_be_a_comma_separated_list(
        sqlite_api: Callable[..., httpx.Client]) -> None:
    first, second = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"
    api = sqlite_api(api_keys=f"{first}, {second}")

    for key in (first, second):
        answer = api.post("/batches", json={"operations": [user(1 if key == first else 2)]},
                          headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text
    assert_error(api.post("/batches", json={"operations": [user(3)]},
                          headers={"Authorization": f"Bearer {first},{second}"}),
                 401, "unauthorized")
