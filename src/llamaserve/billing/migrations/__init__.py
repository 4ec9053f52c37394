"""Alembic migrations of the account store, run by the server at start (`Store.migrate`).

New revision after changing models.py: `alembic -c src/llamaserve/billing/migrations/alembic.ini revision
--autogenerate -m "what changed"` against a database at the previous revision, then review the file.
tests/test_store.py checks that the migrations produce exactly the schema models.py declares.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection

HERE = Path(__file__).resolve().parent


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config(str(HERE / "alembic.ini"))
    config.set_main_option("script_location", str(HERE))
    config.attributes["connection"] = connection
    return config


def upgrade(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")
