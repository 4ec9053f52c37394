"""First start on an empty store: an account `default` with starter credits and one key, printed once and
written to a 0600 file in the data directory so the README's examples work right after set-up."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from llamaserve.billing.store import Store, StoreError

DEFAULT_ACCOUNT = "default"
DEFAULT_PLAN = "unlimited"  # the owner of a fresh install is not rate limited by their own server
KEY_FILE = "default.key"


async def open_store(url: str, data_dir: Path) -> Store:
    """The store at `url`, migrated to the current schema."""
    if url.startswith("sqlite") and not data_dir.exists():
        # Only its owner may read it: the database holds emails and password hashes, and the default key is there.
        data_dir.mkdir(mode=0o700, parents=True)
    store = Store(url)
    await store.migrate()
    if url.startswith("sqlite"):
        for path in data_dir.glob("*.db*"):  # the database, its WAL and shared-memory files
            path.chmod(0o600)
    return store


async def bootstrap(store: Store, data_dir: Path, starter_credits: int) -> str | None:
    """Create the default account and key if the store has no account yet; returns the new key (else None)."""
    if await store.list_accounts():
        return None
    try:
        await store.create_account(DEFAULT_ACCOUNT, DEFAULT_PLAN, starter_credits)
    except StoreError:  # another replica got there first
        return None
    key, _ = await store.create_key(DEFAULT_ACCOUNT, "created at first start")
    write_secret(data_dir / KEY_FILE, key + "\n")
    return key


def write_secret(path: Path, text: str) -> None:
    """Write a file only its owner can read (created 0600, never world-readable for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def stale_hold_age(request_timeout: float) -> dt.timedelta:
    """Holds older than this belong to no live request, on any replica."""
    return dt.timedelta(seconds=2 * request_timeout + 60)
