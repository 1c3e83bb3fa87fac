"""The process's runtime: store, resources, router and targets, built once from settings."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from batchops.engine import shared_engine
from batchops.handlers import load_handler_modules, registry
from batchops.lifecycle import BatchLifecycle
from batchops.limit_leases import LimitLeases
from batchops.progress import RedisProgress
from batchops.resources import Resource, build_resources
from batchops.routing import HTTP_TARGET, PYTHON_TARGET, SQL_TARGET, Router
from batchops.settings import Settings, get_settings
from batchops.store import Store
from batchops.targets import Target
from batchops.targets.http import HttpTarget
from batchops.targets.python import PythonTarget
from batchops.targets.sql import SqlTarget

__all__ = ["Runtime", "get_runtime", "reset_runtime"]


@dataclass
class Runtime:
    settings: Settings
    store: Store
    resources: dict[str, Resource]
    router: Router
    targets: dict[str, Target] = field(default_factory=dict)
    # The only writer of the batches' status (and the finish listeners of this process).
    lifecycle: BatchLifecycle = field(init=False)

    def __post_init__(self) -> None:
        self.lifecycle = BatchLifecycle(self.store)

    def prepare(self) -> None:
        """Migrate the store and create the declared tables marked ``create``."""
        declared = [r for r in self.resources.values() if r.spec.create]
        self.store.migrate([r.table for r in declared if r.database_url in (None, self.store.url)])
        for res in declared:
            if res.database_url not in (None, self.store.url):
                res.table.create(shared_engine(res.database_url), checkfirst=True)


_lock = threading.Lock()
_runtime: Runtime | None = None


def build_runtime(settings: Settings) -> Runtime:
    load_handler_modules(settings.handler_modules)
    resources = build_resources(settings.resources, settings.database_url)
    router = Router(resources, registry.all(), settings.upstreams)
    progress = RedisProgress(settings.redis_url) if settings.redis_url else None
    store = Store(settings.database_url, progress=progress)
    runtime = Runtime(settings, store, resources, router)
    runtime.targets = {
        SQL_TARGET: SqlTarget(resources, settings.database_url),
        PYTHON_TARGET: PythonTarget(router),
        HTTP_TARGET: HttpTarget(settings.upstreams, LimitLeases.from_settings(store, settings),
                              settings.redis_url),
    }
    runtime.prepare()
    return runtime


def get_runtime() -> Runtime:
    """The runtime for the current settings, built (and the store migrated) on first use."""
    global _runtime
    with _lock:
        settings = get_settings()
        if _runtime is None or _runtime.settings is not settings:
            _runtime = build_runtime(settings)
        return _runtime


def reset_runtime() -> None:
    """Forget the runtime and the settings (tests that change settings call this)."""
    global _runtime
    with _lock:
        if _runtime is not None:
            http = _runtime.targets.get(HTTP_TARGET)
            if isinstance(http, HttpTarget):
                http.close()
        _runtime = None
    get_settings.cache_clear()
