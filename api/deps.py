"""Dependencies of the routes, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from api.runs import BatchRunner
from batchops.auth import ApiKeyring, InvalidApiKey, is_loopback
from batchops.quota import OperationsQuota
from batchops.runtime import Runtime, get_runtime

__all__ = ["QuotaDep", "RunnerDep", "RuntimeDep", "ScopeDep"]

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                               description="the API key, instead of Authorization")


def _runtime() -> Runtime:
    # A sync dependency: FastAPI calls it in a worker thread (the first call migrates the store).
    return get_runtime()


RuntimeDep = Annotated[Runtime, Depends(_runtime)]


def _scope(
    request: Request,
    runtime: RuntimeDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key_header)],
) -> str:
    """The caller's scope from its API key (401 when keys are configured and it has none)."""
    keyring = ApiKeyring.from_settings(runtime.settings)
    server = request.scope.get("server")
    if not keyring.enabled and server is not None and not is_loopback(str(server[0])):
        # Served beyond 127.0.0.1 without check_bind (e.g. `uvicorn --host 0.0.0.0`).
        raise InvalidApiKey("no API keys are configured, so this API answers on 127.0.0.1 "
                            "only")
    presented = bearer.credentials if bearer is not None else api_key
    return keyring.scope_for(presented)


ScopeDep = Annotated[str, Depends(_scope)]


def _quota(request: Request) -> OperationsQuota:
    quota: OperationsQuota = request.app.state.quota
    return quota


QuotaDep = Annotated[OperationsQuota, Depends(_quota)]


def _runner(request: Request) -> BatchRunner:
    runner: BatchRunner = request.app.state.runner
    return runner


RunnerDep = Annotated[BatchRunner, Depends(_runner)]
