"""The task of registering operations given to the flow directly (UI, schedule); the other
steps of a batch's flow run are plain steps (:mod:`batchops.batch_steps`)."""

from __future__ import annotations

from prefect import task

from batchops.registration import register_batch
from batchops.runtime import get_runtime
from batchops.schemas import Operation

__all__ = ["register_operations"]


@task(name="register-batch")
def register_operations(operations: list[Operation], concurrency: int | None,
                        source: str, deadline_seconds: float | None = None) -> str:
    """Validate and store operations given to the flow directly (UI, schedule)."""
    runtime = get_runtime()
    batch_id, _ = register_batch(runtime, operations, concurrency=concurrency,
                                 max_operations=runtime.settings.api.max_import_rows, source=source,
                                 deadline_seconds=deadline_seconds)
    return batch_id
