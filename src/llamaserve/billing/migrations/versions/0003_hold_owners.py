"""Hold owners: each hold names the gateway process that took it, and running processes beat in `gateways`, so
the holds of a killed process are released by the others (or its successor) within seconds, not at some later
start.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("holds", sa.Column("owner", sa.String(32), nullable=True))
    op.create_table(
        "gateways",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("gateways")
    with op.batch_alter_table("holds") as batch:
        batch.drop_column("owner")
