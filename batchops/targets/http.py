"""The http target: operations forwarded to upstream REST APIs, safely.

Per upstream (``settings.upstreams``), for every batch and every worker:

* **one shared ``aiohttp.ClientSession``** with the upstream's connection pool and timeouts
  (aiohttp's per-request CPU is about half of httpx's, and the requests are this target's hot
  path). It lives on the target's own event loop (one thread per process), because chunks run
  on event loops of their own and a session belongs to one loop. The environment's proxy
  (``HTTP_PROXY``, ``NO_PROXY``, …) and ``.netrc`` credentials apply, read once per upstream;
* **one pool per batch**: every chunk of a batch running in this process sends its requests
  on the target's loop through one semaphore sized to the batch's whole concurrency
  (``ChunkContext.batch_concurrency``, capped by the upstream's ``max_concurrency``), so the
  batch keeps that many requests in flight however the flow splits it into chunk task runs,
  and a chunk that ends leaves no gap while the others still have items waiting;
* **limits shared across processes** through Prefect global concurrency limits: the batch's
  pool holds ``batchops-upstream-<name>`` slots (as many as the pool's size) under a lease,
  acquired when the first of its chunks starts here and released when none is running any
  more (one acquisition per batch and process, not per chunk, and never more slots than the
  batch can use), so the Prefect server sees one call per batch, never one per item (through
  one Prefect client per API URL that the target keeps open on its loop). Every
  lease is recorded in the store while it is held, and a wait for slots is bounded: slots
  that no live run holds (a restarted server forgot their leases, a dead run left them) are
  given back (:mod:`batchops.limit_leases`);
* **a requests-per-second limit** (``rate_limit_per_second``) shared by every worker through
  a GCRA budget that each worker leases a fraction of a second at a time — in Redis when
  ``BATCHOPS_REDIS_URL`` is set, in the process otherwise (:mod:`batchops.targets.rate`);
* **AIMD**: a 429, or a 503 with ``Retry-After``, halves the worker's rate when the upstream
  has a rate limit (:class:`batchops.targets.rate.AdaptiveRate`, the gauge
  ``batchops_upstream_effective_rate``), else its in-process concurrency (once per round of
  requests; each success adds back ``1/limit``, so it grows by about one per round while the
  upstream is healthy; the gauge ``batchops_upstream_concurrency_limit{upstream}``);
* **retries** with tenacity: connection errors, timeouts, 429 and 5xx are retried with
  exponential backoff and full jitter, or after the upstream's ``Retry-After`` (seconds or an
  HTTP date, capped); other 4xx fail the item at once. Every attempt's error is kept; an item
  whose retries run out carries them all (``ItemResult.attempt_errors``) and becomes a dead
  letter.

Each request carries the item's idempotency key as ``Idempotency-Key`` (an item without one
gets ``<batch id>:<index>``, stable across re-runs of the batch), so an upstream that honours
the header never applies an operation twice, even when a crash makes batchops send it again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import json
import math
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

import httpx
from prefect.exceptions import ObjectAlreadyExists
from prometheus_client import Counter, Gauge
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base, wait_random_exponential
from yarl import URL

from batchops.errors import TransientError
from batchops.limit_leases import LimitLeases, leases_logger
from batchops.orchestration import Granted, UpstreamLimits
from batchops.schemas import AttemptError, ItemErrorBody, ItemResult, ItemState, PlannedOperation
from batchops.settings import UpstreamSpec
from batchops.targets import ChunkContext
from batchops.targets.rate import (
    AdaptiveRate,
    GcraBudget,
    LocalGcra,
    RateLimiter,
    RedisGcra,
    rate_budget_key,
)

if TYPE_CHECKING:
    import aiohttp

__all__ = ["AdaptiveLimit", "HttpTarget", "parse_retry_after", "upstream_limit_name"]

T = TypeVar("T")

CONCURRENCY_LIMIT = Gauge("batchops_upstream_concurrency_limit",
                          "adaptive (AIMD) in-flight limit per upstream", ["upstream"])
REQUESTS = Counter("batchops_upstream_requests", "requests sent upstream, by outcome",
                   ["upstream", "outcome"])
RETRIES = Counter("batchops_upstream_retries", "item attempts after the first, by reason",
                  ["upstream", "reason"])
GCL_CALLS = Counter("batchops_upstream_limit_acquisitions",
                    "Prefect global concurrency limit acquisitions", ["upstream", "kind"])


LEASE_SECONDS = 60.0  # the shortest lease Prefect's server grants
SLOT_WAIT_SECONDS = 30.0  # without lease records (``leases``): how often a long wait is logged
SLOT_POLL_SECONDS = 5.0  # the longest pause between two asks for slots (the server hints less)


def upstream_limit_name(upstream: str) -> str:
    return f"batchops-upstream-{upstream}"


def parse_retry_after(value: str | None, cap: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), cap)


class AdaptiveLimit:
    """AIMD limit on requests in flight to one upstream, shared by this process's chunks.

    Lives on the target's event loop. A throttling answer halves the limit, but only once per
    round: answers to requests sent before the last decrease do not halve it again.
    """

    def __init__(self, upstream: str, maximum: int, adaptive: bool) -> None:
        self.upstream = upstream
        self.maximum = maximum
        self.adaptive = adaptive
        self.limit = float(maximum)
        self.in_flight = 0
        self.decreases = 0
        self._last_decrease = 0.0
        self._changed = asyncio.Condition()
        CONCURRENCY_LIMIT.labels(upstream).set(self.limit)

    @property
    def allowed(self) -> int:
        return max(1, int(self.limit))

    async def acquire(self) -> float:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < self.allowed)
            self.in_flight += 1
        return time.monotonic()

    async def release(self, sent_at: float, *, throttled: bool, healthy: bool) -> None:
        async with self._changed:
            self.in_flight -= 1
            if self.adaptive and throttled and sent_at >= self._last_decrease:
                self.limit = max(1.0, self.limit / 2)
                self._last_decrease = time.monotonic()
                self.decreases += 1
            elif self.adaptive and healthy and self.limit < self.maximum:
                self.limit = min(float(self.maximum), self.limit + 1 / self.limit)
            CONCURRENCY_LIMIT.labels(self.upstream).set(self.limit)
            self._changed.notify_all()


class _Retryable(Exception):
    """An attempt that may succeed later: connection error, timeout, 429 or 5xx."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None,
                 result: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after = retry_after
        self.result = result


