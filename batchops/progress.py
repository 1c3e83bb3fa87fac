"""Batch progress in Redis: every process's status reads answer from one shared snapshot.

With ``BATCHOPS_REDIS_URL`` set, the store publishes a batch's status (counters, state,
timestamps) to Redis after each change it commits — a chunk recorded, the batch started,
finished, cancelled, reopened — and status reads (the API's ``GET /batches/{id}/status``,
polled by many clients through many API replicas) are answered from Redis without touching
PostgreSQL. The store stays the source of truth: a snapshot missing from Redis, or Redis not
answering, means the read goes to the store, and a failed publish is only logged.
"""

from __future__ import annotations

import logging
from typing import Any

from batchops.schemas import BatchStatus

__all__ = ["RedisProgress"]

logger = logging.getLogger("batchops.progress")

_TTL_SECONDS = 7 * 24 * 3600  # snapshots of finished batches go away on their own
_TIMEOUT_SECONDS = 0.5  # Redis down must not hold up a status read for long


class RedisProgress:
    """Status snapshots under ``batchops:progress:{batch_id}`` (JSON, with an expiry)."""

    def __init__(self, url: str) -> None:
        import redis

        self.url = url
        self._client: Any = redis.Redis.from_url(
            url, socket_timeout=_TIMEOUT_SECONDS, socket_connect_timeout=_TIMEOUT_SECONDS)
        self._errors = (redis.RedisError, OSError)

    @staticmethod
    def _key(batch_id: str) -> str:
        return f"batchops:progress:{batch_id}"

    def publish(self, status: BatchStatus) -> None:
        """Store the snapshot; a Redis failure is logged, never raised (the store has it)."""
        body = status.model_dump_json(exclude={"ui_url"})
        try:
            self._client.set(self._key(status.batch_id), body, ex=_TTL_SECONDS)
        except self._errors as exc:
            logger.warning("progress of batch %s not published to Redis: %s", status.batch_id,
                           exc)

    def read(self, batch_id: str) -> BatchStatus | None:
        """The snapshot, or ``None`` when there is none or Redis does not answer."""
        try:
            raw = self._client.get(self._key(batch_id))
        except self._errors as exc:
            logger.warning("progress of batch %s read from the store: Redis: %s", batch_id, exc)
            return None
        return None if raw is None else BatchStatus.model_validate_json(raw)

    def ping(self) -> None:
        """Raise when Redis does not answer (readiness checks)."""
        self._client.ping()

    def close(self) -> None:
        self._client.close()
