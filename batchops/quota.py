"""Operations-per-minute quota per scope (API key), counted in operations, not requests.

A fixed one-minute window: a request for ``n`` operations adds ``n`` to its scope's counter
for the current minute; past the limit it is refused (and its ``n`` taken back), with the
seconds until the window ends as ``Retry-After``. A request for more than the limit could
never pass: it is refused as :class:`BatchExceedsQuota` without counting anything. The
counter lives in Redis (``INCRBY`` with an expiry) when ``settings.redis_url`` is set, so
every API process shares it; otherwise in this process.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Protocol

from batchops.errors import BatchExceedsQuota, QuotaExceeded
from batchops.settings import Settings

__all__ = [
    "BatchExceedsQuota",
    "LocalCounter",
    "OperationsQuota",
    "QuotaExceeded",
    "RedisCounter",
    "WindowCounter",
    "build_quota",
]

WINDOW_SECONDS = 60


class WindowCounter(Protocol):
    """Counts per key and window; ``add`` returns the count after adding (may be negative)."""

    async def add(self, key: str, amount: int, ttl: int) -> int: ...

    async def close(self) -> None: ...


class LocalCounter:
    """In-process counters (one API process); old windows are dropped as time moves on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, float]] = {}

    async def add(self, key: str, amount: int, ttl: int) -> int:
        now = time.monotonic()
        with self._lock:
            if len(self._counts) > 10_000:
                self._counts = {k: v for k, v in self._counts.items() if v[1] > now}
            count, expires = self._counts.get(key, (0, now + ttl))
            if expires <= now:
                count, expires = 0, now + ttl
            count += amount
            self._counts[key] = (count, expires)
            return count

    async def close(self) -> None:
        return None


class RedisCounter:
    """Counters in Redis, shared by every API process: ``INCRBY`` then ``EXPIRE``."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        self._client = redis.Redis.from_url(url)

    async def add(self, key: str, amount: int, ttl: int) -> int:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.incrby(key, amount)
            pipe.expire(key, ttl)
            count, _ = await pipe.execute()
        return int(count)

    async def close(self) -> None:
        await self._client.aclose()


class OperationsQuota:
    """``limit`` operations per scope per minute; ``limit == 0`` means no quota."""

    def __init__(self, limit: int, counter: WindowCounter,
                 clock: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self.counter = counter
        self._clock = clock

    def _window(self, scope: str) -> tuple[str, int]:
        now = self._clock()
        window = int(now // WINDOW_SECONDS)
        retry_after = max(1, math.ceil((window + 1) * WINDOW_SECONDS - now))
        return f"batchops:quota:{scope}:{window}", retry_after

    async def charge(self, scope: str, operations: int) -> str | None:
        """Count ``operations`` for ``scope``; :class:`QuotaExceeded` (nothing counted) if over
        this minute's quota, :class:`BatchExceedsQuota` if over any minute's.

        Returns the window's key, for :meth:`refund`; ``None`` when nothing was counted.
        """
        if not self.limit or operations <= 0:
            return None
        if operations > self.limit:
            raise BatchExceedsQuota(operations, self.limit)
        key, retry_after = self._window(scope)
        count = await self.counter.add(key, operations, WINDOW_SECONDS * 2)
        if count > self.limit:
            await self.counter.add(key, -operations, WINDOW_SECONDS * 2)
            used = count - operations
            raise QuotaExceeded(
                f"{operations} operations would exceed the quota of {self.limit} operations "
                f"per minute ({used} used in this minute); retry in {retry_after} s",
                retry_after=retry_after, limit=self.limit)
        return key

    async def refund(self, charge: str | None, operations: int) -> None:
        """Give back a charge whose operations never ran (the request failed before)."""
        if charge is not None and operations > 0:
            await self.counter.add(charge, -operations, WINDOW_SECONDS * 2)

    async def close(self) -> None:
        await self.counter.close()


def build_quota(settings: Settings) -> OperationsQuota:
    """The quota the settings ask for: shared through Redis when ``redis_url`` is set."""
    counter: WindowCounter = (RedisCounter(settings.redis_url) if settings.redis_url
                              else LocalCounter())
    return OperationsQuota(settings.api.quota_ops_per_minute, counter)