class _wait_retry_after_or_backoff(wait_base):
    """The upstream's ``Retry-After`` when it sent one, else exponential backoff with jitter."""

    def __init__(self, spec: UpstreamSpec) -> None:
        self.backoff = wait_random_exponential(multiplier=spec.backoff_seconds,
                                               max=spec.max_backoff_seconds)

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return exc.retry_after
        return float(self.backoff(retry_state))


class _BatchPool:
    """A batch's requests to one upstream in this process: one semaphore for all its chunks,
    and the upstream's global concurrency slots held for them while any of them runs.

    The slots are held under a Prefect lease taken through the client API, so its id is known
    the moment it is granted: the lease is recorded in the store (``leases``) and renewed, in
    Prefect and in the store, until the last chunk leaves. A wait for slots is bounded: after
    ``BATCHOPS_SLOT_WAIT_SECONDS`` the limit is reconciled (the slots no live run holds come
    back, see :mod:`batchops.limit_leases`), the wait is logged with the batches holding the
    slots, and it starts again. A lease the server forgot (a restart) is given back by
    reconciling once the pool ends, as its release cannot.
    """

    def __init__(self, upstream: str, batch_id: str, width: int,
                 prefect: Callable[[], Awaitable[UpstreamLimits]],
                 leases: LimitLeases | None = None) -> None:
        self.upstream = upstream
        self.batch_id = batch_id
        self.leases = leases
        self._prefect = prefect
        self.width = width
        self.slots = asyncio.Semaphore(width)
        self.chunks = 0
        self._acquired: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._done = asyncio.Event()
        self._holder = asyncio.create_task(self._hold())

    async def _hold(self) -> None:
        name = upstream_limit_name(self.upstream)
        try:
            client = await self._prefect()
            lease_id = await self._acquire(client, name)
            if lease_id is None:
                return  # every chunk left before the slots came
            try:
                if self.leases is not None:
                    await asyncio.to_thread(self.leases.held, self.batch_id, lease_id, name,
                                            self.width)
            except BaseException:
                # Slots no record accounts for would be given back by a reconciliation.
                await self._release(client, lease_id, name)
                raise
            self._acquired.set_result(None)
            lost = await self._keep(client, lease_id, name)
            await self._end(client, lease_id, name, lost)
        except BaseException as exc:
            if not self._acquired.done():
                self._acquired.set_exception(exc)
                self._acquired.exception()  # retrieved here too: no "never retrieved" warning
            else:
                leases_logger().warning("batch %s: the slots of %s: %s: %s", self.batch_id,
                                        name, type(exc).__name__, exc)
            if not isinstance(exc, Exception):
                raise

    async def _acquire(self, client: UpstreamLimits, name: str) -> UUID | None:
        """The lease on the pool's slots, once the limit has them free; ``None`` if every
        chunk left before."""
        wait = self.leases.slot_wait_seconds if self.leases is not None else SLOT_WAIT_SECONDS
        waiting_since = time.monotonic()
        reconcile_at = waiting_since + wait
        while not self._done.is_set():
            try:
                answer = await client.take(name, self.width, LEASE_SECONDS)
            except httpx.HTTPStatusError as exc:
                raise TransientError(f"no slots of {name}: {exc}") from exc
            if isinstance(answer, Granted):
                if not answer.limit_found:  # the limit is gone: the lease holds nothing
                    await self._release(client, answer.lease_id, name)
                    raise TransientError(f"the concurrency limit {name} does not exist")
                GCL_CALLS.labels(self.upstream, "concurrency").inc()
                return answer.lease_id
            retry_after = parse_retry_after(answer.retry_after, SLOT_POLL_SECONDS)
            now = time.monotonic()
            if now >= reconcile_at:
                await self._reconcile_while_waiting(name, now - waiting_since)
                reconcile_at = time.monotonic() + wait
                continue
            await asyncio.sleep(min(retry_after or SLOT_POLL_SECONDS, reconcile_at - now))
        return None

    async def _reconcile_while_waiting(self, name: str, waited: float) -> None:
        logger = leases_logger()
        if self.leases is None:
            logger.warning("batch %s: waited %.0f s for %d slot(s) of %s", self.batch_id, waited,
                           self.width, name)
            return
        try:
            done = await asyncio.to_thread(self.leases.reconcile, name)
            holders = await asyncio.to_thread(self.leases.holders, name)
        except Exception as exc:  # the store or Prefect is away: wait on, ask again later
            logger.warning("batch %s: waited %.0f s for %d slot(s) of %s; not reconciled: %s",
                           self.batch_id, waited, self.width, name, exc)
            return
        freed = f"gave back {done.freed_slots} slot(s) no live run held" if done else (
            "another process is reconciling it")
        held = ", ".join(f"batch {b} ({n})" for b, n in holders) or "no live run"
        logger.warning("batch %s: waited %.0f s for %d slot(s) of %s; %s; held by %s",
                       self.batch_id, waited, self.width, name, freed, held)

    async def _keep(self, client: UpstreamLimits, lease_id: UUID, name: str) -> bool:
        """Renew the lease until the last chunk leaves: in the store every
        ``renew_seconds``, in Prefect every third of its duration. Whether the server forgot
        it meanwhile."""
        period = self.leases.renew_seconds if self.leases is not None else LEASE_SECONDS / 3
        renew_at = time.monotonic() + LEASE_SECONDS / 3
        lost = record_gone = False
        while not self._done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), period)
            if self._done.is_set():
                break
            if self.leases is not None and not record_gone:
                try:
                    record_gone = not await asyncio.to_thread(self.leases.renewed, lease_id)
                except Exception as exc:  # a missed renewal is not fatal; the next may work
                    leases_logger().warning("batch %s: lease %s not renewed in the store: %s",
                                            self.batch_id, lease_id, exc)
                if record_gone:
                    leases_logger().warning(
                        "batch %s: the record of lease %s on %s was taken as dead (it was not "
                        "renewed in time) and its slots given back: %s may be exceeded until "
                        "this batch's requests end", self.batch_id, lease_id, name, name)
            if not lost and time.monotonic() >= renew_at:
                lost = not await self._renew(client, lease_id)
                renew_at = time.monotonic() + LEASE_SECONDS / 3
                if lost:
                    leases_logger().warning(
                        "batch %s: the Prefect server no longer knows lease %s on %s (it "
                        "restarted, or the lease expired); its slots are reconciled when this "
                        "batch's requests end", self.batch_id, lease_id, name)
        return lost

    async def _renew(self, client: UpstreamLimits, lease_id: UUID) -> bool:
        """``False`` when the server no longer knows the lease (410); an unreachable server
        is asked again next time."""
        try:
            return await client.renew(lease_id, LEASE_SECONDS)
        except httpx.HTTPError as exc:
            leases_logger().warning("lease %s not renewed: %s", lease_id, exc)
        return True

    async def _release(self, client: UpstreamLimits, lease_id: UUID, name: str) -> None:
        try:
            await client.release(lease_id)
        except httpx.HTTPError as exc:  # the lease expires, or a reconciliation frees it
            leases_logger().warning("batch %s: lease %s on %s not released: %s",
                                    self.batch_id, lease_id, name, exc)

    async def _end(self, client: UpstreamLimits, lease_id: UUID, name: str,
                   lost: bool) -> None:
        """Release the slots: with the lease while the server knows it, else (its release
        would be a no-op) by reconciling the limit once the record is gone."""
        lost = lost or not await self._renew(client, lease_id)
        if not lost:
            await self._release(client, lease_id, name)
        if self.leases is not None:
            await asyncio.to_thread(self.leases.released, lease_id)
            if lost:
                await asyncio.to_thread(self.leases.reconcile, name)

    async def acquired(self) -> None:
        """Wait until the pool holds its global slots (raises what acquiring them raised)."""
        await asyncio.shield(self._acquired)

    def close(self) -> None:
        """Release the global slots (the last chunk has left)."""
        self._done.set()


