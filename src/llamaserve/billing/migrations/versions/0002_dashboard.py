"""The dashboard: account logins (email, argon2 password hash, admin flag), login sessions, expiring keys.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("email", sa.String(254), nullable=True))
    op.add_column("accounts", sa.Column("password_hash", sa.String(255), nullable=True))
    # Existing rows need a value: nobody was an admin before this revision.
    op.add_column("accounts", sa.Column("is_admin", sa.Boolean(), nullable=False, server_default=sa.false()))
    # A unique index rather than a constraint: SQLite cannot add a constraint to an existing table.
    op.create_index("ix_accounts_email", "accounts", ["email"], unique=True)
    op.add_column("api_keys", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("account_id", sa.Integer(), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("playground_key_id", sa.Integer(), sa.ForeignKey("api_keys.id"), nullable=True),
    )
    op.create_index("ix_sessions_account_id", "sessions", ["account_id"])


def downgrade() -> None:
    op.drop_index("ix_sessions_account_id", "sessions")
    op.drop_table("sessions")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("expires_at")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_index("ix_accounts_email")
        for column in ("is_admin", "password_hash", "email"):
            batch.drop_column(column)
