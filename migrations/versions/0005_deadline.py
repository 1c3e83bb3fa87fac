"""deadline per batch, and skipped item counters

Revision ID: 0005
Revises: 0007
Create Date: 2026-11-24
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("skipped", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("deadline_seconds", sa.Float))
        batch.add_column(sa.Column("deadline_at", sa.DateTime(timezone=True)))
    with op.batch_alter_table("batch_chunks") as batch:
        batch.add_column(sa.Column("skipped", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("batch_chunks") as batch:
        batch.drop_column("skipped")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("deadline_at")
        batch.drop_column("deadline_seconds")
        batch.drop_column("skipped")
