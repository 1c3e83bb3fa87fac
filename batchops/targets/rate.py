"""Requests-per-second limits of the http target: a shared budget, leased, and AIMD on top.

The budget of an upstream is one GCRA timeline (the generic cell rate algorithm, as in
ATM networks and redis-cell): its *theoretical arrival time* (TAT) is the moment the next
request may go. A worker does not ask for every request: it **leases** a few at once (about
``lease_seconds`` of its rate) by moving the TAT on by ``tokens * interval`` in one call, and
gets the moment its first token is due; its tokens are then due one ``interval`` apart. The
leases of all workers are disjoint stretches of one timeline, and within each the requests
keep the interval, so the sum of every worker's requests never goes over the rate in any
second, while coordination costs one call per worker per lease (``lease_seconds``), not one per
request.

* :class:`RedisGcra` keeps the TAT in Redis (a Lua script run by ``EVALSHA``, on Redis' clock),
  shared by every process configured with that Redis (``BATCHOPS_REDIS_URL``);
* :class:`LocalGcra` keeps it in this process (the embedded default, without Redis).

When Redis does not answer, a lease comes from a timeline in the process instead (logged):
the worker keeps to the rate on its own until Redis is back.

A token whose moment has passed by more than its interval (the event loop stalled, or no
request wanted it) is dropped, never sent late: late requests would bunch with on-time ones in
the upstream's one-second window.

:class:`AdaptiveRate` is the worker's own rate (AIMD): a 429 (or ``Retry-After``) halves it, at
most once a second; it then grows back additively — quickly up to a ceiling just under what
the upstream accepted in the second before it pushed back, then slowly (probing) towards the
configured rate, after a hold that doubles with each push-back, so the push-backs become
rarer. A worker's leases are spaced at its own interval when that is longer than the shared
one: a slowed worker holds less of the timeline. Exported as the gauge
``batchops_upstream_effective_rate{upstream}``; coordination calls as the counter
``batchops_upstream_rate_coordination_calls_total{upstream,backend}``, tokens let go as
``batchops_upstream_rate_tokens_dropped_total{upstream}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import deque
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

__all__ = ["AdaptiveRate", "GcraBudget", "LocalGcra", "RateLimiter", "RedisGcra",
           "rate_budget_key"]

EFFECTIVE_RATE = Gauge("batchops_upstream_effective_rate",
                       "requests per second a worker sends an upstream now (AIMD)", ["upstream"])
COORDINATION_CALLS = Counter("batchops_upstream_rate_coordination_calls",
                             "leases taken from an upstream's shared rate budget",
                             ["upstream", "backend"])
DROPPED_TOKENS = Counter("batchops_upstream_rate_tokens_dropped",
                         "leased tokens let go because they were too late to send",
                         ["upstream"])

logger = logging.getLogger(__name__)

LATE_SECONDS = 0.015  # a token this late (or one interval, if longer) is dropped

# KEYS[1]: the TAT, in microseconds of Redis' clock. ARGV[1]: tokens; ARGV[2]: the interval
# between two of them, in microseconds. Returns the microseconds until the first is due.
_RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + tonumber(ARGV[1]) * tonumber(ARGV[2])
local ttl = math.floor((new_tat - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl)
return string.format('%.0f', tat - now)
"""


def rate_budget_key(upstream: str, base_url: str) -> str:
    """The Redis key of an upstream's budget: one per upstream API (name and base URL)."""
    digest = hashlib.sha256(base_url.encode()).hexdigest()[:12]
    return f"batchops:rate:{upstream}:{digest}"


class GcraBudget(Protocol):
    """A shared GCRA timeline; ``reserve`` moves it on by ``tokens * interval``."""

    backend: str
    errors: tuple[type[BaseException], ...]  # what reserve raises when the budget is away

    async def reserve(self, tokens: int, interval: float) -> float:
        """Seconds from now until the first of ``tokens`` is due (the rest follow
        ``interval`` apart)."""
        ...

    async def aclose(self) -> None: ...


class LocalGcra:
    """The timeline in this process (no Redis configured)."""

    backend = "local"
    errors: tuple[type[BaseException], ...] = ()

    def __init__(self) -> None:
        self._tat = 0.0

    async def reserve(self, tokens: int, interval: float) -> float:
        now = time.monotonic()
        start = max(self._tat, now)
        self._tat = start + tokens * interval
        return start - now

    async def aclose(self) -> None:
        return None


class RedisGcra:
    """The timeline in Redis, shared by every process that names the same key."""

    backend = "redis"

    def __init__(self, url: str, key: str) -> None:
        import redis.asyncio as redis

        self.key = key
        self.errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._client: Any = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._reserve = self._client.register_script(_RESERVE_LUA)  # EVALSHA, EVAL if unknown

    async def reserve(self, tokens: int, interval: float) -> float:
        micros = max(1, round(interval * 1_000_000))
        delay = await self._reserve(keys=[self.key], args=[tokens, micros])
        return int(delay) / 1_000_000

    async def aclose(self) -> None:
        await self._client.aclose()


