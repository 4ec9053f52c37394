"""The account store: accounts, keys, credits (holds and the ledger) and usage, on SQLAlchemy 2 (async).

SQLite (a file in the data directory, WAL) by default; PostgreSQL (asyncpg) for several gateway replicas. A hold
is a conditional UPDATE of the balance with its hold and ledger rows in one transaction, so concurrent requests can
never take a balance below zero: a hold succeeds only if `balance >= amount` at the moment it is taken. On
PostgreSQL the per-request transactions are one statement each (billing/postgres.py).

Durability: grants, keys and accounts are on disk when their call returns. The per-request transactions (holds
and settlements) skip the wait for the disk, so it stays off every request's path: on SQLite they commit with
`synchronous=NORMAL` and a flusher syncs the log within WAL_FLUSH_SECONDS; on PostgreSQL with
`synchronous_commit = off` (its WAL writer syncs within a few hundred ms). A crashed process loses none of
them; a power cut may forget the last fraction of a second: holds, which end with the process anyway, and
charges, which are then released uncharged at the next start. Never a double charge.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg
from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    delete,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.sql.elements import TextClause

from llamaserve.billing.keys import generate_key, hash_secret, parse_key, secret_matches
from llamaserve.billing.models import Account, ApiKey, Gateway, Hold, LedgerEntry, UsageRecord, WebSession
from llamaserve.billing.passwords import new_session_token, token_hash
from llamaserve.billing.postgres import PostgresRequests

T = TypeVar("T")
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)  # last_used_at is a hint; don't write on every request


_NO_KEY_HASH = hash_secret("")  # what an unknown prefix's secret is compared with
_KEY_CHECK = select(
    ApiKey.id.label("key_id"),
    ApiKey.secret_hash,
    ApiKey.revoked,
    ApiKey.expires_at,
    ApiKey.enabled,
    ApiKey.last_used_at,
    ApiKey.allowed_models,
    Account.id.label("account_id"),
    Account.name.label("account_name"),
    Account.status,
    Account.plan,
).join(Account, Account.id == ApiKey.account_id)


class BalanceError(ValueError):
    """A change the balance cannot take (it would go below zero)."""


class KeyLimitError(ValueError):
    """The account holds as many active keys as it may."""


class StoreError(ValueError):
    """A store operation that cannot be done (unknown account or key, duplicate name)."""


class AuthError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Caller:
    """Who is calling: an enabled key of an active account."""

    key_id: int
    key_prefix: str
    account_id: int
    account_name: str
    plan: str
    allowed_models: tuple[str, ...] | None

    @property
    def limit_key(self) -> str:
        """What the plan's rate limits count against: the account, all its keys together (more keys, no more
        requests)."""
        return f"account-{self.account_id}"


@dataclass(frozen=True)
class Usage:
    """What one request used, for its usage record."""

    request_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    status: str  # ok | cancelled | error | timeout
    latency_ms: int
    estimated: bool = False  # the token counts are an estimate (an upstream that reported none)


@dataclass(frozen=True)
class UsageBucket:
    """What one key spent on one model in one time bucket (for the dashboard's charts)."""

    start: int  # Unix seconds, a multiple of the bucket's length
    model: str
    key_prefix: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: int


# PostgreSQL SQLSTATEs that say the database cannot be reached or cannot take us now, not that a query is wrong:
# class 08 (connection exception), admin/crash shutdown, starting up, too many connections, no such database.
_UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300", "3D000")


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the database is out of reach for now (down, restarting, connection lost, SQLite busy):
    a client should retry (503) and the server recovers by itself, unlike a wrong query (a bug: 500)."""
    if isinstance(exc, DBAPIError):
        sqlstate = str(getattr(exc.orig, "sqlstate", None) or "")
        return (
            exc.connection_invalidated
            or isinstance(exc, (OperationalError, InterfaceError))
            or sqlstate.startswith(_UNAVAILABLE_SQLSTATES)
        )
    if isinstance(exc, asyncpg.PostgresError):  # the per-request statements' own driver (billing/postgres.py)
        return str(exc.sqlstate or "").startswith(_UNAVAILABLE_SQLSTATES)
    # No pooled connection came free; the driver failed to connect or lost its connection (asyncpg raises these
    # unwrapped); SQLite busy or its file out of reach on the per-request connection (sqlite3's own errors).
    unreachable = (PoolTimeout, OSError, TimeoutError, asyncpg.InterfaceError, sqlite3.OperationalError)
    return isinstance(exc, unreachable)


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{data_dir / 'llamaserve.db'}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.instance = uuid.uuid4().hex  # this process, as the owner of the holds it takes (see heartbeat)
        self.is_sqlite = url.startswith("sqlite")
        # PostgreSQL: a connection attempt gives up after 5 s (asyncpg's default is 60 s), so requests during an
        # outage get their 503 promptly. SQLite: the busy timeout.
        self.engine: AsyncEngine = create_async_engine(url, connect_args={"timeout": 30 if self.is_sqlite else 5})
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # SQLite: per-request transactions run on one database thread with the stdlib driver (see _transaction).
        self._sqlite: SqliteWriter | None = None
        if self.is_sqlite:
            self._sqlite = SqliteWriter(self.engine.url.database or "")
        # SQLite has one writer at a time; queue writers here instead of failing with "database is locked".
        self._write_lock = asyncio.Lock()
        # PostgreSQL: the per-request statements, one round trip each, on asyncpg directly.
        self.postgres: PostgresRequests | None = None if self.is_sqlite else PostgresRequests(url)

    async def ping(self) -> None:
        """Raises unless the database answers (readiness probes)."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (creates it on a new database)."""
        from llamaserve.billing.migrations import upgrade

        async with self.engine.begin() as conn:
            if not self.is_sqlite:  # replicas starting together: one migrates, the others wait and find it done
                await conn.execute(text("SELECT pg_advisory_xact_lock(72716)"))
            await conn.run_sync(upgrade)

    async def close(self) -> None:
        await self.engine.dispose()
        if self._sqlite is not None:
            await self._sqlite.close()
        if self.postgres is not None:
            await self.postgres.close()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A write transaction: committed on success, rolled back on error."""
        if self.is_sqlite:
            await self._write_lock.acquire()
        try:
            async with self._sessions() as session, session.begin():
                yield session
        finally:
            if self.is_sqlite:
                self._write_lock.release()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads of balances, holds and usage: they see every settlement this process has made,
        those still waiting for company to the database thread (see `settle`) included."""
        if self._sqlite is not None:
            await self._sqlite.caught_up()
        async with self._sessions() as session:
            yield session

    # --- accounts -------------------------------------------------------------------------------------------
    async def create_account(
        self,
        name: str,
        plan: str,
        credits: int = 0,
        *,
        email: str | None = None,
        password_hash: str | None = None,
        is_admin: bool = False,
    ) -> Account:
        """An account; with an email and a password hash it can log in to the dashboard."""
        exists = StoreError(f"an account named {name!r} already exists")
        try:
            async with self.write() as s:
                if await s.scalar(select(Account.id).where(Account.name == name)) is not None:
                    raise exists
                if email is not None and await s.scalar(select(Account.id).where(Account.email == email)) is not None:
                    raise StoreError(f"an account with email {email!r} already exists")
                account = Account(
                    name=name,
                    plan=plan,
                    status="active",
                    balance=0,
                    email=email,
                    password_hash=password_hash,
                    is_admin=is_admin,
                )
                s.add(account)
                await s.flush()
                if credits:
                    await self._grant(s, account.id, credits, "starter credits")
        except IntegrityError as e:  # another process created it between our check and our insert
            raise exists from e
        return account

    async def list_accounts(self) -> list[Account]:
        async with self.read() as s:
            return list(await s.scalars(select(Account).order_by(Account.id)))

    async def account(self, name: str) -> Account:
        async with self.read() as s:
            account = await s.scalar(select(Account).where(Account.name == name))
        if account is None:
            raise StoreError(f"no account named {name!r}")
        return account

    async def account_by_id(self, account_id: int) -> Account:
        async with self.read() as s:
            account = await s.get(Account, account_id)
        if account is None:
            raise StoreError(f"no account with id {account_id}")
        return account

    async def account_by_email(self, email: str) -> Account | None:
        async with self._sessions() as s:
            return await s.scalar(select(Account).where(Account.email == email))

    async def update_account(
        self,
        name: str,
        *,
        plan: str | None = None,
        status: str | None = None,
        email: str | None = None,
        password_hash: str | None = None,
        is_admin: bool | None = None,
    ) -> Account:
        changes = (("plan", plan), ("status", status), ("email", email), ("password_hash", password_hash))
        values: dict[str, Any] = {k: v for k, v in (*changes, ("is_admin", is_admin)) if v is not None}
        if not values:  # nothing to change (an UPDATE with no SET is not SQL)
            return await self.account(name)
        try:
            async with self.write() as s:
                result = await s.execute(update(Account).where(Account.name == name).values(**values))
                if result.rowcount == 0:  # type: ignore[attr-defined]
                    raise StoreError(f"no account named {name!r}")
        except IntegrityError as e:  # the only unique column one can change
            raise StoreError(f"another account has the email {email!r}") from e
        return await self.account(name)

    # --- keys -----------------------------------------------------------------------------------------------
    async def create_key(
        self,
        account_name: str,
        name: str = "",
        allowed_models: list[str] | None = None,
        expires_at: dt.datetime | None = None,
        max_active: int | None = None,
    ) -> tuple[str, ApiKey]:
        """A new key; returns the full key (the only time it exists in clear) and its row. allowed_models None
        allows every model; an empty list would allow none, which is refused as a mistake. With max_active, a
        KeyLimitError when the account holds that many active keys already (playground keys aside)."""
        if allowed_models is not None and not allowed_models:
            raise StoreError("allowed_models must name at least one model (leave it out to allow all)")
        account = await self.account(account_name)
        new = generate_key()
        key = ApiKey(
            account_id=account.id,
            prefix=new.prefix,
            secret_hash=new.secret_hash,
            name=name,
            enabled=True,
            revoked=False,
            allowed_models=allowed_models,
            expires_at=expires_at,
        )
        async with self.write() as s:
            if max_active is not None:
                # The account's row locked first: concurrent creations count one after the other.
                await s.execute(select(Account.id).where(Account.id == account.id).with_for_update())
                active = select(func.count()).where(
                    ApiKey.account_id == account.id, ApiKey.revoked.is_(False), ApiKey.expires_at.is_(None)
                )
                if (await s.scalar(active) or 0) >= max_active:
                    raise KeyLimitError(f"an account may hold {max_active} active keys; revoke one to make another")
            s.add(key)
        return new.full, key

    async def list_keys(self, account_name: str | None = None) -> list[tuple[ApiKey, str]]:
        """Keys with their account's name."""
        query = select(ApiKey, Account.name).join(Account, Account.id == ApiKey.account_id).order_by(ApiKey.id)
        if account_name is not None:
            query = query.where(Account.name == account_name)
        async with self._sessions() as s:
            return [(key, name) for key, name in (await s.execute(query)).all()]

    async def key(self, prefix: str) -> ApiKey:
        async with self._sessions() as s:
            key = await s.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
        if key is None:
            raise StoreError(f"no key with prefix {prefix!r}")
        return key

    async def set_key(
        self,
        prefix: str,
        *,
        enabled: bool | None = None,
        revoked: bool | None = None,
        name: str | None = None,
        account_id: int | None = None,
    ) -> ApiKey:
        """Change a key; with `account_id`, only if that account owns it (else it is 'no key', as if absent)."""
        values = {k: v for k, v in (("enabled", enabled), ("revoked", revoked), ("name", name)) if v is not None}
        query = update(ApiKey).where(ApiKey.prefix == prefix)
        if account_id is not None:
            query = query.where(ApiKey.account_id == account_id)
        async with self.write() as s:
            result = await s.execute(query.values(**values))
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise StoreError(f"no key with prefix {prefix!r}")
        return await self.key(prefix)

    async def authenticate(self, presented: str) -> Caller:
        """The caller behind a Bearer key, or AuthError: 401 for a malformed, unknown or revoked key, 403 for a
        disabled key or a suspended account."""
        parsed = parse_key(presented)
        if parsed is None:
            raise AuthError(401, "Incorrect API key format: keys look like ls-<prefix>_<secret>", "invalid_api_key")
        prefix, secret = parsed
        # Plain columns, not ORM objects: a found row then costs about what a missing one does (the time to
        # answer tells no one which prefixes exist), and the secret is hashed and compared either way.
        if self.postgres is not None:
            row: Any = await self.postgres.key(prefix)
        else:
            async with self._sessions() as s:
                row = (await s.execute(_KEY_CHECK.where(ApiKey.prefix == prefix))).first()
        matches = secret_matches(secret, row.secret_hash if row is not None else _NO_KEY_HASH)
        if row is None or not matches:
            raise AuthError(401, "Incorrect API key provided (unknown or revoked)", "invalid_api_key")
        return await self._caller(row, prefix)

    async def caller_of_key(self, key_id: int) -> Caller:
        """The caller a key stands for now, by its id (a batch's lines run as the key that created it); AuthError
        as from `authenticate` if it has been revoked, disabled or has expired, or its account suspended."""
        async with self._sessions() as s:
            row = (await s.execute(_KEY_CHECK.add_columns(ApiKey.prefix).where(ApiKey.id == key_id))).first()
        if row is None:
            raise AuthError(401, "Incorrect API key provided (unknown or revoked)", "invalid_api_key")
        return await self._caller(row, row.prefix)

    async def _caller(self, row: Any, prefix: str) -> Caller:
        """The caller behind a key's row (its secret checked), or AuthError for a key or account not in use."""
        if row.revoked:
            raise AuthError(401, "Incorrect API key provided (unknown or revoked)", "invalid_api_key")
        if row.expires_at is not None and _aware(row.expires_at) <= _now():
            raise AuthError(401, f"API key ls-{prefix}_... has expired", "invalid_api_key")
        if not row.enabled:
            raise AuthError(403, f"API key ls-{prefix}_... is disabled; enable it to use it", "api_key_disabled")
        if row.status != "active":
            raise AuthError(403, f"account {row.account_name!r} is {row.status}", "account_suspended")
        if row.last_used_at is None or _now() - _aware(row.last_used_at) > LAST_USED_RESOLUTION:
            async with self.write() as w:
                await w.execute(update(ApiKey).where(ApiKey.id == row.key_id).values(last_used_at=_now()))
        models = json.loads(row.allowed_models) if isinstance(row.allowed_models, str) else row.allowed_models
        allowed = tuple(models) if models else None
        return Caller(row.key_id, prefix, row.account_id, row.account_name, row.plan, allowed)

    # --- dashboard sessions ---------------------------------------------------------------------------------
    async def create_session(self, account_id: int, lifetime: dt.timedelta) -> str:
        """A login session; returns its token (for the cookie; the store keeps only its hash). Sessions that
        have expired, of anyone, are deleted on the way."""
        token = new_session_token()
        now = _now()
        async with self.write() as s:
            await s.execute(delete(WebSession).where(WebSession.expires_at < now))
            s.add(WebSession(account_id=account_id, token_hash=token_hash(token), expires_at=now + lifetime))
        return token

    async def session(self, token: str) -> tuple[WebSession, Account] | None:
        """The session behind a token and its account, if it has not expired and the account is active."""
        async with self._sessions() as s:
            row = (
                await s.execute(
                    select(WebSession, Account)
                    .join(Account, Account.id == WebSession.account_id)
                    .where(WebSession.token_hash == token_hash(token))
                )
            ).first()
        if row is None or _aware(row[0].expires_at) <= _now() or row[1].status != "active":
            return None
        return row[0], row[1]

    async def end_session(self, token: str) -> None:
        """Log out: the session is deleted and its playground key revoked."""
        async with self.write() as s:
            session = await s.scalar(select(WebSession).where(WebSession.token_hash == token_hash(token)))
            if session is None:
                return
            if session.playground_key_id is not None:
                await s.execute(update(ApiKey).where(ApiKey.id == session.playground_key_id).values(revoked=True))
            await s.delete(session)

    async def playground_key(self, token: str) -> tuple[str, ApiKey]:
        """A new key for the session's playground, expiring with the session; the session's previous one is
        revoked (one live playground key per session)."""
        found = await self.session(token)
        if found is None:
            raise StoreError("no such session")
        session, account = found
        full, key = await self.create_key(account.name, "playground", expires_at=_aware(session.expires_at))
        async with self.write() as s:
            # The session's key as of now, under a lock: concurrent calls each revoke the one before them (a
            # previous key read before this transaction let 5 of 8 concurrent ones outlive the log-out).
            current = select(WebSession.playground_key_id).where(WebSession.id == session.id).with_for_update()
            previous = (await s.execute(current)).first()
            if previous is None:  # logged out meanwhile: the new key goes with the session
                await s.execute(update(ApiKey).where(ApiKey.id == key.id).values(revoked=True))
                raise StoreError("no such session")
            if previous[0] is not None:
                await s.execute(update(ApiKey).where(ApiKey.id == previous[0]).values(revoked=True))
            await s.execute(update(WebSession).where(WebSession.id == session.id).values(playground_key_id=key.id))
        return full, key

    # --- credits --------------------------------------------------------------------------------------------
    async def grant(self, account_name: str, amount: int, note: str = "grant") -> int:
        """Add (or, negative, remove) credits; returns the new balance."""
        account = await self.account(account_name)
        async with self.write() as s:
            await self._grant(s, account.id, amount, note)
        return (await self.account(account_name)).balance

    async def _grant(self, s: AsyncSession, account_id: int, amount: int, note: str) -> None:
        """Raises BalanceError for a grant that would take the balance below zero."""
        changed = await s.execute(
            update(Account)
            .where(Account.id == account_id, Account.balance + amount >= 0)
            .values(balance=Account.balance + amount)
        )
        if changed.rowcount == 0:
            raise BalanceError(f"taking {-amount / 1e6:g} credits would leave the balance below zero")
        s.add(LedgerEntry(account_id=account_id, kind="grant", amount=amount, note=note[:200]))

    async def hold(self, account_id: int, amount: int, request_id: str) -> int | None:
        """Reserve `amount` for a request; returns the hold's id, or None if the balance cannot cover it."""
        if amount < 0:
            raise ValueError(f"a hold cannot be negative ({amount})")
        if self.postgres is not None:
            return await self.postgres.hold(account_id, amount, request_id, self.instance, _now())
        return await self.transaction(_hold, account_id, amount, request_id, self.instance)

    async def settle(self, hold_id: int, charge: int, usage: Usage | None, key_id: int) -> bool:
        """Release a hold and charge what was used (at most the hold), with the usage record, in one
        transaction. Settling twice does nothing the second time; returns whether this call settled it.

        On SQLite the settlement waits (up to DEFER_SECONDS) for the next hold and goes to the database thread
        with it: a request's settlement then runs while the next request waits for its engine, not while that
        request is being read, checked and sent (the thread's work slows the event loop's: they share the GIL).
        On PostgreSQL it is one statement, committed when this returns."""
        if self.postgres is not None:
            recorded = astuple(usage) if usage is not None else None  # in Usage's field order
            settled, known = await self.postgres.settle(hold_id, charge, key_id, _now(), recorded)
            if not known:
                raise StoreError(f"no hold {hold_id}")
            return settled
        return await self.transaction(settle_hold, hold_id, charge, usage, key_id, defer=True)

    async def transaction(self, work: Callable[..., T], *args: Any, defer: bool = False) -> T:
        """Run `work(statements, *args)` in one write transaction. These run on every request: on SQLite the
        whole transaction goes to the database thread in one hop (with any others asked for meanwhile), on sqlite3
        itself; elsewhere it runs on the async connection through SQLAlchemy's sync facade."""
        if self._sqlite is not None:
            return await self._sqlite.transaction(work, *args, defer=defer)
        async with self.engine.begin() as conn:
            return await conn.run_sync(_asynchronous_commit, work, *args)

    async def heartbeat(self) -> None:
        """Say this process is alive (the owner of its open holds); call more often than `dead_after` below, and
        before taking the first hold."""
        await self.transaction(_beat, self.instance)

    async def release_stale_holds(self, older_than: dt.timedelta, dead_after: dt.timedelta | None = None) -> int:
        """Release holds left open by a process that died mid-request (charging nothing: what it produced was
        never reported): holds older than any live request could be, and, with `dead_after`, the holds of every
        other process that has not beaten for that long. Live processes' holds are safe."""
        now = _now()
        stale = Hold.created_at < now - older_than
        if dead_after is not None:
            alive = select(Gateway.id).where(Gateway.heartbeat_at >= now - dead_after)
            orphaned = Hold.owner.is_not(None) & (Hold.owner != self.instance) & Hold.owner.not_in(alive)
            stale = or_(stale, orphaned)
        async with self._sessions() as s:
            ids = list(await s.scalars(select(Hold.id).where(Hold.status == "open", stale)))
        settled = 0
        for hold_id in ids:
            settled += await self.settle(hold_id, 0, None, key_id=0)
        if dead_after is not None:  # forget processes dead for long (their holds are released by now)
            async with self.write() as w:
                await w.execute(delete(Gateway).where(Gateway.heartbeat_at < now - 10 * dead_after))
        return settled

    async def open_holds(self, account_id: int | None = None) -> int:
        query = select(func.count()).select_from(Hold).where(Hold.status == "open")
        if account_id is not None:
            query = query.where(Hold.account_id == account_id)
        async with self.read() as s:
            return int(await s.scalar(query) or 0)

    async def ledger_sum(self, account_id: int) -> int:
        async with self.read() as s:
            total = await s.scalar(select(func.sum(LedgerEntry.amount)).where(LedgerEntry.account_id == account_id))
        return int(total or 0)

    # --- usage ----------------------------------------------------------------------------------------------
    async def usage(
        self,
        account_id: int,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        model: str | None = None,
        limit: int = 1000,
    ) -> list[UsageRecord]:
        query = select(UsageRecord).where(UsageRecord.account_id == account_id)
        # Compare in UTC: SQLite keeps the clock time of the UTC value and would ignore another offset.
        since = since.astimezone(dt.UTC) if since is not None else None
        until = until.astimezone(dt.UTC) if until is not None else None
        if since is not None:
            query = query.where(UsageRecord.created_at >= since)
        if until is not None:
            query = query.where(UsageRecord.created_at < until)
        if model is not None:
            query = query.where(UsageRecord.model == model)
        async with self.read() as s:
            return list(await s.scalars(query.order_by(UsageRecord.id.desc()).limit(limit)))

    async def usage_summary(
        self, account_id: int, since: dt.datetime, until: dt.datetime, bucket_seconds: int
    ) -> list[UsageBucket]:
        """Requests, tokens and cost per time bucket, model and key, summed by the database."""
        if self.is_sqlite:  # created_at is stored as UTC clock time
            epoch = func.cast(func.strftime("%s", UsageRecord.created_at), Integer)
        else:
            epoch = func.cast(func.floor(func.extract("epoch", UsageRecord.created_at)), BigInteger)
        start = (epoch // bucket_seconds * bucket_seconds).label("start")
        query = (
            select(
                start,
                UsageRecord.model,
                ApiKey.prefix,
                func.count(),
                func.sum(UsageRecord.prompt_tokens),
                func.sum(UsageRecord.completion_tokens),
                func.sum(UsageRecord.cost),
            )
            .join(ApiKey, ApiKey.id == UsageRecord.key_id)
            .where(
                UsageRecord.account_id == account_id,
                UsageRecord.created_at >= since.astimezone(dt.UTC),
                UsageRecord.created_at < until.astimezone(dt.UTC),
            )
            .group_by(start, UsageRecord.model, ApiKey.prefix)
            .order_by(start)
        )
        async with self.read() as s:
            rows = (await s.execute(query)).all()
        return [UsageBucket(int(r[0]), r[1], r[2], int(r[3]), int(r[4]), int(r[5]), int(r[6])) for r in rows]


# SQLite's per-request statements, as SQL text: they go straight to the driver (sqlite3 takes these :named
# parameters), which skips all of SQLAlchemy's per-statement work. PostgreSQL has its own (billing/postgres.py);
# the heartbeat's go through SQLAlchemy there.
_TAKE = text("UPDATE accounts SET balance = balance - :amount WHERE id = :account_id AND balance >= :amount")
_OPEN_HOLD = text(
    "INSERT INTO holds (account_id, request_id, amount, status, owner, created_at) "
    "VALUES (:account_id, :request_id, :amount, 'open', :owner, :now) RETURNING id"
)
_LEDGER = text(
    "INSERT INTO ledger (account_id, kind, amount, hold_id, note, created_at) "
    "VALUES (:account_id, :kind, :amount, :hold_id, :note, :now)"
)
_CLOSE_HOLD = text(
    "UPDATE holds SET status = 'settled', settled_at = :now WHERE id = :hold_id AND status = 'open' "
    "RETURNING account_id, amount"
)
_HOLD_EXISTS = text("SELECT id FROM holds WHERE id = :hold_id")
_CREDIT = text("UPDATE accounts SET balance = balance + :delta WHERE id = :account_id")
_RECORD_USAGE = text(
    "INSERT INTO usage (request_id, account_id, key_id, model, prompt_tokens, completion_tokens, cost, status, "
    "latency_ms, estimated, created_at) VALUES (:request_id, :account_id, :key_id, :model, :prompt_tokens, "
    ":completion_tokens, :cost, :status, :latency_ms, :estimated, :now)"
)


_BEAT = text("UPDATE gateways SET heartbeat_at = :now WHERE id = :id")
_FIRST_BEAT = text("INSERT INTO gateways (id, started_at, heartbeat_at) VALUES (:id, :now, :now)")


class Statements(Protocol):
    """One transaction's way to run the per-request statements (SQLite: sqlite3; else: SQLAlchemy)."""

    def __call__(self, statement: TextClause, params: dict[str, Any]) -> Any:
        """Execute one statement; returns a cursor (`rowcount`, `fetchone()`)."""
        ...


def _beat(run: Statements, instance: str) -> None:
    now = _now()
    if run(_BEAT, {"id": instance, "now": now}).rowcount == 0:
        run(_FIRST_BEAT, {"id": instance, "now": now})


def _hold(run: Statements, account_id: int, amount: int, request_id: str, owner: str) -> int | None:
    if run(_TAKE, {"account_id": account_id, "amount": amount}).rowcount == 0:
        return None
    now = _now()
    opened = {"account_id": account_id, "request_id": request_id, "amount": amount, "owner": owner, "now": now}
    hold_id = run(_OPEN_HOLD, opened).fetchone()[0]
    ledger = {"account_id": account_id, "kind": "hold", "amount": -amount, "hold_id": hold_id, "note": request_id}
    run(_LEDGER, {**ledger, "now": now})
    return hold_id


def settle_hold(run: Statements, hold_id: int, charge: int, usage: Usage | None, key_id: int) -> bool:
    now = _now()
    row = run(_CLOSE_HOLD, {"hold_id": hold_id, "now": now}).fetchone()
    if row is None:
        if run(_HOLD_EXISTS, {"hold_id": hold_id}).fetchone() is None:
            raise StoreError(f"no hold {hold_id}")
        return False
    account_id, amount = row
    charge = max(0, min(charge, amount))
    run(_CREDIT, {"account_id": account_id, "delta": amount - charge})
    entry = {"account_id": account_id, "hold_id": hold_id, "note": "", "now": now}
    run(_LEDGER, {**entry, "kind": "release", "amount": amount})
    run(_LEDGER, {**entry, "kind": "charge", "amount": -charge})
    if usage is not None:
        recorded = {
            "request_id": usage.request_id,
            "account_id": account_id,
            "key_id": key_id,
            "model": usage.model,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cost": charge,
            "status": usage.status,
            "latency_ms": usage.latency_ms,
            "estimated": usage.estimated,
            "now": now,
        }
        run(_RECORD_USAGE, recorded)
    return True


def _aware(t: dt.datetime) -> dt.datetime:
    """SQLite returns naive datetimes (stored in UTC)."""
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _asynchronous_commit(conn: Connection, work: Callable[..., T], *args: Any) -> T:
    """PostgreSQL: `work` in a transaction whose commit does not wait for its WAL to reach the disk."""
    conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
    return work(conn.execute, *args)


DEFER_SECONDS = 0.05  # the longest a deferred transaction (a settlement) waits for company to the database thread


class SqliteWriter:
    """SQLite's per-request transactions: one connection, on one thread of its own, driven by sqlite3 directly.
    SQLAlchemy's engine, pool and transaction objects cost more CPU than the statements themselves (about 250 µs
    a transaction here), and every request pays for two. Transactions asked for while others run go to the thread
    together, in one hop (a hop costs about 70 µs of CPU); each is still a transaction of its own. A deferred
    transaction waits up to DEFER_SECONDS for another to go with. Commits don't wait for the disk
    (`synchronous=NORMAL`): the WalFlusher syncs the log soon after."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="llamaserve-sqlite")
        self.connection: sqlite3.Connection | None = None  # opened on the thread, at its first transaction
        self.wal_flusher = WalFlusher(path)
        self.waiting: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []
        self.urgent = False  # a transaction that may not wait is among `waiting`
        self.flush_timer: asyncio.TimerHandle | None = None  # sends deferred transactions that found no company
        self.running: asyncio.Future[list[tuple[bool, Any]]] | None = None  # the batch on the thread now

    async def transaction(self, work: Callable[..., T], *args: Any, defer: bool = False) -> T:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self.waiting.append((work, args, done))
        self.urgent = self.urgent or not defer
        if self.running is None:
            if self.urgent:
                self._send_batch()
            elif self.flush_timer is None:
                self.flush_timer = loop.call_later(DEFER_SECONDS, self._flush)
        return await done

    async def caught_up(self) -> None:
        """Every transaction asked for so far committed (deferred ones sent now)."""
        pending: list[asyncio.Future[Any]] = [done for *_, done in self.waiting]
        if self.running is not None:
            pending.append(self.running)
        if self.waiting:
            self.urgent = True
            if self.running is None:
                self._send_batch()
        if pending:
            await asyncio.wait(pending)

    def _flush(self) -> None:
        self.flush_timer = None
        if self.running is None and self.waiting:
            self._send_batch()

    def _send_batch(self) -> None:
        """Hand every waiting transaction to the thread (on the event loop, as is all the queue's handling)."""
        batch, self.waiting, self.urgent = self.waiting, [], False
        if self.flush_timer is not None:
            self.flush_timer.cancel()
            self.flush_timer = None
        self.running = asyncio.get_running_loop().run_in_executor(
            self.thread, self._run_batch, [(work, args) for work, args, _ in batch]
        )
        self.running.add_done_callback(lambda running: self._batch_done(running, [done for *_, done in batch]))

    def _batch_done(self, running: asyncio.Future[list[tuple[bool, Any]]], waiters: list[asyncio.Future[Any]]) -> None:
        self.running = None
        self.wal_flusher.committed()
        outcomes = running.result() if not running.cancelled() and running.exception() is None else None
        for i, done in enumerate(waiters):
            if done.done():  # its request was cancelled meanwhile
                continue
            if outcomes is None:
                done.set_exception(StoreError("the database thread stopped"))
            elif outcomes[i][0]:
                done.set_result(outcomes[i][1])
            else:
                done.set_exception(outcomes[i][1])
        if self.urgent:
            self._send_batch()
        elif self.waiting and self.flush_timer is None:
            self.flush_timer = asyncio.get_running_loop().call_later(DEFER_SECONDS, self._flush)

    def _run_batch(self, batch: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        for work, args in batch:
            try:
                outcomes.append((True, self._run(work, args)))
            except Exception as e:
                outcomes.append((False, e))
        return outcomes

    def _run(self, work: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self.connection is None:
            self.connection = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            _sqlite_pragmas(self.connection, None)
            self.connection.execute("PRAGMA synchronous=NORMAL")
        connection = self.connection
        connection.execute("BEGIN IMMEDIATE")  # the write lock first: a writer never waits on an upgrade
        try:
            result = work(self._statement, *args)
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return result

    def _statement(self, statement: TextClause, params: dict[str, Any]) -> sqlite3.Cursor:
        assert self.connection is not None
        # Times as SQLAlchemy stores a DateTime on SQLite: UTC clock time, no offset (so they compare as text).
        params = {k: v.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, dt.datetime) else v for k, v in params.items()}
        return self.connection.execute(statement.text, params)

    async def close(self) -> None:
        while self.waiting or self.running is not None:  # deferred settlements: to the database before it closes
            self._flush()
            if self.running is not None:
                await asyncio.wait([self.running])
        await self.wal_flusher.close()
        if self.connection is not None:
            await asyncio.get_running_loop().run_in_executor(self.thread, self.connection.close)
        self.thread.shutdown()


WAL_FLUSH_SECONDS = 0.2


class WalFlusher:
    """Syncs SQLite's write-ahead log to disk at most WAL_FLUSH_SECONDS after a hot-path commit, off the request
    path and off the database thread (an fsync of the log file does not take SQLite's write lock)."""

    def __init__(self, database: str) -> None:
        self.wal = f"{database}-wal"
        self.dirty = False
        self.task: asyncio.Task[None] | None = None

    def committed(self) -> None:
        self.dirty = True
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(WAL_FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        if self.dirty:
            self.dirty = False
            await asyncio.get_running_loop().run_in_executor(None, _fsync, self.wal)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.flush()


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # checkpointed and removed: already on disk
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
