"""Idempotency keys in the store: a request sent with `Idempotency-Key` is run once per account and key, and its
response kept (for the key's lifetime) so that a retry gets it again instead of running, and paying, twice.

A key's row is claimed by the gateway that runs the request (`running`, with its `owner`), then holds the response
(`done`). Every replica sees it, so a retry may land anywhere. A key whose owner stopped beating (killed
mid-request) is free to be claimed again. Claiming and keeping are one short transaction each, on the store's
per-request path (SQLite's database thread; PostgreSQL without the ORM).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from llamaserve.billing.store import Statements, Store

STORED_BYTES_SECONDS = 10.0  # how long an account's count of stored bytes is taken as it is


class Claimed(enum.Enum):
    RUN = "run"  # this request runs; `finish` or `forget` the key afterwards
    DONE = "done"  # answered before: replay the stored response
    RUNNING = "running"  # another request with the key runs now
    MISMATCH = "mismatch"  # the key was used for a different request


@dataclass(frozen=True)
class Claim:
    outcome: Claimed
    status_code: int = 200  # DONE: the stored response
    stream: bool = False
    response: bytes = b""


_INSERT = text(
    "INSERT INTO idempotency_keys (account_id, key, request_hash, status, owner, stream, bytes, created_at, "
    "expires_at) VALUES (:account_id, :key, :request_hash, 'running', :owner, false, 0, :now, :expires) "
    "ON CONFLICT (account_id, key) DO NOTHING RETURNING id"
)
_FOUND = text(
    "SELECT k.id, k.request_hash, k.status, k.status_code, k.stream, k.response, k.owner, "
    "CASE WHEN k.expires_at <= :now THEN 1 ELSE 0 END AS expired, "
    "CASE WHEN k.owner = :owner OR EXISTS (SELECT 1 FROM gateways g WHERE g.id = k.owner "
    "AND g.heartbeat_at >= :alive_since) THEN 1 ELSE 0 END AS owner_alive "
    "FROM idempotency_keys k WHERE k.account_id = :account_id AND k.key = :key"
)
_DROP = text("DELETE FROM idempotency_keys WHERE id = :id")
_TAKE_OVER = text("UPDATE idempotency_keys SET owner = :owner, created_at = :now WHERE id = :id AND owner = :old")
_FINISH = text(
    "UPDATE idempotency_keys SET status = 'done', status_code = :status_code, stream = :stream, "
    "response = :response, bytes = :bytes WHERE account_id = :account_id AND key = :key AND owner = :owner"
)
_FORGET = text(
    "DELETE FROM idempotency_keys WHERE account_id = :account_id AND key = :key AND owner = :owner "
    "AND status = 'running'"
)
_STORED = text("SELECT sum(bytes) FROM idempotency_keys WHERE account_id = :account_id AND expires_at > :now")
_PURGE = text("DELETE FROM idempotency_keys WHERE expires_at <= :now")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _claim(run: Statements, params: dict[str, Any]) -> Claim:
    for _ in range(2):  # a second time after dropping an expired key
        if run(_INSERT, params).fetchone() is not None:
            return Claim(Claimed.RUN)
        row = run(_FOUND, params).fetchone()
        if row is None:  # deleted between the two (a refused request's key): claim again
            continue
        key_id, request_hash, status, status_code, stream, response, owner, expired, owner_alive = row
        if expired:
            run(_DROP, {"id": key_id})
            continue
        if request_hash != params["request_hash"]:
            return Claim(Claimed.MISMATCH)
        if status == "done":
            return Claim(Claimed.DONE, status_code or 200, bool(stream), bytes(response or b""))
        if not owner_alive:  # its gateway died mid-request: run it here
            taken = run(_TAKE_OVER, {"id": key_id, "owner": params["owner"], "now": params["now"], "old": owner})
            return Claim(Claimed.RUN if taken.rowcount else Claimed.RUNNING)
        return Claim(Claimed.RUNNING)
    return Claim(Claimed.RUNNING)


def _write(run: Statements, statement: Any, params: dict[str, Any]) -> None:
    run(statement, params)


def _stored(run: Statements, params: dict[str, Any]) -> int:
    return int(run(_STORED, params).fetchone()[0] or 0)


class IdempotencyStore:
    def __init__(self, store: Store, lifetime: dt.timedelta, dead_after: dt.timedelta) -> None:
        self.store = store
        self.lifetime = lifetime
        self.dead_after = dead_after
        self._stored: dict[int, tuple[int, float]] = {}  # account → (bytes, when counted)
        self._ended: dict[tuple[int, str], asyncio.Event] = {}  # keys run here that retries here wait for

    async def wait_ended(self, account_id: int, key: str, timeout: float) -> None:
        """Until the request holding the key ends, if it runs in this process; else (or at most) `timeout`."""
        if len(self._ended) > 10_000:  # keys run elsewhere are never ended here: forget them (waiters time out)
            self._ended.clear()
        ended = self._ended.setdefault((account_id, key), asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended.wait(), timeout)

    def _end(self, account_id: int, key: str) -> None:
        ended = self._ended.pop((account_id, key), None)
        if ended is not None:
            ended.set()

    async def claim(self, account_id: int, key: str, request_hash: str) -> Claim:
        """Claim the key for a request whose body hashes to `request_hash`, or say why not."""
        now = _now()
        params = {
            "account_id": account_id,
            "key": key,
            "request_hash": request_hash,
            "owner": self.store.instance,
            "now": now,
            "expires": now + self.lifetime,
            "alive_since": now - self.dead_after,
        }
        postgres = self.store.postgres
        if postgres is not None:  # the usual case in one round trip: claimed, or the row found
            row = await postgres.claim_key(params)
            if row["claimed"] is not None:
                return Claim(Claimed.RUN)
            if row["id"] is not None and not row["expired"]:
                if row["request_hash"] != request_hash:
                    return Claim(Claimed.MISMATCH)
                if row["status"] == "done":
                    return Claim(Claimed.DONE, row["status_code"] or 200, row["stream"], bytes(row["response"]))
                if row["owner_alive"]:
                    return Claim(Claimed.RUNNING)
        try:  # expired, deleted meanwhile, or its gateway dead: the whole rule, in one transaction
            return await self.store.transaction(_claim, params)
        except IntegrityError:  # PostgreSQL: another gateway inserted it meanwhile
            return Claim(Claimed.RUNNING)

    async def finish(self, account_id: int, key: str, status_code: int, stream: bool, response: bytes) -> None:
        """Keep the response of the request that claimed the key."""
        owner = self.store.instance
        try:
            if self.store.postgres is not None:
                await self.store.postgres.finish_key(account_id, key, owner, status_code, stream, response)
                return
            params = {"account_id": account_id, "key": key, "owner": owner, "status_code": status_code}
            params |= {"stream": stream, "response": response, "bytes": len(response)}
            await self.store.transaction(_write, _FINISH, params)
        finally:
            self._end(account_id, key)

    async def forget(self, account_id: int, key: str) -> None:
        """Free the key (the request was refused or failed): a retry runs afresh."""
        params = {"account_id": account_id, "key": key, "owner": self.store.instance}
        try:
            await self.store.transaction(_write, _FORGET, params)
        finally:
            self._end(account_id, key)

    async def stored_bytes(self, account_id: int) -> int:
        """Bytes of responses the account's live keys hold (counted at most every STORED_BYTES_SECONDS)."""
        cached = self._stored.get(account_id)
        if cached is not None and time.monotonic() - cached[1] < STORED_BYTES_SECONDS:
            return cached[0]
        if len(self._stored) > 10_000:
            self._stored.clear()
        stored = await self.store.transaction(_stored, {"account_id": account_id, "now": _now()})
        self._stored[account_id] = (stored, time.monotonic())
        return stored

    async def purge(self) -> None:
        """Delete expired keys (their responses with them)."""
        await self.store.transaction(_write, _PURGE, {"now": _now()})
