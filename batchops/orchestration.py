"""Everything batchops asks of Prefect's API, in one place.

This is the only module that uses Prefect's client (``prefect.get_client``,
``prefect.client``), starts flow runs of deployments, reads or forces flow-run states, writes
artifacts, or takes and gives back global concurrency slots. Flows and tasks use Prefect's
decorators and call down to here; the worker type (:mod:`deployments.worker`) passes its own
client, the rest open one per call (Prefect's client is cheap to open; the engine keeps its
own for a run). Only Prefect's public API is used.

Every function raises what Prefect's client raises when the server cannot be reached
(``httpx.HTTPError``); the callers decide whether that is transient.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

import httpx
from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType, TaskRun
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient, SyncPrefectClient

__all__ = [
    "FlowRun",
    "Granted",
    "PendingRuns",
    "SlotsBusy",
    "StateType",
    "SyncLimits",
    "TaskRun",
    "UpstreamLimits",
    "check_api",
    "crash_flow_run",
    "create_progress",
    "deployment_entrypoint",
    "ensure_work_pool",
    "mark_cancelled",
    "publish_markdown",
    "publish_table",
    "read_cancelling",
    "read_flow_run",
    "rename_flow_run",
    "start_deployment_run",
    "update_progress",
    "wait_for_run",
]

T = TypeVar("T")


# -- flow runs -----------------------------------------------------------------------------


def read_flow_run(flow_run_id: str | UUID) -> FlowRun | None:
    """The flow run; ``None`` when Prefect says it does not exist (deleted, or from a server
    whose database was replaced)."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_flow_run(UUID(str(flow_run_id)))
        except ObjectNotFound:
            return None


def rename_flow_run(flow_run_id: str | UUID, name: str) -> None:
    with get_client(sync_client=True) as client:
        client.update_flow_run(UUID(str(flow_run_id)), name=name)


def crash_flow_run(flow_run_id: str | UUID, message: str) -> None:
    """Force the run ``Crashed`` (its process is gone; no engine will report its end)."""
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(UUID(str(flow_run_id)), Crashed(message=message), force=True)


def _deployment_gone(exc: Exception) -> bool:
    """Whether Prefect's answer says the deployment (or the object asked for) does not exist:
    ``ObjectNotFound`` from reads, a 404 ``PrefectHTTPStatusError`` from
    ``create_flow_run_from_deployment``."""
    if isinstance(exc, ObjectNotFound):
        return True
    return (isinstance(exc, httpx.HTTPStatusError)
            and exc.response.status_code == httpx.codes.NOT_FOUND)


class _Kept(threading.local):
    """A thread's open sync client, for the API URL it was opened for."""

    client: SyncPrefectClient | None = None
    api_url: str | None = None


_kept = _Kept()


def _kept_client() -> tuple[SyncPrefectClient, str]:
    """This thread's open client and its API URL (one per thread and URL, kept from call to
    call: opening one costs a TLS context and a version check, ~20 ms of CPU)."""
    from prefect.settings import get_current_settings

    url = str(get_current_settings().api.url)
    if _kept.client is None or _kept.api_url != url:
        if _kept.client is not None:
            _kept.client.__exit__(None, None, None)
        client = get_client(sync_client=True)
        client.__enter__()
        _kept.client, _kept.api_url = client, url
    return _kept.client, url


class _KnownDeployment:
    """A deployment's id, looked up by name on first use and again once Prefect says the
    deployment is gone (deleted, or re-created under a new id)."""

    def __init__(self, name: str) -> None:
        self.name = name  # flow/deployment
        self.id: UUID | None = None

    def create_run(self, client: SyncPrefectClient,
                   create: Callable[[UUID], FlowRun]) -> FlowRun:
        """``create(id)``: a new run of the deployment; if the deployment is gone, its id is
        looked up once more and the run created under the new one.

        Raises:
            ObjectNotFound: there is no deployment of that name.
            LookupError: the deployment disappeared twice while the run was being created.
        """
        for _attempt in range(2):
            if self.id is None:
                self.id = client.read_deployment_by_name(self.name).id
            try:
                return create(self.id)
            except Exception as exc:
                if not _deployment_gone(exc):
                    raise
                self.id = None  # deleted since: look it up again
        raise LookupError(f"the deployment {self.name!r} keeps disappearing")


_deployments: dict[tuple[str, str], _KnownDeployment] = {}  # by (API URL, flow/deployment)


