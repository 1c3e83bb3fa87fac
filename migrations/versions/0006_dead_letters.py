"""dead_letters: items that ran out of retries, with their request and every attempt's error

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("scope", sa.String(128), nullable=False),
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("item_index", sa.Integer, nullable=False),
        sa.Column("item_id", sa.String(200)),
        sa.Column("target", sa.String(32), nullable=False),
        sa.Column("resource", sa.String(128)),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("body", sa.JSON),
        sa.Column("headers", sa.JSON),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("code", sa.String(128), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("attempt_errors", sa.JSON, nullable=False),
        sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replayed_batch_id", sa.String(64)),
        sa.Column("replayed_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_dead_letters_batch", "dead_letters",
                    ["scope", "batch_id", "item_index"])
    op.create_index("ix_dead_letters_target_code", "dead_letters", ["scope", "target", "code"])
    op.create_index("ix_dead_letters_replayed_batch", "dead_letters", ["replayed_batch_id"])


def downgrade() -> None:
    op.drop_table("dead_letters")
