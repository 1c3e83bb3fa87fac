"""``replay_dead_letters``: run dead letters again as a new batch, from the Prefect UI."""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger

from batchops.dead_letters import DeadLetterFilter, DeadLetterReplay
from batchops.schemas import BatchSummary
from flows.process_batch import process_batch
from tasks.dead_letters import register_replay

__all__ = ["replay_dead_letters"]


@flow(name="replay-dead-letters", log_prints=True)
def replay_dead_letters(
    ids: list[int] | None = None,
    filter: DeadLetterFilter | None = None,
    all: bool = False,
    include_replayed: bool = False,
    limit: int | None = None,
    scope: str = "default",
) -> BatchSummary:
    """Replay dead letters as a new batch: by ``ids``, by a ``filter``, or ``all``.

    Args:
        ids: these dead letters.
        filter: or those matching every field given (batch_id, target, resource, code,
            status). An empty selection is refused, never read as "everything".
        all: or every dead letter of the scope not replayed yet.
        include_replayed: also dead letters replayed before.
        limit: at most this many, oldest first.
        scope: the API key's scope the dead letters belong to.

    The new batch runs as a ``process-batch`` subflow; its dead letters are marked replayed
    with its id, so a second run of this flow does not replay them again.
    """
    logger = get_run_logger()
    request = DeadLetterReplay(ids=ids, filter=filter, all=all,
                               include_replayed=include_replayed, limit=limit)
    replay = register_replay(request, scope)
    if replay.batch_id is None:
        logger.info("no dead letters to replay")
        return BatchSummary(total=0, succeeded=0, failed=0)
    logger.info("replaying %d dead letter(s) as batch %s", replay.replayed, replay.batch_id)
    return process_batch(batch_id=replay.batch_id)
