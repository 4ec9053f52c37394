"""Alembic environment: runs on the connection the server hands over, or on a URL for command-line use."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from llamaserve.billing.models import Base

config = context.config
connection = config.attributes.get("connection")

if connection is None:  # the alembic command line
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    with create_engine(url or "").connect() as conn:
        context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
