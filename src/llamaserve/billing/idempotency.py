"""Idempotency keys in the store: a request sent with `Idempotency-Key` is run once per account and key, and its
response kept (for the key's lifetime) so that a retry gets it again instead of running, and paying, twice.

A key's row is claimed by the gateway that runs the request (`running`, with its `owner`), then holds the response
(`done`). Every replica sees it, so a retry may land anywhere. A key whose owner stopped beating (killed
mid-request) is free to be claimed again.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from llamaserve.billing.models import Gateway, IdempotencyRecord
from llamaserve.billing.store import Store


class Claimed(enum.Enum):
    RUN = "run"  # this request runs; `finish` or `forget` the key afterwards
    DONE = "done"  # answered before: replay the stored response
    RUNNING = "running"  # another request with the key runs now
    MISMATCH = "mismatch"  # the key was used for a different request


@dataclass(frozen=True)
class Claim:
    outcome: Claimed
    record: IdempotencyRecord | None = None  # DONE: the stored response


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


class IdempotencyStore:
    def __init__(self, store: Store, lifetime: dt.timedelta, dead_after: dt.timedelta) -> None:
        self.store = store
        self.lifetime = lifetime
        self.dead_after = dead_after

    async def claim(self, account_id: int, key: str, request_hash: str) -> Claim:
        """Claim the key for a request whose body hashes to `request_hash`, or say why not."""
        now = _now()
        owner = self.store.instance
        try:
            async with self.store.write() as s:
                found = (
                    select(IdempotencyRecord)
                    .where(IdempotencyRecord.account_id == account_id, IdempotencyRecord.key == key)
                    .with_for_update()
                )
                record = await s.scalar(found)
                if record is not None and _aware(record.expires_at) <= now:
                    await s.delete(record)
                    await s.flush()
                    record = None
                if record is None:
                    s.add(
                        IdempotencyRecord(
                            account_id=account_id,
                            key=key,
                            request_hash=request_hash,
                            status="running",
                            owner=owner,
                            stream=False,
                            bytes=0,
                            created_at=now,
                            expires_at=now + self.lifetime,
                        )
                    )
                    return Claim(Claimed.RUN)
                if record.request_hash != request_hash:
                    return Claim(Claimed.MISMATCH)
                if record.status == "done":
                    return Claim(Claimed.DONE, record)
                if not await self._alive(s, record.owner, now):  # its gateway died mid-request: run it here
                    record.owner, record.created_at = owner, now
                    return Claim(Claimed.RUN)
                return Claim(Claimed.RUNNING)
        except IntegrityError:  # another gateway inserted the key between our read and our insert
            return Claim(Claimed.RUNNING)

    async def _alive(self, s: object, owner: str | None, now: dt.datetime) -> bool:
        if owner is None or owner == self.store.instance:
            return True
        beat = await s.scalar(select(Gateway.heartbeat_at).where(Gateway.id == owner))  # type: ignore[attr-defined]
        return beat is not None and _aware(beat) >= now - self.dead_after

    async def finish(self, account_id: int, key: str, status_code: int, stream: bool, response: bytes) -> None:
        """Keep the response of the request that claimed the key."""
        async with self.store.write() as s:
            await s.execute(
                update(IdempotencyRecord)
                .where(
                    IdempotencyRecord.account_id == account_id,
                    IdempotencyRecord.key == key,
                    IdempotencyRecord.owner == self.store.instance,
                )
                .values(status="done", status_code=status_code, stream=stream, response=response, bytes=len(response))
            )

    async def forget(self, account_id: int, key: str) -> None:
        """Free the key (the request was refused or failed): a retry runs afresh."""
        async with self.store.write() as s:
            await s.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.account_id == account_id,
                    IdempotencyRecord.key == key,
                    IdempotencyRecord.owner == self.store.instance,
                    IdempotencyRecord.status == "running",
                )
            )

    async def stored_bytes(self, account_id: int) -> int:
        """Bytes of responses the account's live keys hold."""
        now = _now()
        async with self.store.read() as s:
            total = await s.scalar(
                select(func.sum(IdempotencyRecord.bytes)).where(
                    IdempotencyRecord.account_id == account_id, IdempotencyRecord.expires_at > now
                )
            )
        return int(total or 0)

    async def purge(self) -> int:
        """Delete expired keys (their responses with them)."""
        async with self.store.write() as s:
            result = await s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.expires_at <= _now()))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
