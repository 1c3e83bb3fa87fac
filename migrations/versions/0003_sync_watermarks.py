"""sync_watermarks: per bulk sync, its watermark and the batch it has in flight

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sync_watermarks",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("watermark", sa.JSON),
        sa.Column("pending_batch_id", sa.String(64)),
        sa.Column("pending_watermark", sa.JSON),
        sa.Column("version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("rows_synced", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("synced_at", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sync_watermarks")
