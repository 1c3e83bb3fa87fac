"""The http target against the fault-injecting upstream: forwarding, retries, limits, AIMD."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from batchops.devtools.upstream import UpstreamConfig, UpstreamState, running_upstream
from batchops.registration import register_batch
from batchops.routing import HTTP_TARGET
from batchops.runtime import Runtime
from batchops.schemas import ItemResult, ItemState
from batchops.targets.http import HttpTarget, parse_retry_after
from flows.process_batch import process_batch

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def upstream() -> Iterator[tuple[str, UpstreamState]]:
    with running_upstream() as (url, state):
        yield url, state


def crm(url: str, **spec: Any) -> str:
    spec = {"prefix": "/crm", "base_url": url, "backoff_seconds": 0.01,
            "max_backoff_seconds": 0.05, **spec}
    return json.dumps({"crm": spec})


def run(runtime: Runtime, ops: list[dict[str, Any]], **kwargs: Any) -> tuple[str, list[ItemResult]]:
    batch_id, _ = register_batch(runtime, ops, max_operations=100_000, **kwargs)
    process_batch(batch_id=batch_id)
    return batch_id, list(runtime.store.results.of_batch(batch_id))


def contact(i: int, **extra: Any) -> dict[str, Any]:
    return {"id": f"c{i}", "method": "POST", "path": "/crm/contacts",
            "body": {"name": f"Contact {i}"}, **extra}


def test_operations_are_forwarded_with_their_idempotency_key_and_allowed_headers(
        configure: Any, database_url: str, upstream: tuple[str, UpstreamState]) -> None:
    url, state = upstream
    runtime = configure(database_url=database_url, upstreams=crm(url))
    ops = [contact(1, idempotency_key="k-1",
                   headers={"X-Request-Id": "r1", "Cookie": "secret", "Accept": "*/*"}),
           {"id": "get", "method": "GET", "path": "/crm/contacts/7?fields=name"},
           {"id": "del", "method": "DELETE", "path": "/crm/contacts/8"}]

    batch_id, results = run(runtime, ops)

    sent = {r.path: r for r in state.requests}
    first = sent["/contacts"]
    assert (first.method, first.key, first.body) == ("POST", "k-1", {"name": "Contact 1"})
    assert first.headers.get("x-request-id") == "r1" and "cookie" not in first.headers
    assert sent["/contacts/7?fields=name"].method == "GET"
    # An item without a key gets one that stays the same when the batch runs again.
    assert sent["/contacts/8"].key == f"{batch_id}:2"
    assert [(r.status, r.state) for r in results] == [
        (201, ItemState.SUCCEEDED), (200, ItemState.SUCCEEDED), (200, ItemState.SUCCEEDED)]
    assert results[0].result["body"] == {"name": "Contact 1"}


def test_upstream_4xx_fails_the_item_at_once_with_its_code(
        configure: Any, database_url: str, upstream: tuple[str, UpstreamState]) -> None:
    url, state = upstream
    state.config = UpstreamConfig(fail_paths={"/bad": 422})
    runtime = configure(database_url=database_url, upstreams=crm(url))

    _, results = run(runtime, [contact(1), {"id": "bad", "method": "POST",
                                            "path": "/crm/bad", "body": {}}])

    assert results[0].state is ItemState.SUCCEEDED
    bad = results[1]
    assert (bad.state, bad.status, bad.attempts) == (ItemState.FAILED, 422, 1)
    assert bad.error is not None and bad.error.code == "http_422"
    assert sum(1 for r in state.requests if r.path == "/bad") == 1


def test_5xx_and_429_are_retried_until_they_succeed(
        configure: Any, database_url: str, upstream: tuple[str, UpstreamState]) -> None:
    url, state = upstream
    state.config = UpstreamConfig(fail_first=2, error_status=503)
    runtime = configure(database_url=database_url, upstreams=crm(url))

    _, results = run(runtime, [contact(i) for i in range(20)])

    assert all(r.state is ItemState.SUCCEEDED and r.attempts == 3 for r in results)
    assert len(state.requests) == 60
    assert all(n == 1 for n in state.executions.values()) and len(state.executions) == 20


def test_an_item_that_runs_out_of_retries_fails_with_every_attempt_recorded(
        configure: Any, database_url: str, upstream: tuple[str, UpstreamState]) -> None:
    url, state = upstream
    state.config = UpstreamConfig(error_rate=1.0, error_status=502)
    runtime = configure(database_url=database_url, upstreams=crm(url, retries=3))

    _, results = run(runtime, [contact(1)])

    item = results[0]
    assert (item.state, item.status, item.attempts) == (ItemState.FAILED, 502, 4)
    assert item.error is not None and item.error.code == "unavailable"
    assert "4 attempts" in item.error.message
    assert len(state.requests) == 4


def test_retry_after_is_honoured(configure: Any, database_url: str,
                                 upstream: tuple[str, UpstreamState]) -> None:
    url, state = upstream
    state.config = UpstreamConfig(rate_limit_rps=5, retry_after_seconds=1)
    runtime = configure(database_url=database_url,
                        upstreams=crm(url, backoff_seconds=0, max_backoff_seconds=0))

    _, results = run(runtime, [contact(i) for i in range(8)])

    assert all(r.state is ItemState.SUCCEEDED for r in results)
    limited = [r for r in state.requests if r.outcome == "rate_limited"]
    assert limited, "the upstream never pushed back"
    # Each rejected key came back no sooner than the Retry-After second it was told.
    for rejected in limited:
        later = [r.at for r in state.requests if r.key == rejected.key and r.at > rejected.at]
        assert later and later[0] - rejected.at >= 0.9


def test_retry_after_parses_seconds_and_http_dates() -> None:
    assert parse_retry_after("3", cap=60) == 3.0
    assert parse_retry_after("120", cap=60) == 60.0
    assert parse_retry_after("-5", cap=60) == 0.0
    assert parse_retry_after("soon", cap=60) is None
    from email.utils import formatdate

    seconds = parse_retry_after(formatdate(time.time() + 10, usegmt=True), cap=60)
    assert seconds is not None and 8 <= seconds <= 10.5


def test_upstream_rate_limit_holds_across_the_batch(
        configure: Any, database_url: str, upstream: tuple[str, UpstreamState]) -> None:
    url, state = upstream
    state.config = UpstreamConfig(rate_limit_rps=40, latency_ms=5)
    # The upstream shares this process (and its GIL) with the flow: 10 % headroom keeps a
    # request delayed by tens of milliseconds on a loaded machine from making one second
    # count one request too many (test_http_rate_limits does the same).
    runtime = configure(database_url=database_url,
                        upstreams=crm(url, rate_limit_per_second=40, max_concurrency=10,
                                      rate_limit_headroom=0.1))

    started = time.monotonic()
    _, results = run(runtime, [contact(i) for i in range(120)], concurrency=10)
    elapsed = time.monotonic() - started

    assert all(r.state is ItemState.SUCCEEDED for r in results)
    stats = state.stats()
    assert stats["rate_limited_after_first_second"] == 0
    assert stats["peak_accepted_per_second"] <= 40
    assert elapsed >= 2.0  # 120 requests at under 40/s cannot finish sooner


def test_a_batch_keeps_its_whole_concurrency_in_flight_across_its_chunks(
        configure: Any, database_url: str, upstream: tuple[str, UpstreamState]) -> None:
    url, state = upstream
    state.config = UpstreamConfig(latency_ms=20)
    runtime = configure(database_url=database_url, upstreams=crm(url, max_concurrency=10))

    # 8 chunks of 15, run 4 at a time by the flow: their requests share the batch's 6 slots.
    _, results = run(runtime, [contact(i) for i in range(120)], concurrency=6, chunk_size=15)

    assert all(r.state is ItemState.SUCCEEDED for r in results)
    assert state.stats()["peak_in_flight"] == 6


def test_concurrency_halves_on_429_and_grows_back(
        configure: Any, database_url: str, upstream: tuple[str, UpstreamState]) -> None:
    url, state = upstream
    state.config = UpstreamConfig(rate_limit_rps=20, retry_after_seconds=1, latency_ms=20)
    runtime = configure(database_url=database_url,
                        upstreams=crm(url, max_concurrency=16, backoff_seconds=0))
    target = runtime.targets[HTTP_TARGET]
    assert isinstance(target, HttpTarget)

    run(runtime, [contact(i) for i in range(60)], concurrency=16)
    up = target._upstreams["crm"]
    assert up.limit.decreases >= 1
    low = up.limit.limit
    assert low < 16

    state.config = UpstreamConfig(latency_ms=5)  # healthy again: additive increase
    run(runtime, [contact(i) for i in range(100, 400)], concurrency=16)
    assert up.limit.limit > low


def test_an_unreachable_upstream_fails_every_item_after_its_retries(
        configure: Any, database_url: str) -> None:
    from batchops.devtools import free_port

    # Nothing listens there: every attempt is a connection error, and each attempt's
    # in-flight slot must come back, or the items behind the first two would wait forever.
    url = f"http://127.0.0.1:{free_port()}"
    runtime = configure(database_url=database_url,
                        upstreams=crm(url, retries=2, max_concurrency=2))

    _, results = run(runtime, [contact(i) for i in range(6)], concurrency=2)

    assert [(r.state, r.status, r.attempts) for r in results] == [
        (ItemState.FAILED, 502, 3)] * 6
    assert all(r.error is not None and r.error.code == "upstream_unreachable"
               for r in results)


def test_the_environments_proxy_and_netrc_credentials_apply(
        configure: Any, database_url: str, upstream: tuple[str, UpstreamState],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from batchops.devtools import free_port

    # The upstream's own address answers nothing: the requests arrive only through the proxy
    # that HTTP_PROXY names (the fault-injecting upstream, which answers them itself).
    proxy_url, proxy = upstream
    netrc = tmp_path / "netrc"
    netrc.write_text("machine localhost login crm password s3cret\n")
    for name in ("http_proxy", "no_proxy", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # Prefect's API and the store stay direct
    monkeypatch.setenv("NETRC", str(netrc))
    runtime = configure(database_url=database_url,
                        upstreams=crm(f"http://localhost:{free_port()}", retries=0))

    _, results = run(runtime, [contact(1), contact(2)])

    assert [(r.state, r.status) for r in results] == [(ItemState.SUCCEEDED, 201)] * 2
    assert sorted((r.method, r.path) for r in proxy.requests) == [("POST", "/contacts")] * 2
    assert {r.headers.get("authorization") for r in proxy.requests} == {
        "Basic Y3JtOnMzY3JldA=="}  # crm:s3cret, from the .netrc entry of the upstream's host