@dataclass(frozen=True)
class _EnvironmentRoute:
    """What the environment says about requests to one upstream: the proxy
    (``HTTP_PROXY``/``HTTPS_PROXY`` unless ``NO_PROXY`` covers the host, its credentials from
    the URL or ``.netrc``) and the host's own credentials in ``.netrc`` (``NETRC`` or
    ``~/.netrc``).

    Read once per upstream: aiohttp's ``trust_env`` reads both again for every request, in
    two round trips through the loop's thread pool (about 0.35 ms of CPU per request here,
    and two waits for the GIL each way).
    """

    proxy: URL | None = None
    proxy_auth: aiohttp.BasicAuth | None = None
    auth: aiohttp.BasicAuth | None = None

    @classmethod
    def of(cls, base_url: str) -> _EnvironmentRoute:
        from aiohttp.helpers import basicauth_from_netrc, get_env_proxy_for_url, netrc_from_env

        url = URL(base_url)
        proxy: URL | None = None
        proxy_auth = auth = None
        with contextlib.suppress(LookupError):
            proxy, proxy_auth = get_env_proxy_for_url(url)
        if url.host is not None:
            with contextlib.suppress(LookupError):
                auth = basicauth_from_netrc(netrc_from_env(), url.host)
        return cls(proxy, proxy_auth, auth)


