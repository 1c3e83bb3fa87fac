"""limit_leases: slots and renewals of each lease; limit_reconciliations: one reconciler a limit

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("limit_leases") as batch:
        batch.add_column(sa.Column("slots", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("renewed_at", sa.DateTime(timezone=True)))
    op.create_table(
        "limit_reconciliations",
        sa.Column("limit_name", sa.String(255), primary_key=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("limit_reconciliations")
    with op.batch_alter_table("limit_leases") as batch:
        batch.drop_column("renewed_at")
        batch.drop_column("slots")