def start_deployment_run(deployment: str, parameters: dict[str, Any], *, name: str,
                         idempotency_key: str) -> FlowRun:
    """A new ``Scheduled`` run of the deployment (``flow/deployment``) for a worker of its
    pool; returns at once. The same ``idempotency_key`` gives back the same run. The
    deployment's id is looked up once per process and API URL, and again when the deployment
    was deleted (or re-created) since.

    Raises:
        ObjectNotFound: there is no such deployment.
        LookupError: the deployment disappeared twice while the run was being created.
    """
    client, url = _kept_client()
    known = _deployments.setdefault((url, deployment), _KnownDeployment(deployment))
    return known.create_run(client, lambda deployment_id: client.create_flow_run_from_deployment(
        deployment_id, parameters=parameters, name=name, idempotency_key=idempotency_key))


def wait_for_run(flow_run_id: UUID, timeout: float | None = None) -> FlowRun:
    """The flow run once it has reached a final state (every 2 s a read; ``timeout`` seconds
    at most, or for as long as it takes)."""
    import asyncio

    from prefect.flow_runs import wait_for_flow_run

    return asyncio.run(wait_for_flow_run(flow_run_id, timeout=None if timeout is None
                                         else int(timeout), poll_interval=2))


class _Thread(threading.local):
    settings: Any = None  # the Prefect settings the context below was made for
    context: contextvars.Context | None = None
    stack: contextlib.ExitStack | None = None
    deployment: _KnownDeployment | None = None  # None: there is none on the server


class PendingRuns:
    """Flow runs of one deployment created ``Pending`` — no worker polling its pool picks
    them up — and executed by the threads of this process one after another (the API's
    embedded worker, for sync batches).

    Each thread keeps a context in which Prefect's settings and one open sync client stay
    entered from one run to the next (Prefect's engine uses the client of the current
    ``SyncClientContext``), so a run does not open a client of its own — a TLS context and a
    version check, ~20 ms of CPU — and the deployment's id is looked up once per thread (again
    when the deployment was deleted since, or the settings changed).
    """

    def __init__(self, deployment: str) -> None:
        self.deployment = deployment
        self._mine = _Thread()
        self._opened: list[tuple[contextvars.Context, contextlib.ExitStack]] = []
        self._lock = threading.Lock()

    def run(self, settings: Any, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in this thread's context for the Prefect ``settings``."""
        mine = self._mine
        if mine.context is None or mine.settings is not settings:
            self._close(mine)
            mine.context, mine.stack = contextvars.Context(), contextlib.ExitStack()
            mine.context.run(self._enter, mine.stack, settings)
            mine.settings, mine.deployment = settings, _KnownDeployment(self.deployment)
            with self._lock:
                self._opened.append((mine.context, mine.stack))
        return mine.context.run(fn, *args)

    @staticmethod
    def _enter(stack: contextlib.ExitStack, settings: Any) -> None:
        from prefect.context import SettingsContext, SyncClientContext, get_settings_context

        stack.enter_context(SettingsContext(profile=get_settings_context().profile,
                                            settings=settings))
        stack.enter_context(SyncClientContext())

    def create(self, flow: Any, parameters: dict[str, Any], name: str) -> FlowRun:
        """A ``Pending`` run of the deployment named ``name`` (in :meth:`run`); without the
        deployment (no work pool serves this API), a run of ``flow`` alone.

        Raises:
            LookupError: the deployment disappeared twice while the run was being created.
        """
        from prefect.states import Pending

        mine, client = self._mine, get_client(sync_client=True)
        if mine.deployment is not None:
            try:
                return mine.deployment.create_run(
                    client, lambda deployment_id: client.create_flow_run_from_deployment(
                        deployment_id, parameters=parameters, name=name, state=Pending()))
            except ObjectNotFound:
                logging.getLogger("batchops.orchestration").info(
                    "no deployment %s on the Prefect server: its runs here are flow runs of "
                    "no deployment", self.deployment)
                mine.deployment = None
        return client.create_flow_run(flow, name=name, parameters=parameters, state=Pending())

    def _close(self, mine: _Thread) -> None:
        if mine.context is not None and mine.stack is not None:
            with self._lock:
                self._opened.remove((mine.context, mine.stack))
            mine.context.run(mine.stack.close)
        mine.context = mine.stack = None

    def close(self) -> None:
        """Close every thread's client (the threads have stopped)."""
        with self._lock:
            opened, self._opened = self._opened, []
        for context, stack in opened:
            context.run(stack.close)


def read_cancelling(ids: Sequence[UUID]) -> list[FlowRun]:
    """Those of the runs ``ids`` that Prefect has been asked to cancel (``Cancelling``)."""
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=list(ids)),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CANCELLING]))))


def mark_cancelled(flow_run_id: UUID, message: str) -> None:
    """Mark the run ``Cancelled`` unless it is already."""
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run_id)
        if current.state is None or not current.state.is_cancelled():
            client.set_flow_run_state(flow_run_id, Cancelled(message=message), force=True)