@dataclass
class _Upstream:
    name: str
    spec: UpstreamSpec
    client: aiohttp.ClientSession
    limit: AdaptiveLimit
    rate: RateLimiter | None
    route: _EnvironmentRoute
    pools: dict[str, _BatchPool] = field(default_factory=dict)  # by batch id
    limits_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    limits_ready: bool = False


def _text(content: bytes, limit: int) -> str:
    return content[:limit * 4].decode("utf-8", errors="replace")[:limit]


def _error_of(status: int, reason: str | None, content: bytes) -> tuple[str, str, Any]:
    """Code, message and JSON body of an upstream error answer."""
    payload: Any
    try:
        payload = json.loads(content)
    except ValueError:
        payload = _text(content, 1000) or None
    code, message = f"http_{status}", reason or "error"
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        err = payload["error"]
        code = str(err.get("code") or code)
        message = str(err.get("message") or message)
    elif isinstance(payload, dict) and isinstance(payload.get("message"), str):
        message = payload["message"]
    return code, message, payload


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (it is a dependency): the loop's own work per request — timers,
    socket writes, selector — costs about half of asyncio's; asyncio's loop otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run_until_stopped(loop: asyncio.AbstractEventLoop) -> None:
    """The target's loop thread; once stopped, the loop's default executor is shut down and
    the loop closed (a stopped, unclosed loop keeps its file descriptors)."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


class HttpTarget:
    """Forwards operations to their upstream; see the module docstring."""

    name = "http"

    def __init__(self, upstreams: dict[str, UpstreamSpec],
                 leases: LimitLeases | None = None, redis_url: str | None = None) -> None:
        self.specs = upstreams
        self.leases = leases  # where the slots' leases are recorded and reconciled
        self.redis_url = redis_url  # where the rate limits' budgets are shared, if set
        self._upstreams: dict[str, _Upstream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        # The target loop's Prefect clients, by API URL: opened once, closed by aclose().
        self._prefect_clients: dict[str, UpstreamLimits] = {}
        self._prefect_stack = contextlib.AsyncExitStack()
        self._prefect_lock = asyncio.Lock()  # used on the target's loop only

    # -- the target's own event loop -------------------------------------------------------

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._thread_lock:
            if self._loop is None:
                loop = _new_event_loop()
                self._thread = threading.Thread(target=_run_until_stopped, args=(loop,),
                                                name="http-target", daemon=True)
                self._thread.start()
                self._loop = loop
            return self._loop

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the target's loop with the caller's context (Prefect settings)."""
        loop = self._event_loop()
        context = contextvars.copy_context()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def start() -> None:
            task = loop.create_task(coro, context=context)

            def finished(t: asyncio.Task[T]) -> None:
                if t.cancelled():
                    done.cancel()
                elif (exc := t.exception()) is not None:
                    done.set_exception(exc)
                else:
                    done.set_result(t.result())

            task.add_done_callback(finished)

        loop.call_soon_threadsafe(start)
        return done

    async def _prefect(self) -> UpstreamLimits:
        """The Prefect client of the current API URL on the target's loop, kept open: a new
        one per batch (an httpx client and its TLS context) delayed each batch's first
        request by about 0.2 s here."""
        from prefect.settings import PREFECT_API_URL

        url = str(PREFECT_API_URL.value())
        async with self._prefect_lock:
            client = self._prefect_clients.get(url)
            if client is None:
                client = await self._prefect_stack.enter_async_context(UpstreamLimits())
                self._prefect_clients[url] = client
        return client

    def _upstream(self, name: str) -> _Upstream:
        up = self._upstreams.get(name)
        if up is None:
            import aiohttp  # here, not at import: a process that sends no request skips it

            spec = self.specs[name]
            headers = {k: v.get_secret_value() for k, v in spec.headers.items()}
            route = _EnvironmentRoute.of(spec.base_url)
            if route.auth is not None and not any(k.lower() == "authorization" for k in headers):
                headers["Authorization"] = route.auth.encode()
            # Waiting for a pooled connection and reading an answer each get ``timeout``;
            # opening a connection ``connect_timeout``. The environment's proxy and .netrc
            # apply, read once here (see _EnvironmentRoute), not by aiohttp's ``trust_env``.
            client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=spec.max_connections, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(total=None, connect=spec.timeout,
                                              sock_connect=spec.connect_timeout,
                                              sock_read=spec.timeout),
                headers=headers,
            )
            rate = self._rate_limiter(name, spec)
            up = _Upstream(name, spec, client, AdaptiveLimit(name, spec.max_concurrency,
                                                             spec.adaptive), rate, route)
            self._upstreams[name] = up
        return up

    def _rate_limiter(self, name: str, spec: UpstreamSpec) -> RateLimiter | None:
        if not spec.rate_limit_per_second:
            return None
        budget: GcraBudget = (RedisGcra(self.redis_url, rate_budget_key(name, spec.base_url))
                              if self.redis_url else LocalGcra())
        rate = AdaptiveRate(name, spec.rate_limit_per_second * (1 - spec.rate_limit_headroom),
                            spec.rate_limit_headroom, spec.adaptive)
        return RateLimiter(name, budget, rate, spec.rate_lease_seconds)

    # -- the target interface --------------------------------------------------------------

    async def execute(self, items: Sequence[PlannedOperation],
                      ctx: ChunkContext) -> list[ItemResult]:
        return await asyncio.wrap_future(self._submit(self._execute(items, ctx)))

    async def _execute(self, items: Sequence[PlannedOperation],
                       ctx: ChunkContext) -> list[ItemResult]:
        results: list[ItemResult] = []
        position = 0
        # Consecutive items of one upstream share its limits; upstreams in batch order.
        while position < len(items):
            name = items[position].resource or ""
            end = position
            while end < len(items) and items[end].resource == items[position].resource:
                end += 1
            results += await self._run_upstream(self._upstream(name), items[position:end], ctx)
            position = end
        return results

    async def _ensure_limits(self, up: _Upstream) -> None:
        """Create or update the upstream's limits in Prefect, once per process, and give back
        the slots of its concurrency limit that no live run holds (a server restart or a dead
        run left them). Prefect's upsert is read-then-write: one at a time here, and a create
        that lost a race with another process is tried again (then it updates)."""
        async with up.limits_lock:
            if up.limits_ready:
                return
            for attempt in (1, 2):
                try:
                    limits = await self._prefect()
                    await limits.upsert(upstream_limit_name(up.name), up.spec.max_concurrency)
                    break
                except (ObjectAlreadyExists, httpx.HTTPStatusError):
                    if attempt == 2:
                        raise
            if self.leases is not None:
                try:
                    await asyncio.to_thread(self.leases.reconcile, upstream_limit_name(up.name))
                except Exception as exc:  # waiting batches reconcile again; so does the reaper
                    leases_logger().warning("limit %s not reconciled: %s",
                                            upstream_limit_name(up.name), exc)
            up.limits_ready = True

    async def _run_upstream(self, up: _Upstream, items: Sequence[PlannedOperation],
                            ctx: ChunkContext) -> list[ItemResult]:
        try:
            await self._ensure_limits(up)
        except httpx.HTTPError as exc:
            raise TransientError(f"Prefect API unreachable for the limits of {up.name}: {exc}"
                                 ) from exc
        pool = up.pools.get(ctx.batch_id)
        if pool is None:
            width = ctx.batch_concurrency or ctx.concurrency
            pool = up.pools[ctx.batch_id] = _BatchPool(
                up.name, ctx.batch_id, max(1, min(width, up.spec.max_concurrency)),
                self._prefect, self.leases)
        pool.chunks += 1

        async def one(op: PlannedOperation) -> ItemResult:
            async with pool.slots:
                if (stop := ctx.stopped()) is not None:  # cancelled, or past the deadline
                    return stop(op)
                return ctx.item_done(op, await self._send(up, op, ctx))

        try:
            try:
                await pool.acquired()
            except httpx.HTTPError as exc:
                raise TransientError(f"Prefect API unreachable for the limits of {up.name}: "
                                     f"{exc}") from exc
            return list(await asyncio.gather(*(one(op) for op in items)))
        finally:
            pool.chunks -= 1
            if pool.chunks == 0:
                pool.close()
                if up.pools.get(ctx.batch_id) is pool:
                    del up.pools[ctx.batch_id]

    async def _send(self, up: _Upstream, op: PlannedOperation, ctx: ChunkContext) -> ItemResult:
        errors: list[AttemptError] = []

        def failed(exc: _Retryable, number: int) -> _Retryable:
            errors.append(AttemptError(attempt=number, at=datetime.now(UTC), status=exc.status,
                                       code=exc.code, message=exc.message))
            if number <= up.spec.retries:
                RETRIES.labels(up.name, exc.code).inc()
            return exc

        # The first attempt goes without the retry machinery (most items need no more);
        # tenacity takes over from its failure, as its attempt 1.
        try:
            return await self._attempt(up, op, ctx, 1)
        except _Retryable as exc:
            first = failed(exc, 1)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(up.spec.retries + 1),
            wait=_wait_retry_after_or_backoff(up.spec),
            retry=retry_if_exception_type(_Retryable),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    number = attempt.retry_state.attempt_number
                    if number == 1:
                        raise first
                    try:
                        return await self._attempt(up, op, ctx, number)
                    except _Retryable as exc:
                        failed(exc, number)
                        raise
        except _Retryable as exc:
            return ItemResult(
                id=op.id, index=op.index, status=exc.status, state=ItemState.FAILED,
                error=ItemErrorBody(code=exc.code, message=(
                    f"{exc.message} (gave up after {len(errors)} attempts)")),
                attempts=len(errors), attempt_errors=errors, result=exc.result)
        raise AssertionError("tenacity ends with a result or the last error")  # pragma: no cover

    def _request_parts(self, up: _Upstream, op: PlannedOperation,
                       ctx: ChunkContext) -> tuple[str, dict[str, str]]:
        rest = op.path[len(up.spec.prefix):] if up.spec.strip_prefix else op.path
        if not rest.startswith("/"):
            rest = "/" + rest
        url = up.spec.base_url.rstrip("/") + rest
        allowed = up.spec.header_allowlist
        headers = {k: v for k, v in (op.headers or {}).items() if k.lower() in allowed}
        headers["Idempotency-Key"] = op.idempotency_key or f"{ctx.batch_id}:{op.index}"
        return url, headers

    async def _attempt(self, up: _Upstream, op: PlannedOperation, ctx: ChunkContext,
                       number: int) -> ItemResult:
        import aiohttp  # imported by _upstream already: a lookup

        url, headers = self._request_parts(up, op, ctx)
        if up.rate is not None:
            await up.rate.take()
        sent_at = await up.limit.acquire()
        throttled = healthy = False
        try:  # the in-flight slot goes back whatever happens, a failed request included
            try:
                async with up.client.request(op.method, url, headers=headers, json=op.body,
                                             proxy=up.route.proxy,
                                             proxy_auth=up.route.proxy_auth) as response:
                    content = await response.read()
            except TimeoutError as exc:
                REQUESTS.labels(up.name, "timeout").inc()
                raise _Retryable(504, "upstream_timeout",
                                 f"{op.method} {url}: {type(exc).__name__}") from exc
            except aiohttp.InvalidURL as exc:
                REQUESTS.labels(up.name, "invalid_url").inc()
                return ItemResult(id=op.id, index=op.index, status=400, state=ItemState.FAILED,
                                  error=ItemErrorBody(code="invalid_path", message=(
                                      f"{op.method} {url}: not a valid URL ({exc})")),
                                  attempts=number)
            except aiohttp.ClientError as exc:
                REQUESTS.labels(up.name, "connection_error").inc()
                raise _Retryable(502, "upstream_unreachable",
                                 f"{op.method} {url}: {type(exc).__name__}: {exc}") from exc
            status = response.status
            retry_after = parse_retry_after(response.headers.get("Retry-After"),
                                            up.spec.max_retry_after_seconds)
            throttled = status == 429 or (status == 503 and bool(retry_after))
            healthy = not throttled and status < 500
        finally:
            # With a rate limit, a push-back slows the rate (AIMD), not the concurrency.
            await up.limit.release(sent_at, throttled=throttled and up.rate is None,
                                   healthy=healthy)
        if up.rate is not None:
            if throttled:
                up.rate.rate.throttled(sent_at)
            elif healthy:
                up.rate.rate.accepted(sent_at)
        REQUESTS.labels(up.name, str(status)).inc()
        if 200 <= status < 300:
            result: Any = None
            if content:
                try:
                    result = json.loads(content)
                except ValueError:
                    result = {"text": _text(content, 10_000)}
            return ItemResult(id=op.id, index=op.index, status=status,
                              state=ItemState.SUCCEEDED, result=result, attempts=number)
        code, message, payload = _error_of(status, response.reason, content)
        if status == 429 or status >= 500:
            if status == 429 and code == "http_429":
                code = "rate_limited"
            raise _Retryable(status, code, message, retry_after, payload)
        return ItemResult(id=op.id, index=op.index, status=status,
                          state=ItemState.FAILED, error=ItemErrorBody(code=code, message=message),
                          attempts=number, result=payload)

    async def aclose(self) -> None:
        for up in self._upstreams.values():
            await up.client.close()
            if up.rate is not None:
                await up.rate.aclose()
        await self._prefect_stack.aclose()
        self._prefect_clients.clear()

    def close(self) -> None:
        """Close the clients and stop the target's loop (tests and shutdown)."""
        if self._loop is None:
            return
        self._submit(self.aclose()).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = self._thread = None
        self._upstreams.clear()
        self._prefect_lock = asyncio.Lock()  # for the next loop
