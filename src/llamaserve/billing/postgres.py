"""PostgreSQL's per-request statements (the key check, the hold, the settlement), one round trip each, on asyncpg
directly.

Through SQLAlchemy each was a transaction of several statements (BEGIN, the statements, COMMIT: up to eight
round trips for a settlement) plus its per-statement work, about 5 ms a request in all. Here each is one
statement that PostgreSQL runs as its own transaction: data-modifying CTEs do the conditional balance update,
the hold and ledger rows (or the release, charge, ledger and usage rows) together, so a hold still never
overdraws (the UPDATE re-checks `balance >= amount` on the row it locks) and a settlement still happens once (it
closes only an open hold). The row lock on the account lasts one statement. asyncpg prepares each statement once
per connection; the pool's connections commit without waiting for the disk (`synchronous_commit = off`), as the
transactions they replace did.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any, NamedTuple

import asyncpg
from sqlalchemy.engine import make_url

POOL_SIZE = 16  # connections for the per-request statements; a statement holds one for a round trip
CONNECT_TIMEOUT = 5.0  # seconds; asyncpg's default (60) would hold requests during an outage

KEY_CHECK = """
SELECT k.id AS key_id, k.secret_hash, k.revoked, k.expires_at, k.enabled, k.last_used_at, k.allowed_models,
       a.id AS account_id, a.name AS account_name, a.status, a.plan
FROM api_keys k JOIN accounts a ON a.id = k.account_id
WHERE k.prefix = $1
"""

# $1 account, $2 amount, $3 request id, $4 owner, $5 now. No row: the balance cannot cover the amount.
HOLD = """
WITH taken AS (
    UPDATE accounts SET balance = balance - $2 WHERE id = $1 AND balance >= $2 RETURNING id
), hold AS (
    INSERT INTO holds (account_id, request_id, amount, status, owner, created_at)
    SELECT id, $3, $2, 'open', $4, $5 FROM taken RETURNING id
), ledger AS (
    INSERT INTO ledger (account_id, kind, amount, hold_id, note, created_at)
    SELECT $1, 'hold', -$2::bigint, id, $3, $5 FROM hold
)
SELECT id FROM hold
"""

# $1 hold, $2 charge asked for, $3 now, $4 key; usage: $5 whether to record it, $6 request id, $7 model,
# $8 prompt tokens, $9 completion tokens, $10 status, $11 latency, $12 estimated.
# Returns (settled now, hold exists): the hold's row as it was before this statement is seen by `known`.
SETTLE = """
WITH closed AS (
    UPDATE holds SET status = 'settled', settled_at = $3 WHERE id = $1 AND status = 'open'
    RETURNING account_id, amount, GREATEST(0, LEAST($2::bigint, amount)) AS charge
), credited AS (
    UPDATE accounts SET balance = balance + closed.amount - closed.charge FROM closed
    WHERE accounts.id = closed.account_id
), ledger AS (
    INSERT INTO ledger (account_id, kind, amount, hold_id, note, created_at)
    SELECT account_id, kind, change, $1, '', $3
    FROM closed, LATERAL (VALUES (1, 'release', amount), (2, 'charge', -charge)) AS entry(n, kind, change)
    ORDER BY n
), recorded AS (
    INSERT INTO usage (request_id, account_id, key_id, model, prompt_tokens, completion_tokens, cost, status,
                       latency_ms, estimated, created_at)
    SELECT $6, account_id, $4, $7, $8, $9, charge, $10, $11, $12, $3 FROM closed WHERE $5
)
SELECT EXISTS (SELECT 1 FROM closed) AS settled, EXISTS (SELECT 1 FROM holds WHERE id = $1) AS known
"""


# An idempotency key claimed, or the row that holds it: $1 account, $2 key, $3 request hash, $4 owner, $5 now,
# $6 expires, $7 alive since. `claimed` is the new row's id; else the existing row as it was.
CLAIM_KEY = """
WITH inserted AS (
    INSERT INTO idempotency_keys (account_id, key, request_hash, status, owner, stream, bytes, created_at, expires_at)
    VALUES ($1, $2, $3, 'running', $4, false, 0, $5, $6)
    ON CONFLICT (account_id, key) DO NOTHING RETURNING id
)
SELECT (SELECT id FROM inserted) AS claimed, k.id, k.request_hash, k.status, k.status_code, k.stream, k.response,
       k.owner, k.expires_at <= $5 AS expired,
       (k.owner = $4 OR EXISTS (SELECT 1 FROM gateways g WHERE g.id = k.owner AND g.heartbeat_at >= $7)) AS owner_alive
FROM (SELECT 1) AS one LEFT JOIN idempotency_keys k ON k.account_id = $1 AND k.key = $2
"""
FINISH_KEY = """
UPDATE idempotency_keys SET status = 'done', status_code = $4, stream = $5, response = $6::bytea,
    bytes = length($6::bytea)
WHERE account_id = $1 AND key = $2 AND owner = $3
"""


class KeyRow(NamedTuple):
    """A key and its account, as KEY_CHECK reads them."""

    key_id: int
    secret_hash: str
    revoked: bool
    expires_at: dt.datetime | None
    enabled: bool
    last_used_at: dt.datetime | None
    allowed_models: str | None  # JSON text
    account_id: int
    account_name: str
    status: str
    plan: str


class PostgresRequests:
    """The per-request statements on a pool of asyncpg connections of their own, made at first use."""

    def __init__(self, url: str) -> None:
        self.dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self.dsn,
                        min_size=0,
                        max_size=POOL_SIZE,
                        timeout=CONNECT_TIMEOUT,
                        server_settings={"synchronous_commit": "off"},
                    )
        return self._pool

    async def key(self, prefix: str) -> KeyRow | None:
        row = await (await self.pool()).fetchrow(KEY_CHECK, prefix)
        return KeyRow(**row) if row is not None else None

    async def hold(self, account_id: int, amount: int, request_id: str, owner: str, now: dt.datetime) -> int | None:
        return await (await self.pool()).fetchval(HOLD, account_id, amount, request_id, owner, now)

    async def settle(
        self, hold_id: int, charge: int, key_id: int, now: dt.datetime, usage: tuple[Any, ...] | None
    ) -> tuple[bool, bool]:
        """(settled now, the hold exists). `usage`, in the order of store.Usage's fields: request id, model,
        prompt and completion tokens, status, latency, estimated; None records none."""
        recorded = (True, *usage) if usage is not None else (False, "", "", 0, 0, "", 0, False)
        row = await (await self.pool()).fetchrow(SETTLE, hold_id, charge, now, key_id, *recorded)
        assert row is not None
        return row["settled"], row["known"]

    async def claim_key(self, params: dict[str, Any]) -> asyncpg.Record:
        """CLAIM_KEY's row, for `params` as billing/idempotency.py names them."""
        p = params
        args = (p["account_id"], p["key"], p["request_hash"], p["owner"], p["now"], p["expires"], p["alive_since"])
        row = await (await self.pool()).fetchrow(CLAIM_KEY, *args)
        assert row is not None
        return row

    async def finish_key(self, account_id: int, key: str, owner: str, status: int, stream: bool, body: bytes) -> None:
        await (await self.pool()).execute(FINISH_KEY, account_id, key, owner, status, stream, body)

    async def close(self) -> None:
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 10)
            except TimeoutError:
                self._pool.terminate()
