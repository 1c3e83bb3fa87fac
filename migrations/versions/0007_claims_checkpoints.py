"""claims and checkpoints: in-flight idempotency keys, per-item checkpoints, heartbeats

Revision ID: 0007
Revises: 0004
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "item_claims",
        sa.Column("scope", sa.String(128), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("item_index", sa.Integer, nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "item_checkpoints",
        sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("generation", sa.Integer, primary_key=True),
        sa.Column("item_index", sa.Integer, primary_key=True),
        sa.Column("result", sa.Text, nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("recoveries", sa.Integer, nullable=False,
                                   server_default="0"))
    op.create_index("ix_batches_status_heartbeat", "batches", ["status", "heartbeat_at"])


def downgrade() -> None:
    op.drop_index("ix_batches_status_heartbeat", table_name="batches")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("recoveries")
        batch.drop_column("heartbeat_at")
    op.drop_table("item_checkpoints")
    op.drop_table("item_claims")