class AdaptiveRate:
    """A worker's requests per second to one upstream: AIMD under ``maximum``."""

    FAST = 1.0  # growth below the ceiling, per second, as a fraction of the maximum
    PROBE = 0.01  # growth above it
    FIRST_HOLD = 4.0  # seconds at the ceiling before the first probe; doubles, up to MAX_HOLD
    MAX_HOLD = 60.0
    ROUND = 1.0  # a second push-back within this many seconds of a decrease does not count

    def __init__(self, upstream: str, maximum: float, headroom: float, adaptive: bool) -> None:
        self.upstream = upstream
        self.maximum = maximum
        self.headroom = headroom
        self.adaptive = adaptive
        self.rate = self.ceiling = maximum
        self.decreases = 0
        self._hold = self.FIRST_HOLD
        self._probe_at = 0.0
        self._last_decrease = -math.inf
        self._grown_at = time.monotonic()
        self._accepted: deque[float] = deque()  # when accepted requests were sent (last second)
        EFFECTIVE_RATE.labels(upstream).set(self.rate)

    @property
    def minimum(self) -> float:
        return max(0.5, self.maximum / 100)

    def _accepted_last_second(self, now: float) -> int:
        while self._accepted and self._accepted[0] <= now - 1.0:
            self._accepted.popleft()
        return len(self._accepted)

    def accepted(self, sent_at: float) -> None:
        """The upstream accepted a request: grow the rate (additive increase)."""
        now = time.monotonic()
        self._accepted.append(sent_at)
        self._accepted_last_second(now)
        dt = min(now - self._grown_at, 0.5)
        self._grown_at = now
        if not self.adaptive or self.rate >= self.maximum:
            return
        if self.rate < self.ceiling:
            self.rate = min(self.ceiling, self.rate + self.FAST * self.maximum * dt)
        elif now >= self._probe_at:
            self.rate = min(self.maximum, self.rate + self.PROBE * self.maximum * dt)
        EFFECTIVE_RATE.labels(self.upstream).set(self.rate)

    def throttled(self, sent_at: float) -> None:
        """The upstream pushed back (429, or ``Retry-After``): halve the rate, once a round."""
        if not self.adaptive or sent_at < self._last_decrease + self.ROUND:
            return
        now = time.monotonic()
        seen = self._accepted_last_second(now)
        if seen >= (1 - self.headroom) * self.maximum:
            # The upstream took all this worker's budget: the push-back was the jitter of a
            # second that counted a few requests too many, not a lower limit.
            self.ceiling = self.maximum
        else:
            # What the upstream took in the last second, less the headroom, is where fast
            # growth stops; beyond it the rate probes, slowly.
            self.ceiling = max(self.minimum, seen * (1 - self.headroom))
        self.rate = max(self.minimum, self.rate / 2)
        self._last_decrease = now
        self._probe_at = now + self._hold
        self._hold = min(self._hold * 2, self.MAX_HOLD)
        self.decreases += 1
        EFFECTIVE_RATE.labels(self.upstream).set(self.rate)


class RateLimiter:
    """Paces one worker's requests to an upstream: leases from the shared budget, at the
    worker's adaptive rate. Lives on the http target's event loop."""

    def __init__(self, upstream: str, budget: GcraBudget, rate: AdaptiveRate,
                 lease_seconds: float) -> None:
        self.upstream = upstream
        self.budget = budget
        self.rate = rate
        self.lease_seconds = lease_seconds
        self.leases = 0
        self.dropped = 0
        self._due: deque[float] = deque()  # this worker's tokens, by when they are due
        self._lock = asyncio.Lock()  # FIFO: requests go in the order they asked
        self._calls = COORDINATION_CALLS.labels(upstream, budget.backend)
        self._fallback = LocalGcra()
        self._warned_at = -math.inf

    async def _lease(self) -> None:
        interval = 1 / self.rate.rate
        tokens = max(1, round(self.rate.rate * self.lease_seconds))
        try:
            delay = await self.budget.reserve(tokens, interval)
        except self.budget.errors as exc:
            if time.monotonic() - self._warned_at > 60:
                self._warned_at = time.monotonic()
                logger.warning("the rate budget of %s is unreachable (%s: %s): this worker "
                               "keeps to the rate on its own", self.upstream,
                               type(exc).__name__, exc)
            delay = await self._fallback.reserve(tokens, interval)
        self._calls.inc()
        self.leases += 1
        first = time.monotonic() + delay
        self._due.extend(first + i * interval for i in range(tokens))

    async def take(self) -> None:
        """Wait until this worker may send its next request."""
        async with self._lock:
            while True:
                if not self._due:
                    await self._lease()
                due = self._due.popleft()
                wait = due - time.monotonic()
                if wait < -max(1 / self.rate.rate, LATE_SECONDS):  # would bunch: let it go
                    self.dropped += 1
                    DROPPED_TOKENS.labels(self.upstream).inc()
                    continue
                if wait > 0:
                    await asyncio.sleep(wait)
                return

    async def aclose(self) -> None:
        await self.budget.aclose()
