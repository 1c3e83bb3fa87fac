"""Batch-level idempotency: one ``POST /batches`` per ``Idempotency-Key`` and scope.

The first request with a key *claims* it — a row ``(scope, key)`` with the request's hash and
its batch's id — in the transaction that registers the batch: the key and the batch exist
together or not at all. A later request with the same key and the same body is answered from
that batch (no second batch, no second run); with a different body it is refused
(:class:`~batchops.errors.IdempotencyConflict`). A request that fails before its batch is
stored (invalid operations, a process killed mid-request) leaves the key free, so the
corrected or retried request may use it. Claims expire after the idempotency retention.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from batchops.errors import IdempotencyConflict
from batchops.store import Store
from batchops.tables import batches, metadata, utcnow

__all__ = [
    "BatchRequest",
    "BatchRequests",
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

    def find(self, scope: str, key: str, digest: str) -> BatchRequest | None:
        """The earlier request that claimed ``key`` with this body; ``None`` when the key is
        free (never used, or expired).

        Raises:
            IdempotencyConflict: the key was used with a different body.
        """
        with self.store.read() as conn:
            return self._earlier(conn, scope, key, digest)

    def claim(self, conn: Connection, scope: str, key: str, digest: str, batch_id: str,
              mode: str) -> BatchRequest | None:
        """Claim ``key`` for the batch ``batch_id`` in the caller's transaction, the one that
        registers the batch, so a key is never claimed without its batch (a process that dies
        mid-request leaves neither). ``None`` when this request got it; the earlier request
        when the key is taken with the same body.

        A concurrent first use of the key makes this insert wait for that transaction (or
        fail with ``IntegrityError`` once it committed: the caller starts again and finds it).

        Raises:
            IdempotencyConflict: the key was used with a different body.
        """
        t = batch_requests
        now = utcnow()
        # An expired claim, or one whose batch is not there (left before claims and batches
        # were stored together), frees the key.
        conn.execute(t.delete().where(t.c.scope == scope, t.c.key == key, sa.or_(
            t.c.expires_at <= now, ~sa.exists().where(batches.c.id == t.c.batch_id))))
        earlier = self._earlier(conn, scope, key, digest)
        if earlier is None:
            conn.execute(t.insert().values(
                scope=scope, key=key, request_hash=digest, batch_id=batch_id, mode=mode,
                created_at=now, expires_at=now + self.retention))
        return earlier

    @staticmethod
    def _earlier(conn: Connection, scope: str, key: str, digest: str) -> BatchRequest | None:
        t = batch_requests
        row = conn.execute(sa.select(t).where(
            t.c.scope == scope, t.c.key == key, t.c.expires_at > utcnow(),
            sa.exists().where(batches.c.id == t.c.batch_id))).mappings().first()
        if row is None:
            return None
        if row["request_hash"] != digest:
            raise IdempotencyConflict(
                f"Idempotency-Key {key!r} was already used with a different request body "
                f"(batch {row['batch_id']})")
        created = row["created_at"]
        if created.tzinfo is None:  # SQLite hands back naive datetimes, written as UTC
            created = created.replace(tzinfo=UTC)
        return BatchRequest(scope, key, row["request_hash"], row["batch_id"], row["mode"],
                            created)

    def purge_expired(self, limit: int = 50_000) -> int:
        """Delete claims past their expiry (at most ``limit``, in small transactions)."""
        t = batch_requests
        return self.store.purge.delete_in_batches(t, (t.c.scope, t.c.key),
                                                  t.c.expires_at <= utcnow(), limit)
