"""The FastAPI application: ``create_app()``, the module-level ``app``, and ``run()``.

:func:`run` serves it with uvicorn, after refusing to listen beyond 127.0.0.1 when no API keys
are configured (:func:`batchops.auth.check_bind`). Wherever the API is served, uvicorn gets
:func:`server_options`: its h11 parser, which refuses a request line and headers larger than
``settings.max_header_bytes`` as they arrive (httptools, uvicorn's other parser, has no such
limit: it reads a 64 MB header line whole before the app sees the request).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.errors import install_error_handlers
from api.host_check import HostCheckMiddleware
from api.metrics import ApiMetrics
from api.routes import batch_actions, batches, dead_letters, health
from api.runs import BatchRunner
from batchops.auth import ApiKeyring, HostAllowlist, check_bind
from batchops.quota import build_quota
from batchops.runtime import get_runtime
from batchops.schemas import BatchCreate
from batchops.settings import Settings, get_settings

__all__ = ["app", "create_app", "run", "server_options"]

logger = logging.getLogger("api")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    if not ApiKeyring.from_settings(settings).enabled:
        logger.warning("no API keys are configured: every caller is trusted (scope 'default'); "
                       "serve on 127.0.0.1 only")
    app.state.host_allowlist = HostAllowlist.from_settings(settings)
    await asyncio.to_thread(get_runtime)  # builds the runtime and migrates the store
    app.state.quota = build_quota(settings)
    app.state.runner = BatchRunner(settings.api.sync_workers, settings.api.process_batch_deployment)
    app.state.runner.attach(get_runtime())
    app.state.metrics = ApiMetrics(get_runtime)
    try:
        yield
    finally:
        await asyncio.to_thread(app.state.runner.shutdown)  # running sync batches finish
        await app.state.quota.close()


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, with the ``POST /batches`` body (read as it streams) described."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes, tags=app.openapi_tags)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    body = BatchCreate.model_json_schema(ref_template="#/components/schemas/{model}",
                                         by_alias=False)
    components.update(body.pop("$defs", {}))
    components["BatchCreate"] = body
    app.openapi_schema = schema
    return schema


def create_app() -> FastAPI:
    """A new application; settings are read when it starts serving."""
    app = FastAPI(
        title="batchops",
        version="0.1.0",
        description="Run batches of API operations as Prefect flows: validated up front, "
                    "chunked, retried, cached by idempotency key; results per item.",
        lifespan=_lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(HostCheckMiddleware)
    app.include_router(batch_actions.router)  # before batches: /batches/import is literal
    app.include_router(batches.router)
    app.include_router(dead_letters.router)
    app.include_router(health.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


app = create_app()


def server_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn settings the API is served with (``uvicorn.Config`` keywords)."""
    return {"http": "h11", "h11_max_incomplete_event_size": settings.api.max_header_bytes,
            "proxy_headers": False}


def run(host: str | None = None, port: int | None = None) -> None:
    """Serve the API with uvicorn (defaults: ``settings.api_host``/``api_port``).

    Raises:
        ConfigurationError: a setting is invalid, or no API keys are configured and ``host``
            is not loopback.
    """
    import uvicorn

    settings = get_settings()
    host = host or settings.api.host
    check_bind(host, settings)
    uvicorn.run(app, host=host, port=settings.api.port if port is None else port,
                **server_options(settings))
