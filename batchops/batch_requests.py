"""Batch-level idempotency: one ``POST /batches`` per ``Idempotency-Key`` and scope.

The first request with a key *claims* it — a row ``(scope, key)`` with the request's hash and
the id its batch will have — before the batch is registered. A later request with the same
key and the same body is answered from that batch (no second batch, no second run); with a
different body it is refused (:class:`~batchops.errors.IdempotencyConflict`). If the first
request fails before its batch exists (invalid operations), the claim is released, so the
corrected request may use the key. Claims expire after the idempotency retention.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from batchops.errors import IdempotencyConflict
from batchops.store import Store, metadata, utcnow

__all__ = [
    "BatchRequest",
    "BatchRequests",
    "IdempotencyKeyInFlight",
    "batch_requests",
    "request_hash",
]

batch_requests = sa.Table(
    "batch_requests",
    metadata,
    sa.Column("scope", sa.String(128), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("batch_id", sa.String(64), nullable=False),
    sa.Column("mode", sa.String(8), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
)


class IdempotencyKeyInFlight(IdempotencyConflict):
    """The key's first request is still registering its batch (409); retry in a moment."""

    code = "idempotency_key_in_flight"


def request_hash(body: Any) -> str:
    """Fingerprint of a request body, independent of key order and whitespace."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class BatchRequest:
    """A claimed key: the batch it made and how that request was answered (sync or async)."""

    scope: str
    key: str
    request_hash: str
    batch_id: str
    mode: str
    created_at: datetime


class BatchRequests:
    """Claims and releases batch-level idempotency keys in the store's database."""

    def __init__(self, store: Store, retention: timedelta) -> None:
        self.store = store
        self.retention = retention

    def claim(self, scope: str, key: str, digest: str, batch_id: str,
              mode: str) -> BatchRequest | None:
        """Claim ``key`` for a new batch ``batch_id``; ``None`` when this request got it.

        Returns the earlier request when the key is taken with the same body.

        Raises:
            IdempotencyConflict: the key was used with a different body.
        """
        t = batch_requests
        where = (t.c.scope == scope) & (t.c.key == key)
        for _ in range(2):  # a lost insert race reads the winner's row
            now = utcnow()
            try:
                with self.store.engine.begin() as conn:
                    conn.execute(t.delete().where(where, t.c.expires_at <= now))
                    row = conn.execute(sa.select(t).where(where)).mappings().first()
                    if row is None:
                        conn.execute(t.insert().values(
                            scope=scope, key=key, request_hash=digest, batch_id=batch_id,
                            mode=mode, created_at=now, expires_at=now + self.retention))
                        return None
            except sa.exc.IntegrityError:
                continue
            if row["request_hash"] != digest:
                raise IdempotencyConflict(
                    f"Idempotency-Key {key!r} was already used with a different request body "
                    f"(batch {row['batch_id']})")
            created = row["created_at"]
            if created.tzinfo is None:  # SQLite hands back naive datetimes, written as UTC
                created = created.replace(tzinfo=UTC)
            return BatchRequest(scope, key, row["request_hash"], row["batch_id"], row["mode"],
                                created)
        raise IdempotencyConflict(f"Idempotency-Key {key!r} is being claimed by another request")

    def release(self, scope: str, key: str, batch_id: str) -> None:
        """Forget a claim whose batch was never registered (the request failed)."""
        t = batch_requests
        with self.store.engine.begin() as conn:
            conn.execute(t.delete().where(t.c.scope == scope, t.c.key == key,
                                          t.c.batch_id == batch_id))

    def purge_expired(self, limit: int = 50_000) -> int:
        """Delete claims past their expiry (at most ``limit``, in small transactions)."""
        t = batch_requests
        return self.store.delete_in_batches(t, (t.c.scope, t.c.key), t.c.expires_at <= utcnow(),
                                            limit)
