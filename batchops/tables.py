"""The store's tables (SQLAlchemy Core) on one metadata, which Alembic's migrations follow.

Tables of other repositories (batch requests, callbacks, dead letters, sync watermarks) are
declared in their own modules on the same :data:`metadata`. Timestamps are UTC: written with
:func:`utcnow`, read back through :func:`aware` (SQLite hands back naive datetimes).
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

__all__ = ["aware", "batch_chunks", "batches", "idempotency_records", "item_checkpoints",
           "item_claims", "limit_leases", "limit_reconciliations", "metadata", "utcnow"]

metadata = sa.MetaData()

batches = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("scope", sa.String(128), nullable=False, server_default="default"),
    sa.Column("source", sa.String(32), nullable=False, server_default="api"),
    sa.Column("total", sa.Integer, nullable=False, server_default="0"),
    sa.Column("completed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("succeeded", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("skipped", sa.Integer, nullable=False, server_default="0"),
    sa.Column("concurrency", sa.Integer, nullable=False),
    sa.Column("chunk_size", sa.Integer, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
    sa.Column("flow_run_id", sa.String(64)),
    sa.Column("error", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True)),
    sa.Column("recoveries", sa.Integer, nullable=False, server_default="0"),
    # No item starts after deadline_at; a retry moves it deadline_seconds past the retry.
    sa.Column("deadline_seconds", sa.Float),
    sa.Column("deadline_at", sa.DateTime(timezone=True)),
)
sa.Index("ix_batches_status_heartbeat", batches.c.status, batches.c.heartbeat_at)

batch_chunks = sa.Table(
    "batch_chunks",
    metadata,
    sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("chunk_index", sa.Integer, primary_key=True),
    sa.Column("start", sa.Integer, nullable=False),
    sa.Column("end", sa.Integer, nullable=False),
    sa.Column("cache_token", sa.String(64), nullable=False),
    sa.Column("depends_on", sa.JSON, nullable=False),
    sa.Column("operations", sa.Text, nullable=False),
    sa.Column("done", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("succeeded", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("skipped", sa.Integer, nullable=False, server_default="0"),
    sa.Column("results", sa.Text),  # JSON array of ItemResult, in index order, once done
    sa.Column("completed_at", sa.DateTime(timezone=True)),
)

idempotency_records = sa.Table(
    "idempotency_records",
    metadata,
    sa.Column("scope", sa.String(128), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("payload_hash", sa.String(64), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("result", sa.JSON),
    sa.Column("batch_id", sa.String(64), nullable=False),
    sa.Column("item_index", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
)
sa.Index("ix_idempotency_expires", idempotency_records.c.expires_at)

# An idempotency key being executed right now, and by which batch: a second batch with the
# same key waits for the first's result instead of sending it again.
item_claims = sa.Table(
    "item_claims",
    metadata,
    sa.Column("scope", sa.String(128), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("batch_id", sa.String(64), nullable=False),
    sa.Column("item_index", sa.Integer, nullable=False),
    sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
)

# Prefect global-concurrency-limit leases a batch's run holds for its upstream requests, with
# their slots and the last time their holder said it is alive: the slots of a limit that no
# live lease accounts for are given back (batchops.limit_leases), and the reaper releases the
# leases of a dead run before the re-run.
limit_leases = sa.Table(
    "limit_leases",
    metadata,
    sa.Column("lease_id", sa.String(36), primary_key=True),
    sa.Column("batch_id", sa.String(64), nullable=False, index=True),
    sa.Column("limit_name", sa.String(255), nullable=False),
    sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("slots", sa.Integer, nullable=False, server_default="0"),
    sa.Column("renewed_at", sa.DateTime(timezone=True)),
)

# Who is reconciling a limit's slots with the leases, until when: one process at a time, or two
# would give back the same slots twice.
limit_reconciliations = sa.Table(
    "limit_reconciliations",
    metadata,
    sa.Column("limit_name", sa.String(255), primary_key=True),
    sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=False),
)

# Each item's outcome as soon as it is known (before its chunk is recorded): a run that
# resumes a crashed chunk answers these items from here instead of executing them again.
item_checkpoints = sa.Table(
    "item_checkpoints",
    metadata,
    sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("generation", sa.Integer, primary_key=True),
    sa.Column("item_index", sa.Integer, primary_key=True),
    sa.Column("result", sa.Text, nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; they were written as UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value
