"""The account store, on both backends: SQLite (a fresh file per test) and PostgreSQL (a fresh database per test on
the server at LLAMASERVE_TEST_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/test; skipped when
unreachable unless CI is set, where that is a failure).

Each test is a coroutine given a freshly migrated Store (the `store` fixture), run by anyio's pytest plugin."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, select, text, update
from sqlalchemy.engine import make_url

from llamaserve.billing.migrations import alembic_config
from llamaserve.billing.models import Account, Base, Gateway, Hold, LedgerEntry, UsageRecord
from llamaserve.billing.store import AuthError, BalanceError, Caller, Store, StoreError, Usage
from tests.conftest import postgres_database

KEY_FORMAT = re.compile(r"ls-([a-z0-9]{10})_([A-Za-z0-9]{32})")
T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


# --- backends -------------------------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, empty database of the parametrized backend."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
        return
    with postgres_database() as database:
        yield database


@pytest.fixture
async def store(url: str) -> AsyncIterator[Store]:
    """A Store at `url`, migrated, closed after the test (tests run under anyio's pytest plugin)."""
    store = Store(url)
    try:
        await store.migrate()
        yield store
    finally:
        await store.close()


# --- helpers --------------------------------------------------------------------------------------------------
async def new_account(store: Store, credits: int = 0, name: str = "acme") -> Account:
    return await store.create_account(name, "free", credits)


async def balance(store: Store, account_id: int) -> int:
    """The account's balance, after checking that it equals the sum of its ledger."""
    value = (await store.account_by_id(account_id)).balance
    assert await store.ledger_sum(account_id) == value
    return value


def usage(request_id: str, model: str = "m", completion_tokens: int = 5) -> Usage:
    return Usage(request_id, model, prompt_tokens=3, completion_tokens=completion_tokens, status="ok", latency_ms=7)


async def backdate(store: Store, table: type[Hold] | type[UsageRecord], row_id: int, when: dt.datetime) -> None:
    """Set a row's created_at directly in the database."""
    async with store.engine.begin() as conn:
        await conn.execute(update(table).where(table.id == row_id).values(created_at=when))


async def usage_records(store: Store, account_id: int) -> dict[str, UsageRecord]:
    return {r.request_id: r for r in await store.usage(account_id)}


async def all_rows(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, as raw values."""
    async with store.engine.connect() as conn:
        return {
            table.name: [tuple(row) for row in await conn.execute(text(f'SELECT * FROM "{table.name}"'))]
            for table in Base.metadata.sorted_tables
        }


def sqlite_bytes(url: str) -> bytes:
    """The SQLite database file and its -wal and -shm files, as present."""
    path = Path(make_url(url).database or "")
    files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
    return b"".join(f.read_bytes() for f in files if f.exists())


# --- schema ---------------------------------------------------------------------------------------------------
def schema_diff(conn: Connection) -> list[Any]:
    return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


@pytest.mark.anyio
async def test_migrations_produce_the_models_schema(store: Store) -> None:
    async with store.engine.connect() as conn:
        assert await conn.run_sync(schema_diff) == []


@pytest.mark.anyio
async def test_migrate_twice_is_harmless(store: Store) -> None:
    account = await new_account(store, credits=100)
    await store.migrate()
    async with store.engine.connect() as conn:
        assert await conn.run_sync(schema_diff) == []
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert await conn.run_sync(current_revision) == head
    assert await balance(store, account.id) == 100


# --- accounts and keys ----------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_duplicate_account_name_is_refused(store: Store) -> None:
    await new_account(store, credits=5)
    with pytest.raises(StoreError, match="already exists"):
        await new_account(store, credits=7)
    assert [(a.name, a.balance) for a in await store.list_accounts()] == [("acme", 5)]


@pytest.mark.anyio
async def test_unknown_account_is_a_store_error(store: Store) -> None:
    for call in (
        store.account("nobody"),
        store.account_by_id(12345),
        store.update_account("nobody", status="suspended"),
        store.create_key("nobody"),
        store.grant("nobody", 10),
    ):
        with pytest.raises(StoreError):
            await call


@pytest.mark.anyio
async def test_create_key_returns_the_full_key_and_stores_its_hash(store: Store) -> None:
    await new_account(store)
    full, row = await store.create_key("acme", "laptop")
    match = KEY_FORMAT.fullmatch(full)
    assert match is not None, full
    prefix, secret = match.groups()
    stored = await store.key(prefix)
    assert (stored.id, stored.name, stored.enabled, stored.revoked) == (row.id, "laptop", True, False)
    assert stored.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    other, _ = await store.create_key("acme")
    assert other != full and other[:13] != full[:13]


@pytest.mark.anyio
async def test_authenticate_returns_the_caller(store: Store) -> None:
    account = await store.create_account("acme", "pro")
    full, key = await store.create_key("acme")
    caller = await store.authenticate(full)
    assert caller == Caller(key.id, key.prefix, account.id, "acme", "pro", None)


@pytest.mark.anyio
async def test_authenticate_records_last_use(store: Store) -> None:
    await new_account(store)
    full, key = await store.create_key("acme")
    assert (await store.key(key.prefix)).last_used_at is None
    await store.authenticate(full)
    first = (await store.key(key.prefix)).last_used_at
    assert first is not None
    await store.authenticate(full)  # within LAST_USED_RESOLUTION: no write
    assert (await store.key(key.prefix)).last_used_at == first


async def auth_error(store: Store, presented: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        await store.authenticate(presented)
    return info.value


@pytest.mark.anyio
async def test_wrong_secret_is_401(store: Store) -> None:
    await new_account(store)
    full, _ = await store.create_key("acme")
    wrong = full[:-1] + ("a" if full[-1] != "a" else "b")
    error = await auth_error(store, wrong)
    assert (error.status, error.code) == (401, "invalid_api_key")


@pytest.mark.anyio
async def test_malformed_or_unknown_key_is_401(store: Store) -> None:
    await new_account(store)
    full, _ = await store.create_key("acme")
    unknown = "ls-" + ("a" if full[3] != "a" else "b") + full[4:]
    for presented in ("", "sk-abc", full[:-1], full + "x", full.upper(), f" {full}", unknown):
        error = await auth_error(store, presented)
        assert (error.status, error.code) == (401, "invalid_api_key"), presented


@pytest.mark.anyio
async def test_disabled_key_is_403_until_enabled(store: Store) -> None:
    await new_account(store)
    full, key = await store.create_key("acme")
    assert (await store.set_key(key.prefix, enabled=False)).enabled is False
    error = await auth_error(store, full)
    assert (error.status, error.code) == (403, "api_key_disabled")
    await store.set_key(key.prefix, enabled=True)
    assert (await store.authenticate(full)).key_id == key.id


@pytest.mark.anyio
async def test_revoked_key_is_401(store: Store) -> None:
    await new_account(store)
    full, key = await store.create_key("acme")
    await store.set_key(key.prefix, revoked=True)
    error = await auth_error(store, full)
    assert (error.status, error.code) == (401, "invalid_api_key")


@pytest.mark.anyio
async def test_suspended_account_is_403_until_reactivated(store: Store) -> None:
    await new_account(store)
    full, _ = await store.create_key("acme")
    assert (await store.update_account("acme", status="suspended")).status == "suspended"
    error = await auth_error(store, full)
    assert (error.status, error.code) == (403, "account_suspended")
    await store.update_account("acme", status="active")
    assert (await store.authenticate(full)).account_name == "acme"


@pytest.mark.anyio
async def test_an_update_with_no_changes_changes_nothing(store: Store) -> None:
    before = await new_account(store)
    after = await store.update_account("acme")
    assert (after.plan, after.status, after.balance) == (before.plan, before.status, before.balance)
    with pytest.raises(StoreError):
        await store.update_account("nobody")


@pytest.mark.anyio
async def test_allowed_models_reach_the_caller(store: Store) -> None:
    await new_account(store)
    limited, _ = await store.create_key("acme", allowed_models=["small", "large"])
    unlimited, _ = await store.create_key("acme")
    assert (await store.authenticate(limited)).allowed_models == ("small", "large")
    assert (await store.authenticate(unlimited)).allowed_models is None


# --- the secret is never stored -------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_sqlite_files_never_hold_the_secret(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    try:
        await store.migrate()
        await new_account(store)
        full, _ = await store.create_key("acme")
        prefix, secret = KEY_FORMAT.fullmatch(full).groups()  # type: ignore[union-attr]
        await store.authenticate(full)
        data = sqlite_bytes(url)  # open: the latest writes are in the WAL
        assert prefix.encode() in data  # the right files: the key's row is there
        assert secret.encode() not in data
    finally:
        await store.close()
    data = sqlite_bytes(url)  # closed: checkpointed into the database file
    assert prefix.encode() in data
    assert secret.encode() not in data


@pytest.mark.anyio
async def test_no_table_holds_the_secret(store: Store) -> None:
    await new_account(store)
    full, _ = await store.create_key("acme", allowed_models=["m"])
    secret = full.rsplit("_", 1)[1]
    await store.authenticate(full)
    rows = await all_rows(store)
    assert len(rows["api_keys"]) == 1
    for table, table_rows in rows.items():
        for row in table_rows:
            for value in row:
                assert secret not in str(value), (table, row)


# --- holds and settlement -------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_holds_stop_when_the_balance_cannot_cover_them(store: Store) -> None:
    account = await new_account(store, credits=100)
    assert await store.hold(account.id, 40, "r1") is not None
    assert await balance(store, account.id) == 60
    assert await store.hold(account.id, 40, "r2") is not None
    assert await balance(store, account.id) == 20
    assert await store.hold(account.id, 40, "r3") is None
    assert await balance(store, account.id) == 20
    assert await store.open_holds(account.id) == 2


@pytest.mark.anyio
async def test_settle_returns_the_unused_hold_and_records_usage(store: Store) -> None:
    account = await new_account(store, credits=100)
    _, key = await store.create_key("acme")
    hold = await store.hold(account.id, 40, "r1")
    assert hold is not None
    assert await store.settle(hold, 15, usage("r1", "tiny", completion_tokens=9), key.id) is True
    assert await balance(store, account.id) == 100 - 15
    assert await store.open_holds(account.id) == 0
    record = (await usage_records(store, account.id))["r1"]
    assert (record.cost, record.key_id, record.model) == (15, key.id, "tiny")
    assert (record.prompt_tokens, record.completion_tokens, record.status, record.latency_ms) == (3, 9, "ok", 7)


@pytest.mark.anyio
async def test_settling_twice_changes_nothing(store: Store) -> None:
    account = await new_account(store, credits=100)
    _, key = await store.create_key("acme")
    hold = await store.hold(account.id, 40, "r1")
    assert hold is not None
    assert await store.settle(hold, 15, usage("r1"), key.id) is True
    rows = await all_rows(store)
    assert await store.settle(hold, 30, usage("r1-again"), key.id) is False
    assert await store.settle(hold, 0, None, key.id) is False
    assert await all_rows(store) == rows
    assert await balance(store, account.id) == 85


@pytest.mark.anyio
async def test_a_settlement_that_cannot_be_recorded_changes_nothing(store: Store) -> None:
    """A settlement is one transaction: its usage row refused (a request id used before), its release, charge and
    ledger rows do not happen either, and the hold stays open for a later settlement."""
    account = await new_account(store, credits=100)
    _, key = await store.create_key("acme")
    first, second = await store.hold(account.id, 40, "r1"), await store.hold(account.id, 30, "r2")
    assert first is not None and second is not None
    assert await store.settle(first, 15, usage("r1"), key.id) is True
    rows = await all_rows(store)
    with pytest.raises((sqlite3.IntegrityError, asyncpg.UniqueViolationError)):
        await store.settle(second, 10, usage("r1"), key.id)
    assert await all_rows(store) == rows
    assert await store.settle(second, 10, usage("r2"), key.id) is True
    assert await balance(store, account.id) == 100 - 15 - 10 == await store.ledger_sum(account.id)


@pytest.mark.anyio
async def test_charge_is_clamped_to_the_hold(store: Store) -> None:
    account = await new_account(store, credits=100)
    _, key = await store.create_key("acme")
    hold = await store.hold(account.id, 40, "r1")
    assert hold is not None
    assert await store.settle(hold, 1000, usage("r1"), key.id) is True
    assert await balance(store, account.id) == 60
    assert (await usage_records(store, account.id))["r1"].cost == 40


@pytest.mark.anyio
async def test_settling_an_unknown_hold_is_a_store_error(store: Store) -> None:
    with pytest.raises(StoreError):
        await store.settle(999, 1, None, key_id=0)


@pytest.mark.anyio
async def test_a_hold_settled_concurrently_settles_once(store: Store) -> None:
    account = await new_account(store, credits=100)
    _, key = await store.create_key("acme")
    hold = await store.hold(account.id, 40, "r1")
    assert hold is not None
    results = await asyncio.gather(*(store.settle(hold, 10, None, key.id) for _ in range(5)))
    assert sorted(results) == [False] * 4 + [True]
    assert await balance(store, account.id) == 90


@pytest.mark.anyio
async def test_a_failing_settlement_among_concurrent_ones_fails_alone(store: Store) -> None:
    """Transactions asked for together may share a trip to the database thread (SQLite): each still commits or
    fails on its own."""

    account = await new_account(store, credits=100)
    _, key = await store.create_key("acme")
    holds = [await store.hold(account.id, 10, f"r{i}") for i in range(4)]
    settling = [store.settle(hold, 5, None, key.id) for hold in holds if hold is not None]
    results = await asyncio.gather(
        *settling[:2], store.settle(999, 1, None, key.id), *settling[2:], return_exceptions=True
    )
    assert [type(r) for r in results] == [bool, bool, StoreError, bool, bool]
    assert [r for r in results if isinstance(r, bool)] == [True] * 4
    assert await balance(store, account.id) == 100 - 4 * 5


# --- concurrency ----------------------------------------------------------------------------------------------
HOLD = 37
HOLDS_COVERED = 20
LEFTOVER = HOLD - 1  # not enough for one more hold


async def take_holds(stores: list[Store], account_id: int, n: int) -> list[int | None]:
    """n concurrent holds of HOLD, spread over the stores."""
    return await asyncio.gather(*(stores[i % len(stores)].hold(account_id, HOLD, f"r{i}") for i in range(n)))


async def settle_all(store: Store, holds: list[int], key_id: int) -> int:
    """Settle the holds concurrently, each with its own charge (some over the hold); returns the total charged."""
    charges = [(i * 7) % (HOLD + 10) for i in range(len(holds))]
    settled = await asyncio.gather(
        *(store.settle(h, c, usage(f"u{h}"), key_id) for h, c in zip(holds, charges, strict=True))
    )
    assert all(settled)
    return sum(min(c, HOLD) for c in charges)


@pytest.mark.anyio
async def test_concurrent_holds_never_overdraw(store: Store) -> None:
    initial = HOLD * HOLDS_COVERED + LEFTOVER
    account = await new_account(store, credits=initial)
    _, key = await store.create_key("acme")
    results = await take_holds([store], account.id, 50)
    holds = [h for h in results if h is not None]
    assert (len(holds), results.count(None), len(set(holds))) == (HOLDS_COVERED, 30, HOLDS_COVERED)
    assert await balance(store, account.id) == LEFTOVER
    assert await store.open_holds(account.id) == HOLDS_COVERED

    charged = await settle_all(store, holds, key.id)
    assert await balance(store, account.id) == initial - charged
    assert await store.open_holds(account.id) == 0
    records = await usage_records(store, account.id)
    assert (len(records), sum(r.cost for r in records.values())) == (HOLDS_COVERED, charged)


@pytest.mark.anyio
async def test_two_replicas_never_overdraw(store: Store) -> None:
    """Two Store objects on one database (two gateway processes): the database, not a lock, keeps the balance."""

    replica = Store(store.url)
    try:
        initial = HOLD * HOLDS_COVERED + LEFTOVER
        account = await new_account(store, credits=initial)
        _, key = await store.create_key("acme")
        results = await take_holds([store, replica], account.id, 50)
        holds = [h for h in results if h is not None]
        assert len(holds) == HOLDS_COVERED
        assert await balance(store, account.id) == LEFTOVER
        charged = await settle_all(replica, holds, key.id)
        assert await balance(store, account.id) == initial - charged
        assert await store.open_holds() == 0
    finally:
        await replica.close()


@pytest.mark.anyio
async def test_concurrent_account_creation_on_two_replicas_is_a_store_error(store: Store) -> None:
    replica = Store(store.url)
    try:
        for i in range(20):  # the race is not hit every time
            results = await asyncio.gather(
                store.create_account(f"a{i}", "free"),
                replica.create_account(f"a{i}", "free"),
                return_exceptions=True,
            )
            assert sorted(type(r).__name__ for r in results) == ["Account", "StoreError"], results
    finally:
        await replica.close()


# --- stale holds ----------------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_release_stale_holds_releases_only_old_open_holds(store: Store) -> None:
    account = await new_account(store, credits=100)
    _, key = await store.create_key("acme")
    old, fresh, old_settled = [await store.hold(account.id, 10, f"r{i}") for i in range(3)]
    assert old is not None and fresh is not None and old_settled is not None
    assert await store.settle(old_settled, 4, usage("r2"), key.id)
    an_hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    await backdate(store, Hold, old, an_hour_ago)
    await backdate(store, Hold, old_settled, an_hour_ago)

    assert await store.release_stale_holds(dt.timedelta(minutes=10)) == 1
    assert await balance(store, account.id) == 100 - 10 - 4  # the old hold released, charged nothing
    assert await store.open_holds(account.id) == 1
    async with store.engine.connect() as conn:
        statuses = dict((await conn.execute(select(Hold.id, Hold.status))).all())
    assert statuses == {old: "settled", fresh: "open", old_settled: "settled"}
    assert set(await usage_records(store, account.id)) == {"r2"}  # no usage record for a released hold
    assert await store.release_stale_holds(dt.timedelta(minutes=10)) == 0


@pytest.mark.anyio
async def test_holds_of_a_gateway_that_stopped_beating_are_released_by_another(store: Store) -> None:
    """Three gateways on one store: `dead` stopped beating 11 s ago, `live` beat just now, `me` sweeps. Only
    the dead one's fresh hold is released (uncharged); a hold from before owners were recorded waits for age."""

    account = await new_account(store, credits=100)
    me = store.instance
    holds = {}
    for owner in ("dead", "live", me):
        store.instance = owner
        await store.heartbeat()
        holds[owner] = await store.hold(account.id, 10, f"r-{owner}")
    store.instance = me
    legacy = await store.hold(account.id, 10, "r-legacy")
    async with store.engine.begin() as conn:
        await conn.execute(update(Hold).where(Hold.id == legacy).values(owner=None))
        silent_since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=11)
        await conn.execute(update(Gateway).where(Gateway.id == "dead").values(heartbeat_at=silent_since))

    released = await store.release_stale_holds(dt.timedelta(hours=1), dead_after=dt.timedelta(seconds=10))
    assert released == 1
    async with store.engine.connect() as conn:
        statuses = dict((await conn.execute(select(Hold.request_id, Hold.status))).all())
    assert statuses == {"r-dead": "settled", "r-live": "open", f"r-{me}": "open", "r-legacy": "open"}
    assert await balance(store, account.id) == 100 - 3 * 10
    assert await store.release_stale_holds(dt.timedelta(hours=1), dead_after=dt.timedelta(seconds=10)) == 0


# --- usage ----------------------------------------------------------------------------------------------------
async def usage_at_hours(store: Store) -> int:
    """Usage records r0..r3 of account acme at T0 + 0..3 h, of models a, b, a, b; another account's at T0 + 1 h.
    Returns acme's id."""
    account = await new_account(store, credits=1000)
    other = await new_account(store, credits=1000, name="other")
    _, key = await store.create_key("acme")
    _, other_key = await store.create_key("other")
    for i, model in enumerate("abab"):
        hold = await store.hold(account.id, 10, f"r{i}")
        assert hold is not None and await store.settle(hold, 1, usage(f"r{i}", model), key.id)
    hold = await store.hold(other.id, 10, "x")
    assert hold is not None and await store.settle(hold, 1, usage("x", "a"), other_key.id)
    async with store.engine.connect() as conn:
        ids = dict((await conn.execute(select(UsageRecord.request_id, UsageRecord.id))).all())
    for i in range(4):
        await backdate(store, UsageRecord, ids[f"r{i}"], T0 + dt.timedelta(hours=i))
    await backdate(store, UsageRecord, ids["x"], T0 + dt.timedelta(hours=1))
    return account.id


async def request_ids(store: Store, account_id: int, **filters: Any) -> list[str]:
    return [r.request_id for r in await store.usage(account_id, **filters)]


@pytest.mark.anyio
async def test_usage_filters_by_time_and_model(store: Store) -> None:
    account_id = await usage_at_hours(store)
    hour = dt.timedelta(hours=1)
    assert await request_ids(store, account_id) == ["r3", "r2", "r1", "r0"]  # newest first, this account only
    assert await request_ids(store, account_id, since=T0 + hour) == ["r3", "r2", "r1"]  # since is inclusive
    assert await request_ids(store, account_id, until=T0 + hour) == ["r0"]  # until is exclusive
    assert await request_ids(store, account_id, since=T0 + hour, until=T0 + 3 * hour) == ["r2", "r1"]
    assert await request_ids(store, account_id, model="a") == ["r2", "r0"]
    assert await request_ids(store, account_id, since=T0 + hour, model="b") == ["r3", "r1"]
    assert await request_ids(store, account_id, model="c") == []
    assert await request_ids(store, account_id, limit=2) == ["r3", "r2"]


@pytest.mark.anyio
async def test_usage_time_filters_honour_utc_offsets(store: Store) -> None:
    account_id = await usage_at_hours(store)
    plus_two = dt.timezone(dt.timedelta(hours=2))
    since = (T0 + dt.timedelta(hours=1)).astimezone(plus_two)  # 15:00+02:00 == 13:00Z
    until = (T0 + dt.timedelta(hours=3)).astimezone(plus_two)
    assert await request_ids(store, account_id, since=since, until=until) == ["r2", "r1"]


# --- grants and the ledger ------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_starter_credits_are_a_ledger_grant(store: Store) -> None:
    account = await new_account(store, credits=250)
    empty = await new_account(store, name="empty")
    assert await balance(store, account.id) == 250
    assert await balance(store, empty.id) == 0
    async with store.engine.connect() as conn:
        entries = (await conn.execute(select(LedgerEntry.account_id, LedgerEntry.kind, LedgerEntry.amount))).all()
    assert [tuple(e) for e in entries] == [(account.id, "grant", 250)]


@pytest.mark.anyio
async def test_negative_grant_removes_credits(store: Store) -> None:
    account = await new_account(store, credits=100)
    assert await store.grant("acme", -30, "refund") == 70
    assert await balance(store, account.id) == 70
    assert await store.grant("acme", 5) == 75
    async with store.engine.connect() as conn:
        entries = (
            await conn.execute(select(LedgerEntry.kind, LedgerEntry.amount, LedgerEntry.note).order_by(LedgerEntry.id))
        ).all()
    assert [tuple(e) for e in entries] == [
        ("grant", 100, "starter credits"),
        ("grant", -30, "refund"),
        ("grant", 5, "grant"),
    ]


@pytest.mark.anyio
async def test_a_grant_below_zero_is_refused(store: Store) -> None:
    """Taking credits away stops at zero: a typo must not leave an account a debt of a billion credits."""

    account = await new_account(store, credits=100)
    with pytest.raises(BalanceError, match="below zero"):
        await store.grant("acme", -130)
    assert await balance(store, account.id) == 100
    assert await store.grant("acme", -100) == 0
    assert await store.hold(account.id, 1, "r1") is None


@pytest.mark.anyio
async def test_ledger_follows_every_balance_change(store: Store) -> None:
    account = await new_account(store, credits=100)
    _, key = await store.create_key("acme")
    hold = await store.hold(account.id, 40, "r1")
    assert hold is not None
    await store.grant("acme", -10)
    await store.settle(hold, 25, usage("r1"), key.id)
    assert await balance(store, account.id) == 100 - 10 - 25
    async with store.engine.connect() as conn:
        entries = (await conn.execute(select(LedgerEntry.kind, LedgerEntry.amount, LedgerEntry.hold_id))).all()
    assert sorted(tuple(e) for e in entries) == sorted(
        [
            ("grant", 100, None),
            ("hold", -40, hold),
            ("grant", -10, None),
            ("release", 40, hold),
            ("charge", -25, hold),
        ]
    )


# --- the SQLite writer's deferred transactions ----------------------------------------------------------------
def _thread_ident(run: Any) -> int:
    import threading

    return threading.get_ident()


@pytest.mark.anyio
async def test_a_deferred_transaction_goes_with_the_next_one_or_alone_soon(tmp_path: Path) -> None:
    """A settlement (deferred) waits for the next hold and reaches the database in the same hop; with no hold to
    come it goes alone within DEFER_SECONDS; a read that must see it, or closing the store, sends it at once."""
    from llamaserve.billing.store import DEFER_SECONDS, SqliteWriter

    writer = SqliteWriter(str(tmp_path / "w.db"))
    sent: list[int] = []
    run_batch = writer._run_batch
    writer._run_batch = lambda batch: sent.append(len(batch)) or run_batch(batch)  # type: ignore[method-assign]

    deferred = asyncio.ensure_future(writer.transaction(_thread_ident, defer=True))
    await asyncio.sleep(DEFER_SECONDS / 5)
    assert not deferred.done() and sent == []  # waiting for company
    await writer.transaction(_thread_ident)
    assert deferred.done() and sent == [2]  # one hop for both

    loop = asyncio.get_running_loop()
    started = loop.time()
    await writer.transaction(_thread_ident, defer=True)
    assert loop.time() - started < DEFER_SECONDS + 1 and sent == [2, 1]  # alone, once its wait was up

    caught = asyncio.ensure_future(writer.transaction(_thread_ident, defer=True))
    await asyncio.sleep(0)
    await writer.caught_up()  # what reads of balances wait for: sent now, not after its wait
    assert caught.done() and sent == [2, 1, 1]

    last = asyncio.ensure_future(writer.transaction(_thread_ident, defer=True))
    await asyncio.sleep(0)
    await writer.close()
    assert last.done() and last.result() > 0 and sent == [2, 1, 1, 1]


# --- idempotency keys ----------------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_an_idempotency_key_runs_once_then_answers_from_the_store(store: Store) -> None:
    from llamaserve.billing.idempotency import Claimed, IdempotencyStore

    account = await new_account(store, credits=1)
    keys = IdempotencyStore(store, dt.timedelta(hours=1), dt.timedelta(seconds=10))
    assert (await keys.claim(account.id, "k", "h1")).outcome is Claimed.RUN
    assert (await keys.claim(account.id, "k", "h1")).outcome is Claimed.RUNNING
    assert (await keys.claim(account.id, "k", "h2")).outcome is Claimed.MISMATCH
    await keys.finish(account.id, "k", 200, True, b"data: {}\n\n")
    done = await keys.claim(account.id, "k", "h1")
    assert (done.outcome, done.stream, done.response) == (Claimed.DONE, True, b"data: {}\n\n")
    assert await keys.stored_bytes(account.id) == 10
    # A refused request's key is freed; another account's same key is its own.
    assert (await keys.claim(account.id, "refused", "h")).outcome is Claimed.RUN
    await keys.forget(account.id, "refused")
    assert (await keys.claim(account.id, "refused", "h")).outcome is Claimed.RUN
    other = await store.create_account("other", "free", 1)
    assert (await keys.claim(other.id, "k", "h2")).outcome is Claimed.RUN


@pytest.mark.anyio
async def test_an_expired_key_or_one_whose_gateway_died_is_claimed_again(store: Store) -> None:
    from llamaserve.billing.idempotency import Claimed, IdempotencyStore

    account = await new_account(store, credits=1)
    await store.heartbeat()
    short = IdempotencyStore(store, dt.timedelta(seconds=-1), dt.timedelta(seconds=10))  # expired at once
    assert (await short.claim(account.id, "old", "h")).outcome is Claimed.RUN
    keys = IdempotencyStore(store, dt.timedelta(hours=1), dt.timedelta(seconds=10))
    assert (await keys.claim(account.id, "old", "other body")).outcome is Claimed.RUN
    # A gateway that claimed a key and stopped beating long ago: its key goes to the next claimant.
    dead = Store(store.url)
    try:
        dead_keys = IdempotencyStore(dead, dt.timedelta(hours=1), dt.timedelta(seconds=10))
        async with store.write() as s:
            s.add(Gateway(id=dead.instance, heartbeat_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)))
        assert (await dead_keys.claim(account.id, "orphan", "h")).outcome is Claimed.RUN
        assert (await keys.claim(account.id, "orphan", "h")).outcome is Claimed.RUN
    finally:
        await dead.close()
