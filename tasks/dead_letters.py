"""Tasks of the replay-dead-letters flow."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from batchops.dead_letters import DeadLetterReplay, ReplayedDeadLetters, replay_dead_letters
from batchops.runtime import get_runtime

__all__ = ["register_replay"]


@task(name="register-replay", cache_policy=NO_CACHE)
def register_replay(request: DeadLetterReplay, scope: str) -> ReplayedDeadLetters:
    """The selected dead letters as a new batch, marked replayed into it (not cached: a second
    call selects what is left to replay, not the same dead letters again)."""
    return replay_dead_letters(get_runtime(), scope, request)
