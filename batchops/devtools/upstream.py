"""A fault-injecting upstream REST API, for tests, benchmarks and the demo.

A small ASGI app (Starlette, run by uvicorn on 127.0.0.1) that answers any method and path
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
one-second window, peak requests in flight at once). Run it:
``python -m batchops.devtools.upstream --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
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
            "first_at": first,
            "last_at": self.requests[-1].at if self.requests else 0.0,
        }


def _retry_after(cfg: UpstreamConfig, seconds: float) -> str:
    if cfg.retry_after_http_date:
        return formatdate(time.time() + seconds, usegmt=True)
    return str(max(1, round(seconds)))


def create_app(state: UpstreamState | None = None) -> Starlette:
    """The upstream app; ``state`` is shared with the caller (tests read it directly)."""
    st = state or UpstreamState()

    async def serve(request: Request) -> Response:
        st.serving += 1
        st.peak_serving = max(st.peak_serving, st.serving)
        try:
            return await answer(request)
        finally:
            st.serving -= 1

    async def answer(request: Request) -> Response:
        cfg = st.config
        now = time.monotonic()
        key = request.headers.get("idempotency-key")
        raw = await request.body()
        try:
            body = (await request.json()) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = {k: v for k, v in request.headers.items()
                   if k not in ("host", "content-length", "connection", "accept-encoding")}

        def record(status: int, outcome: str) -> None:
            st.requests.append(RecordedRequest(key, request.method, path, now - st.started,
                                               status, outcome, body, headers))

        if cfg.rate_limit_rps is not None:
            while st.accepted and st.accepted[0] <= now - 1.0:
                st.accepted.popleft()
            if len(st.accepted) >= cfg.rate_limit_rps:
                wait = max(cfg.retry_after_seconds, st.accepted[0] + 1.0 - now)
                record(429, "rate_limited")
                return JSONResponse(
                    {"error": {"code": "rate_limited", "message": "too many requests"}},
                    status_code=429, headers={"Retry-After": _retry_after(cfg, wait)})
            st.accepted.append(now)
        if key is not None:
            st.attempts[key] += 1
            if key in st.stored:
                status, payload = st.stored[key]
                record(status, "replayed")
                return JSONResponse(payload, status_code=status,
                                    headers={"Idempotent-Replayed": "true"})
            if key in st.in_flight:
                record(409, "in_flight")
                return JSONResponse({"error": {"code": "idempotency_in_flight",
                                               "message": "a request with this key is running"}},
                                    status_code=409)
        for fragment, status in cfg.fail_paths.items():
            if fragment in path:
                record(status, "rejected")
                return JSONResponse({"error": {"code": f"http_{status}",
                                               "message": f"{path} is refused here"}},
                                    status_code=status)
        if (key is not None and st.attempts[key] <= cfg.fail_first) or \
                st.rng.random() < cfg.error_rate:
            record(cfg.error_status, "error")
            return JSONResponse({"error": {"code": "unavailable", "message": "try again"}},
                                status_code=cfg.error_status,
                                headers={"Retry-After": "0"} if cfg.error_status == 503 else {})
        if st.rng.random() < cfg.timeout_rate:
            record(0, "timeout")
            await asyncio.sleep(cfg.hang_seconds)
            return JSONResponse({"error": {"code": "slow", "message": "too late"}},
                                status_code=504)
        if key is not None:
            st.in_flight.add(key)
        try:
            delay = cfg.latency_ms + (st.rng.uniform(-cfg.jitter_ms, cfg.jitter_ms)
                                      if cfg.jitter_ms else 0.0)
            if delay > 0:
                await asyncio.sleep(delay / 1000)
            status = 201 if request.method == "POST" else 200
            payload = {"id": st.next_id, "method": request.method, "path": path, "body": body}
            st.next_id += 1
            if key is not None:
                st.executions[key] += 1
                st.stored[key] = (status, payload)
            record(status, "executed")
            return JSONResponse(payload, status_code=status)
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

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(routes=[
        Route("/_upstream/config", put_config, methods=["PUT"]),
        Route("/_upstream/reset", reset, methods=["POST"]),
        Route("/_upstream/requests", requests_, methods=["GET"]),
        Route("/_upstream/stats", stats, methods=["GET"]),
        Route("/{path:path}", serve, methods=methods),
    ])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_upstream(config: UpstreamConfig | None = None, port: int | None = None,
                     ) -> Iterator[tuple[str, UpstreamState]]:
    """Serve the upstream on 127.0.0.1 in a thread; yields its base URL and its state."""
    state = UpstreamState()
    state.reset(config)
    port = port or _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
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
                lifespan="off")


if __name__ == "__main__":
    main()
