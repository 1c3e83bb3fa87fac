"""``tasks/`` holds Prefect tasks only: the steps they run live in the core (``batchops``)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from prefect import Task

import tasks

# Not tasks, but the options of tasks: a cache key, a cache policy, a retry condition and what
# it reads from a failed state. Prefect calls them about a task run; they hold no step.
TASK_OPTIONS = {
    "tasks.chunks": {"chunk_cache_key", "chunk_cache_policy", "retry_transient_failures",
                     "state_exception"},
    "tasks.callbacks": {"retry_delivery_failures"},
}


def _public_functions(module: object) -> dict[str, object]:
    """Names defined in the module itself (not imported), public, callable."""
    name = getattr(module, "__name__", "")
    return {attr: value for attr, value in vars(module).items()
            if not attr.startswith("_") and callable(value) and not inspect.isclass(value)
            and getattr(value, "__module__", None) == name}


def test_every_public_function_in_tasks_is_a_prefect_task() -> None:
    modules = [importlib.import_module(f"tasks.{m.name}")
               for m in pkgutil.iter_modules(tasks.__path__)]
    assert modules
    not_tasks = {}
    found = set()
    for module in modules:
        found |= {f"{module.__name__}.{name}" for name in _public_functions(module)}
        allowed = TASK_OPTIONS.get(module.__name__, set())
        plain = sorted(name for name, value in _public_functions(module).items()
                       if not isinstance(value, Task) and name not in allowed)
        if plain:
            not_tasks[module.__name__] = plain
    assert {"tasks.chunks.run_chunk", "tasks.recovery.restart_stale_batches",
            "tasks.chunks.chunk_cache_key"} <= found  # the check sees tasks and plain ones
    assert not_tasks == {}, f"plain functions in tasks/ (move them to batchops/): {not_tasks}"