async def deployment_entrypoint(client: PrefectClient, deployment_id: UUID) -> tuple[str, str]:
    """``(name, entrypoint)`` of the deployment (the entrypoint may be empty)."""
    deployment = await client.read_deployment(deployment_id)
    return deployment.name, deployment.entrypoint or ""


# -- work pools and health -----------------------------------------------------------------


def ensure_work_pool(name: str, worker_type: str, base_job_template: dict[str, Any]) -> str:
    """Create the work pool if it is missing; the type of the pool of that name."""
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_work_pool(WorkPoolCreate(name=name, type=worker_type,
                                                   base_job_template=base_job_template))
        return client.read_work_pool(name).type


async def check_api() -> None:
    """Raise why the Prefect API does not answer its health check (nothing when it does)."""
    async with get_client() as client:
        problem = await client.api_healthcheck()
    if problem is not None:
        raise problem


# -- artifacts of the current flow run -----------------------------------------------------


def create_progress(percent: float, key: str, description: str) -> UUID:
    from prefect.artifacts import create_progress_artifact

    created: UUID = create_progress_artifact(  # type: ignore[assignment]
        percent, key=key, description=description)
    return created


def update_progress(artifact_id: UUID, percent: float, description: str) -> None:
    from prefect.artifacts import update_progress_artifact

    update_progress_artifact(artifact_id, percent, description=description)


def publish_table(rows: list[dict[str, Any]], key: str, description: str) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(rows, key=key, description=description)


def publish_markdown(markdown: str, key: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown, key=key, description=description)


# -- global concurrency limits -------------------------------------------------------------


@dataclass(frozen=True)
class Granted:
    """Slots taken under a lease; ``limit_found`` is ``False`` when the limit does not exist
    (the lease then holds nothing)."""

    lease_id: UUID
    limit_found: bool


@dataclass(frozen=True)
class SlotsBusy:
    """Not free now (423); the server's ``Retry-After`` header, if any."""

    retry_after: str | None


class UpstreamLimits:
    """Slots of global concurrency limits under leases, on an event loop: one open client
    for as long as the ``async with`` lasts."""

    def __init__(self) -> None:
        self._client: PrefectClient | None = None

    async def __aenter__(self) -> UpstreamLimits:
        self._client = get_client()
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.__aexit__(*exc_info)

    @property
    def client(self) -> PrefectClient:
        if self._client is None:
            raise RuntimeError("UpstreamLimits is used as an async context manager")
        return self._client

    async def upsert(self, name: str, limit: int) -> None:
        """Create the limit, or set its limit (read-then-write in Prefect: a create that lost
        a race raises ``ObjectAlreadyExists``)."""
        await self.client.upsert_global_concurrency_limit_by_name(name, limit)

    async def take(self, name: str, slots: int, lease_seconds: float) -> Granted | SlotsBusy:
        """Take ``slots`` of the limit under a new lease, if they are free now."""
        from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse

        try:
            response = await self.client.increment_concurrency_slots_with_lease(
                names=[name], slots=slots, mode="concurrency", lease_duration=lease_seconds)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 423:
                return SlotsBusy(exc.response.headers.get("retry-after"))
            raise
        granted = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
        return Granted(granted.lease_id, bool(granted.limits))

    async def renew(self, lease_id: UUID, lease_seconds: float) -> bool:
        """``False`` when the server no longer knows the lease (410)."""
        try:
            await self.client.renew_concurrency_lease(lease_id, lease_duration=lease_seconds)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 410:
                return False
            raise
        return True

    async def release(self, lease_id: UUID) -> None:
        await self.client.release_concurrency_slots_with_lease(lease_id)


class SyncLimits:
    """Global concurrency limits from a thread: read their count, give slots back."""

    def __init__(self, client: SyncPrefectClient) -> None:
        self.client = client

    @classmethod
    @contextlib.contextmanager
    def open(cls) -> Iterator[SyncLimits]:
        with get_client(sync_client=True) as client:
            yield cls(client)

    def active_slots(self, name: str) -> int | None:
        """The slots the limit counts as taken; ``None`` when it does not exist."""
        try:
            return int(self.client.read_global_concurrency_limit_by_name(name).active_slots)
        except ObjectNotFound:
            return None

    def release_lease(self, lease_id: UUID) -> None:
        """Free the lease's slots where the server still knows it (a no-op otherwise)."""
        self.client.release_concurrency_slots_with_lease(lease_id)

    def release_slots(self, name: str, slots: int) -> None:
        """Give back ``slots`` of the limit (a relative decrement)."""
        # occupancy_seconds only tunes the server's Retry-After hints; unknown here.
        self.client.release_concurrency_slots(names=[name], slots=slots,
                                              occupancy_seconds=float(slots))
