"""Operations: liveness, readiness (the store and the Prefect API) and Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import RuntimeDep
from api.errors import error_response
from batchops.runtime import Runtime

__all__ = ["router"]

router = APIRouter(tags=["operations"])

_CHECK_SECONDS = 5.0


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_store(runtime: Runtime) -> None:
    runtime.store.check_writable()  # a store that answers reads but refuses writes is not ready


async def _check_prefect() -> None:
    from batchops.orchestration import check_api

    await check_api()


async def _probe(name: str, check: Any) -> tuple[str, str]:
    try:
        await asyncio.wait_for(check, timeout=_CHECK_SECONDS)
    except TimeoutError:
        return name, f"no answer within {_CHECK_SECONDS:g} s"
    except Exception as exc:
        return name, f"{type(exc).__name__}: {exc}".strip()
    return name, "ok"


def _check_redis(runtime: Runtime) -> None:
    assert runtime.store.progress is not None
    runtime.store.progress.ping()


@router.get("/readyz", summary="Readiness: the batch store and the Prefect API answer",
            responses={503: {"description": "a dependency does not answer"}})
async def readyz(runtime: RuntimeDep) -> Response:
    """``ready`` when every dependency answers; ``degraded`` (still 200) when only Redis does
    not — status reads then come from the store; ``503`` when Prefect does not, or the store
    does not accept writes (unreachable, or read-only)."""
    probes = [_probe("store", asyncio.to_thread(_check_store, runtime)),
              _probe("prefect", _check_prefect())]
    if runtime.store.progress is not None:
        probes.append(_probe("redis", asyncio.to_thread(_check_redis, runtime)))
    checks = dict(await asyncio.gather(*probes))
    failing = [name for name, result in checks.items() if result != "ok"]
    if not failing:
        return JSONResponse({"status": "ready", "checks": checks})
    if failing == ["redis"]:
        return JSONResponse({"status": "degraded", "checks": checks,
                             "message": "Redis unavailable: status reads come from the store"})
    return error_response(503, "not_ready", f"not ready: {', '.join(failing)} unavailable",
                          checks=checks)


@router.get("/metrics", summary="Prometheus metrics",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    body = await asyncio.to_thread(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
