"""A fault-injecting upstream REST API, for tests, benchmarks and the demo.

A small ASGI app (run by uvicorn on 127.0.0.1) that answers any method and path
like a well-behaved JSON API that honours ``Idempotency-Key`` — a repeated key gets the stored
response (``Idempotent-Replayed: true``) and is not executed again — and misbehaves on demand:

- ``latency_ms`` (+ ``jitter_ms``) before answering;
- ``error_rate``: that fraction of requests answer ``error_status`` (503) without executing;
- ``fail_first``: the first N attempts of every key answer ``error_status`` (deterministic);
- ``rate_limit_rps``: over that many accepted requests in the last second → 429 with
  ``Retry-After`` (seconds, or an HTTP date with ``retry_after_http_date``);
- ``timeout_rate``: that fraction of requests hang for ``hang_seconds`` (client timeouts);
- ``fail_paths``: ``{substring: status}`` — matching paths always answer that status.

Control: ``PUT /_upstream/config`` (JSON of :class:`UpstreamConfig`), ``POST /_upstream/reset``
(config and records), ``GET /_upstream/requests`` (every request: key, method, path, time,
status, outcome), ``GET /_upstream/stats`` (counts, executions per key, peak requests in any
one-second window, peak requests in flight at once, the time it took to answer the executed
requests). Run it: ``python -m batchops.devtools.upstream --port 9000``.

It is the benchmarks' instrument, so the answering path is plain ASGI (no request or response
objects, no routing) and uvicorn runs it on uvloop with the httptools parser: at a few hundred
requests a second on two cores, every millisecond of CPU it spends per request is added to
the latency it is asked to simulate, for batchops and for the baseline alike. The control
routes (``/_upstream/...``) are a Starlette app.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import httpx
import uvicorn
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from batchops.devtools import free_port

__all__ = ["RecordedRequest", "UpstreamConfig", "UpstreamState", "create_app", "running_upstream"]


class UpstreamConfig(BaseModel):
    latency_ms: float = Field(0, ge=0)
    jitter_ms: float = Field(0, ge=0)
    error_rate: float = Field(0, ge=0, le=1)
    error_status: int = 503
    fail_first: int = Field(0, ge=0)
    rate_limit_rps: int | None = Field(None, ge=1)
    retry_after_seconds: float = Field(1, ge=0)
    retry_after_http_date: bool = False
    timeout_rate: float = Field(0, ge=0, le=1)
    hang_seconds: float = Field(30, ge=0)
    fail_paths: dict[str, int] = Field(default_factory=dict)
    seed: int | None = None


@dataclass
class RecordedRequest:
    key: str | None
    method: str
    path: str
    at: float  # seconds since the upstream started (monotonic)
    status: int
    outcome: str  # executed | replayed | rate_limited | error | timeout | in_flight | rejected
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0  # from the request's arrival to its answer (executed requests)


@dataclass
class UpstreamState:
    config: UpstreamConfig = field(default_factory=UpstreamConfig)
    started: float = field(default_factory=time.monotonic)
    requests: list[RecordedRequest] = field(default_factory=list)
    stored: dict[str, tuple[int, Any]] = field(default_factory=dict)
    in_flight: set[str] = field(default_factory=set)
    attempts: Counter[str] = field(default_factory=Counter)
    executions: Counter[str] = field(default_factory=Counter)
    accepted: deque[float] = field(default_factory=deque)
    serving: int = 0  # requests being answered now
    peak_serving: int = 0
    next_id: int = 1
    rng: random.Random = field(default_factory=random.Random)

    def reset(self, config: UpstreamConfig | None = None) -> None:
        self.__init__(config=config or UpstreamConfig())  # type: ignore[misc]
        if self.config.seed is not None:
            self.rng.seed(self.config.seed)

    def stats(self) -> dict[str, Any]:
        by_outcome = Counter(r.outcome for r in self.requests)
        times = sorted(r.at for r in self.requests if r.outcome != "rate_limited")
        peak, j = 0, 0
        for i, t in enumerate(times):
            while times[j] <= t - 1.0:
                j += 1
            peak = max(peak, i - j + 1)
        first = self.requests[0].at if self.requests else 0.0
        served = sorted(r.seconds for r in self.requests if r.outcome == "executed")
        return {
            "requests": len(self.requests),
            "by_outcome": dict(by_outcome),
            "keys": len(self.attempts),
            "executed_keys": len(self.executions),
            "executed_more_than_once": sorted(k for k, n in self.executions.items() if n > 1),
            "peak_accepted_per_second": peak,
            "peak_in_flight": self.peak_serving,
            "rate_limited_after_first_second": sum(
                1 for r in self.requests if r.outcome == "rate_limited" and r.at - first > 1.0),
            "rate_limited_by_second": _by_second(
                [r.at - first for r in self.requests if r.outcome == "rate_limited"]),
            "first_at": first,
            "last_at": self.requests[-1].at if self.requests else 0.0,
            "latency_ms": _latency_ms(served),
        }


def _by_second(offsets: list[float]) -> list[int]:
    """How many of ``offsets`` (seconds since the first request) fell in each whole second."""
    counts = Counter(int(t) for t in offsets)
    return [counts.get(s, 0) for s in range(max(counts) + 1)] if counts else []


def _latency_ms(seconds: list[float]) -> dict[str, float] | None:
    """Mean and percentiles, in ms, of sorted durations (``None`` when there are none)."""
    if not seconds:
        return None

    def pct(p: float) -> float:
        return round(1000 * seconds[min(len(seconds) - 1, int(p * len(seconds)))], 2)

    return {"mean": round(1000 * sum(seconds) / len(seconds), 2), "p50": pct(0.5),
            "p95": pct(0.95), "p99": pct(0.99), "max": round(1000 * seconds[-1], 2)}


_SKIPPED_HEADERS = frozenset((b"host", b"content-length", b"connection", b"accept-encoding"))
_JSON_HEADERS = [(b"content-type", b"application/json")]


def _json(payload: Any) -> bytes:
    # What Starlette's JSONResponse sends.
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, indent=None,
                      separators=(",", ":")).encode()


def _retry_after(cfg: UpstreamConfig, seconds: float) -> str:
    if cfg.retry_after_http_date:
        return formatdate(time.time() + seconds, usegmt=True)
    return str(max(1, round(seconds)))


def create_app(state: UpstreamState | None = None) -> ASGIApp:
    """The upstream app; ``state`` is shared with the caller (tests read it directly)."""
    st = state or UpstreamState()

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        arrived = time.monotonic()
        st.serving += 1
        st.peak_serving = max(st.peak_serving, st.serving)
        try:
            chunks = []
            while True:
                message = await receive()
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
            status, payload, extra = await answer(scope, b"".join(chunks), arrived)
        finally:
            st.serving -= 1
        content = _json(payload)
        await send({"type": "http.response.start", "status": status, "headers": [
            *_JSON_HEADERS, (b"content-length", str(len(content)).encode()), *extra]})
        await send({"type": "http.response.body", "body": content})

    async def answer(scope: Scope, raw: bytes, now: float,
                     ) -> tuple[int, Any, list[tuple[bytes, bytes]]]:
        cfg = st.config
        method: str = scope["method"]
        key: str | None = None
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name == b"idempotency-key" and key is None:
                key = value.decode("latin-1")
            if name not in _SKIPPED_HEADERS:
                headers[name.decode("latin-1")] = value.decode("latin-1")
        body: Any
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        query = scope.get("query_string", b"")
        path = scope["path"] + (f"?{query.decode('latin-1')}" if query else "")
        recorded = RecordedRequest(key, method, path, now - st.started, 0, "", body, headers)

        def record(status: int, outcome: str) -> None:
            recorded.status, recorded.outcome = status, outcome
            st.requests.append(recorded)

        if cfg.rate_limit_rps is not None:
            while st.accepted and st.accepted[0] <= now - 1.0:
                st.accepted.popleft()
            if len(st.accepted) >= cfg.rate_limit_rps:
                wait = max(cfg.retry_after_seconds, st.accepted[0] + 1.0 - now)
                record(429, "rate_limited")
                return (429, {"error": {"code": "rate_limited", "message": "too many requests"}},
                        [(b"retry-after", _retry_after(cfg, wait).encode())])
            st.accepted.append(now)
        if key is not None:
            st.attempts[key] += 1
            if key in st.stored:
                status, payload = st.stored[key]
                record(status, "replayed")
                return status, payload, [(b"idempotent-replayed", b"true")]
            if key in st.in_flight:
                record(409, "in_flight")
                return (409, {"error": {"code": "idempotency_in_flight",
                                        "message": "a request with this key is running"}}, [])
        for fragment, status in cfg.fail_paths.items():
            if fragment in path:
                record(status, "rejected")
                return (status, {"error": {"code": f"http_{status}",
                                           "message": f"{path} is refused here"}}, [])
        if (key is not None and st.attempts[key] <= cfg.fail_first) or \
                st.rng.random() < cfg.error_rate:
            record(cfg.error_status, "error")
            return (cfg.error_status, {"error": {"code": "unavailable", "message": "try again"}},
                    [(b"retry-after", b"0")] if cfg.error_status == 503 else [])
        if st.rng.random() < cfg.timeout_rate:
            record(0, "timeout")
            await asyncio.sleep(cfg.hang_seconds)
            return 504, {"error": {"code": "slow", "message": "too late"}}, []
        if key is not None:
            st.in_flight.add(key)
        try:
            delay = cfg.latency_ms + (st.rng.uniform(-cfg.jitter_ms, cfg.jitter_ms)
                                      if cfg.jitter_ms else 0.0)
            if delay > 0:
                await asyncio.sleep(delay / 1000)
            status = 201 if method == "POST" else 200
            payload = {"id": st.next_id, "method": method, "path": path, "body": body}
            st.next_id += 1
            if key is not None:
                st.executions[key] += 1
                st.stored[key] = (status, payload)
            recorded.seconds = time.monotonic() - now
            record(status, "executed")
            return status, payload, []
        finally:
            if key is not None:
                st.in_flight.discard(key)

    async def put_config(request: Request) -> Response:
        st.config = UpstreamConfig.model_validate(await request.json())
        if st.config.seed is not None:
            st.rng.seed(st.config.seed)
        return JSONResponse(st.config.model_dump())

    async def reset(request: Request) -> Response:
        raw = await request.body()
        st.reset(UpstreamConfig.model_validate_json(raw) if raw else None)
        return JSONResponse({"reset": True})

    async def requests_(request: Request) -> Response:
        return JSONResponse([r.__dict__ for r in st.requests])

    async def stats(request: Request) -> Response:
        return JSONResponse(st.stats())

    control = Starlette(routes=[
        Route("/_upstream/config", put_config, methods=["PUT"]),
        Route("/_upstream/reset", reset, methods=["POST"]),
        Route("/_upstream/requests", requests_, methods=["GET"]),
        Route("/_upstream/stats", stats, methods=["GET"]),
    ])
    methods = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/_upstream/"):
            await control(scope, receive, send)
        elif scope["method"] not in methods:
            await send({"type": "http.response.start", "status": 405,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"allow", b", ".join(m.encode() for m in sorted(methods)))]})
            await send({"type": "http.response.body", "body": b"Method Not Allowed"})
        else:
            await serve(scope, receive, send)

    return app


# The fastest event loop and HTTP parser uvicorn has (both are dependencies of batchops); no
# access log, which would cost more than the answer.
_SERVER: dict[str, Any] = {"loop": "uvloop", "http": "httptools", "access_log": False}


@contextmanager
def running_upstream(config: UpstreamConfig | None = None, port: int | None = None,
                     ) -> Iterator[tuple[str, UpstreamState]]:
    """Serve the upstream on 127.0.0.1 in a thread; yields its base URL and its state."""
    state = UpstreamState()
    state.reset(config)
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off", **_SERVER))
    thread = threading.Thread(target=server.run, name="upstream", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fault-injecting upstream did not start")
        time.sleep(0.02)
    try:
        yield url, state
    finally:
        server.should_exit = True
        thread.join(10)


def configure_upstream(url: str, config: UpstreamConfig) -> None:
    """Reset a running upstream (another process) to ``config``, forgetting its records."""
    httpx.post(f"{url}/_upstream/reset", content=config.model_dump_json(), timeout=10
               ).raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--latency-ms", type=float, default=0)
    args = parser.parse_args()
    state = UpstreamState()
    state.reset(UpstreamConfig(latency_ms=args.latency_ms))
    uvicorn.run(create_app(state), host="127.0.0.1", port=args.port, log_level="warning",
                lifespan="off", **_SERVER)


if __name__ == "__main__":
    main()
