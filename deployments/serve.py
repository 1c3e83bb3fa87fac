"""Serve the batchops deployments from this process (a runner): ``batchops serve``."""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from flows.process_batch import process_batch

__all__ = ["serve_deployments"]


def serve_deployments() -> None:
    """Serve ``process-batch`` so runs started from the UI or the API execute here."""
    deployment: RunnerDeployment = process_batch.to_deployment(  # type: ignore[assignment]
        name="process-batch",
        description="Run a batch of operations (batch_id, or operations to register).",
        tags=["batchops"],
    )
    serve(deployment)
