"""A what-if variant of the batchops API for ``bench.api`` (the bench's process only).

Sync batches run their flow with Prefect's flow heartbeats off
(``PREFECT_FLOWS_HEARTBEAT_FREQUENCY=None`` for that run), so the flow's end does not wait
for the heartbeat thread, which sleeps in 1-second steps, to be joined. Nothing else differs:
this measures what that one change to ``api/runs.py`` would save.

    uvicorn --factory bench._api_whatif:create_app
"""

from __future__ import annotations

from fastapi import FastAPI
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

import api.runs
from api.main import create_app as _create_app

__all__ = ["create_app"]

_run_flow = api.runs._run_flow


def _run_flow_without_heartbeats(batch_id: str) -> None:
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        _run_flow(batch_id)


def create_app() -> FastAPI:
    api.runs._run_flow = _run_flow_without_heartbeats  # start_in_process looks it up per call
    return _create_app()
