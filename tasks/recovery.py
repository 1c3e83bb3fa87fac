"""Tasks of the reaper: its steps as task runs of the reaper's flow run, each calling down to
:mod:`batchops.recovery` (the algorithm) with the run's logger."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.logging import get_logger, get_run_logger

from batchops import recovery
from batchops.runtime import get_runtime

__all__ = ["purge_expired", "reconcile_limit_slots", "restart_stale_batches"]


def _logger() -> Any:
    """The run's logger in a flow run (the UI shows it), else ``batchops.recovery``."""
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("batchops.recovery")


@task(name="restart-stale-batches", cache_policy=NO_CACHE)
def restart_stale_batches(stale_after_seconds: float | None = None,
                          flow_run_id: str | None = None) -> list[str]:
    """Batches whose run died get a new ``process-batch`` flow run
    (:func:`batchops.recovery.restart_stale_batches`); the ids of the batches restarted."""
    return recovery.restart_stale_batches(get_runtime(), stale_after_seconds, flow_run_id,
                                          logger=_logger())


@task(name="reconcile-limit-slots", cache_policy=NO_CACHE)
def reconcile_limit_slots() -> dict[str, int]:
    """Give back the upstream-limit slots no live run holds
    (:func:`batchops.recovery.reconcile_limit_slots`): slots given back per limit."""
    return recovery.reconcile_limit_slots(get_runtime())


@task(name="purge-expired", cache_policy=NO_CACHE)
def purge_expired(stale_after_seconds: float | None = None) -> dict[str, int]:
    """Delete what has outlived its use (:func:`batchops.recovery.purge_expired`); how many
    rows of each went."""
    return recovery.purge_expired(get_runtime(), stale_after_seconds, logger=_logger())
