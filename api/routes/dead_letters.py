"""``/dead-letters``: items that ran out of retries — list them, read one, replay them.

A replay registers the selected dead letters as a new batch (their first idempotency keys,
so an upstream that honoured them applies nothing twice) and starts it as a flow run of the
deployment, like an async ``POST /batches``: ``202`` with the new batch's status URL.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api.body import require_json
from api.deps import QuotaDep, RunnerDep, RuntimeDep, ScopeDep
from api.responses import error_responses
from batchops.dead_letters import (
    MAX_ID,
    TEXT_PATTERN,
    DeadLetter,
    DeadLetterFilter,
    DeadLetterReplay,
    DeadLetters,
    replay_dead_letters,
)
from batchops.schemas import BatchState

__all__ = ["router"]

router = APIRouter(tags=["dead letters"])


class DeadLetterPage(BaseModel):
    """Dead letters, oldest first; the next page starts ``after=next_after``."""

    items: list[DeadLetter]
    next_after: int | None


class DeadLettersReplayed(BaseModel):
    """``202``: the new batch runs on (follow ``status_url``); ``200``: nothing to replay."""

    batch_id: str | None
    status: BatchState | None = None
    status_url: str | None = None
    replayed: int


def _text(max_length: int, description: str) -> Any:
    return Query(max_length=max_length, pattern=TEXT_PATTERN, description=description)


@router.get("/dead-letters", name="list_dead_letters", response_model=DeadLetterPage,
            summary="Items that ran out of retries", responses=error_responses(401, 422))
def list_dead_letters(
    runtime: RuntimeDep,
    scope: ScopeDep,
    batch_id: Annotated[str | None, _text(64, "the batch they failed in")] = None,
    target: Annotated[str | None, _text(32, "http, sql or python")] = None,
    resource: Annotated[str | None, _text(128, "the upstream (or resource)")] = None,
    code: Annotated[str | None, _text(128, "the last attempt's error code")] = None,
    status: Annotated[int | None, Query(ge=0, le=999,
                                        description="the last attempt's status")] = None,
    replayed: Annotated[bool | None, Query(description="replayed already, or not")] = None,
    replayed_batch_id: Annotated[str | None, _text(64, "replayed into this batch")] = None,
    after: Annotated[int, Query(ge=0, le=MAX_ID, description="ids greater than this")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
) -> DeadLetterPage:
    """Every filter given must match. Each dead letter has its full request, every attempt's
    error with its time, and ``replayed_batch_id`` once it was replayed."""
    flt = DeadLetterFilter(batch_id=batch_id, target=target, resource=resource, code=code,
                           status=status)
    items = DeadLetters(runtime.store).find(scope, flt, replayed=replayed,
                                            replayed_batch_id=replayed_batch_id, after=after,
                                            limit=limit)
    return DeadLetterPage(items=items, next_after=items[-1].id if len(items) == limit else None)


@router.get("/dead-letters/{dead_letter_id}", name="get_dead_letter", response_model=DeadLetter,
            summary="One dead letter", responses=error_responses(401, 404, 422))
def get_dead_letter(
    dead_letter_id: Annotated[int, Path(ge=1, le=MAX_ID)], runtime: RuntimeDep, scope: ScopeDep,
) -> DeadLetter:
    return DeadLetters(runtime.store).get(scope, dead_letter_id)


@router.post(
    "/dead-letters/replay",
    name="replay_dead_letters",
    status_code=202,
    response_model=DeadLettersReplayed,
    summary="Run dead letters again, as a new batch",
    dependencies=[Depends(require_json)],  # 415 for a body that is not declared JSON
    responses={200: {"model": DeadLettersReplayed, "description": "nothing matched"},
               **error_responses(401, 404, 409, 413, 415, 422, 429, 503)},
)
async def replay(request: Request, body: DeadLetterReplay, runtime: RuntimeDep, scope: ScopeDep,
                 quota: QuotaDep, runner: RunnerDep) -> JSONResponse:
    """Select dead letters by ``ids``, by a ``filter``, or ``all: true`` — an empty selection
    is refused (422 ``empty_replay_filter``), never read as "everything". Dead letters
    replayed before are left out (by id: 409 ``dead_letter_replayed``) unless
    ``include_replayed`` is set; unknown ids answer 404 ``dead_letter_not_found``.

    The selected dead letters become a new batch, marked replayed with its id, and it starts
    as a flow run: ``202`` with ``batch_id`` and ``status_url``. When nothing matches:
    ``200`` with ``replayed: 0`` and no batch.
    """
    outcome = await asyncio.to_thread(replay_dead_letters, runtime, scope, body)
    if outcome.batch_id is None:
        return JSONResponse({"batch_id": None, "status": None, "status_url": None,
                             "replayed": 0})
    batch_id = outcome.batch_id
    charge: str | None = None
    try:
        charge = await quota.charge(scope, outcome.replayed)
        await runner.start_deployment(runtime, batch_id)
    except BaseException:
        # Nothing of the batch ran: the dead letters are replayable again, the batch is not.
        await quota.refund(charge, outcome.replayed)
        await asyncio.to_thread(DeadLetters(runtime.store).release, scope, batch_id)
        await asyncio.to_thread(runtime.lifecycle.cancel, batch_id)
        raise
    status_url = str(request.url_for("get_batch_status", batch_id=batch_id))
    return JSONResponse(
        {"batch_id": batch_id, "status": BatchState.QUEUED.value, "status_url": status_url,
         "replayed": outcome.replayed},
        status_code=202, headers={"Location": status_url})
