"""Requests-per-second limits of the http target, against an upstream that counts them.

The fault-injecting upstream accepts ``rate_limit_rps`` requests in any one-second window and
answers 429 (``Retry-After``) beyond, recording when every request arrived; the budget is
shared through the machine's real Redis, and the concurrency slots through Prefect.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from batchops.devtools.upstream import UpstreamConfig, UpstreamState, running_upstream
from batchops.registration import register_batch
from batchops.routing import HTTP_TARGET
from batchops.runtime import Runtime
from batchops.schemas import ItemResult, ItemState, PlannedOperation
from batchops.settings import UpstreamSpec
from batchops.targets import ChunkContext
from batchops.targets.http import HttpTarget
from flows.process_batch import process_batch

pytestmark = pytest.mark.usefixtures("prefect_server")

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def upstream() -> Iterator[tuple[str, UpstreamState]]:
    with running_upstream() as (url, state):
        yield url, state


def crm(url: str, **spec: Any) -> dict[str, Any]:
    return {"prefix": "/crm", "base_url": url, "backoff_seconds": 0.01,
            "max_backoff_seconds": 0.05, **spec}


def contact(i: int) -> dict[str, Any]:
    return {"id": f"c{i}", "method": "POST", "path": "/crm/contacts",
            "body": {"name": f"Contact {i}"}}


def run(runtime: Runtime, ops: list[dict[str, Any]], **kwargs: Any) -> list[ItemResult]:
    batch_id, _ = register_batch(runtime, ops, max_operations=100_000, **kwargs)
    process_batch(batch_id=batch_id)
    return list(runtime.store.results.of_batch(batch_id))


def accepted_per_second(state: UpstreamState) -> Counter[int]:
    """Requests the upstream accepted (not 429) in each whole second since the first."""
    times = [r.at for r in state.requests if r.outcome != "rate_limited"]
    return Counter(int(t - times[0]) for t in times)


def limited_per_second(state: UpstreamState) -> Counter[int]:
    first = state.requests[0].at
    return Counter(int(r.at - first) for r in state.requests if r.outcome == "rate_limited")


def peak_sent_per_second(state: UpstreamState) -> int:
    """The most requests (accepted or not) that arrived in any one-second window."""
    times = sorted(r.at for r in state.requests)
    peak, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - 1.0:
            j += 1
        peak = max(peak, i - j + 1)
    return peak


# A 2-core machine under load delays some requests by tens of milliseconds on their way to the
# upstream; 10 % headroom (100 ms at these rates) keeps such a delay from making a second
# count one request too many, so the tests hold on a busy machine.
HEADROOM = 0.1


def coordination_calls(upstream: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("batchops_upstream_rate_coordination_calls_total",
                                      {"upstream": upstream, "backend": "redis"})
    return value or 0.0


def test_a_batch_under_a_rate_limit_uses_it_without_ever_going_over(
        configure: Any, tmp_path: Path, upstream: tuple[str, UpstreamState]) -> None:
    url, state = upstream
    state.config = UpstreamConfig(rate_limit_rps=50, latency_ms=5)
    runtime = configure(database_url=f"sqlite:///{tmp_path / 'b.db'}", redis_url=REDIS_URL,
                        upstreams=json.dumps({"crm": crm(url, rate_limit_per_second=50,
                                                         rate_limit_headroom=HEADROOM)}))
    calls_before = coordination_calls("crm")

    results = run(runtime, [contact(i) for i in range(250)], concurrency=10)

    assert all(r.state is ItemState.SUCCEEDED and r.attempts == 1 for r in results)
    stats = state.stats()
    assert stats["by_outcome"].get("rate_limited", 0) == 0
    assert peak_sent_per_second(state) <= 50  # in any window of one second
    # The allowance is used: 250 requests at 45/s take 5.5 s; generous on a loaded machine.
    span = stats["last_at"] - stats["first_at"]
    assert 4.5 <= span <= 8.0
    # Coordination: a lease per ~150 ms, not a call per request.
    calls = coordination_calls("crm") - calls_before
    assert 1 <= calls <= 250 / 4


def test_the_rate_adapts_to_an_upstream_limit_below_the_configured_one(
        configure: Any, tmp_path: Path, upstream: tuple[str, UpstreamState]) -> None:
    url, state = upstream
    state.config = UpstreamConfig(rate_limit_rps=30, latency_ms=5, retry_after_seconds=1)
    runtime = configure(database_url=f"sqlite:///{tmp_path / 'b.db'}", redis_url=REDIS_URL,
                        upstreams=json.dumps({"crm": crm(url, rate_limit_per_second=60,
                                                         backoff_seconds=0)}))
    target = runtime.targets[HTTP_TARGET]
    assert isinstance(target, HttpTarget)

    results = run(runtime, [contact(i) for i in range(360)], concurrency=10)

    assert all(r.state is ItemState.SUCCEEDED for r in results)
    rate = target._upstreams["crm"].rate
    assert rate is not None and rate.rate.decreases >= 1
    assert rate.rate.rate < 40  # adapted towards 30, from 58
    limited = limited_per_second(state)
    seconds = max(accepted_per_second(state)) + 1
    first_half = sum(n for s, n in limited.items() if s < seconds // 2)
    second_half = sum(n for s, n in limited.items() if s >= seconds // 2)
    assert second_half < first_half  # the 429s fall once the rate has adapted
    assert sum(limited.values()) <= 60  # bounded: a few per push-back, not one per request
    # Most of the real limit is used: 360 requests at 30/s take 12 s.
    assert seconds <= 12 / 0.75


def test_two_workers_sharing_a_budget_in_redis_never_exceed_it_together(
        upstream: tuple[str, UpstreamState]) -> None:
    url, state = upstream
    state.config = UpstreamConfig(rate_limit_rps=60, latency_ms=5)
    spec = UpstreamSpec.model_validate(crm(url, rate_limit_per_second=60,
                                           rate_limit_headroom=HEADROOM))
    # Two targets, as in two worker processes: own threads and event loops, own clients, one
    # Redis key. The second starts while the first is under way, so they send at the same time.
    workers = [HttpTarget({"crm": spec}, redis_url=REDIS_URL) for _ in range(2)]
    sizes = (240, 120)

    def run(n: int) -> list[ItemResult]:
        chunk = [PlannedOperation(index=i, id=f"w{n}-{i}", method="POST",
                                  path="/crm/contacts", body={"n": i}, target=HTTP_TARGET,
                                  resource="crm") for i in range(sizes[n])]
        return asyncio.run(workers[n].execute(
            chunk, ChunkContext(batch_id=f"two-{n}", concurrency=5)))

    def sent_by(n: int) -> list[float]:
        return [r.at for r in list(state.requests) if r.key and r.key.startswith(f"two-{n}:")]

    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(run, 0)
            deadline = time.monotonic() + 30
            while len(sent_by(0)) < 30:  # ~0.5 s into the first one's 4 s
                assert time.monotonic() < deadline and not first.done(), "the first did not send"
                time.sleep(0.01)
            second = pool.submit(run, 1)
            results = [first.result(120), second.result(120)]
    finally:
        for target in workers:
            target.close()

    assert all(r.state is ItemState.SUCCEEDED for worker in results for r in worker)
    stats = state.stats()
    assert stats["by_outcome"].get("rate_limited", 0) == 0
    assert peak_sent_per_second(state) <= 60  # together, never over the shared limit
    spans = [sent_by(n) for n in range(2)]
    assert min(spans[1]) < max(spans[0])  # the second sent while the first still did
    span = stats["last_at"] - stats["first_at"]
    assert 360 / 60 <= span + 1 / 54 <= 360 / 60 / 0.75  # the two shared the whole allowance


def test_a_worker_keeps_to_the_rate_on_its_own_while_redis_is_unreachable() -> None:
    from batchops.devtools import free_port
    from batchops.targets.rate import AdaptiveRate, RateLimiter, RedisGcra

    budget = RedisGcra(f"redis://127.0.0.1:{free_port()}/0", "batchops:rate:test:gone")
    limiter = RateLimiter("gone", budget, AdaptiveRate("gone", 50, 0.0, adaptive=True), 0.1)

    async def send(n: int) -> float:
        started = asyncio.get_running_loop().time()
        for _ in range(n):
            await limiter.take()
        elapsed = asyncio.get_running_loop().time() - started
        await limiter.aclose()
        return elapsed

    # 51 tokens at 50/s: the first is due at once, the last a second later.
    assert asyncio.run(send(51)) >= 0.95
    assert limiter.leases >= 10  # every lease was asked of Redis first, then taken locally
