"""The dashboard's limits on what a client may try: events per key (a client address, an email and address) in a
sliding window, for failed log-ins and sign-ups. `MemoryWindowLimiter` keeps them in this process,
`RedisWindowLimiter` in Redis, shared by gateway replicas."""

from __future__ import annotations

import hashlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from llamaserve.billing.limits import redis_client, run_script


class WindowLimiter(Protocol):
    """Events per key (a client address, an email and address) in a sliding window: once `limit` of them fall
    within `window` seconds, that key waits until the oldest is `window` old."""

    limit: int
    window: float

    async def retry_after(self, key: str) -> float | None:
        """Seconds until `key` may act again, or None if it may now."""
        ...

    async def acquire(self, key: str) -> float | None:
        """retry_after, and when it is None, record the event, in one step (concurrent callers cannot all pass)."""
        ...

    async def record(self, key: str) -> None: ...

    async def clear(self, key: str) -> None: ...

    async def close(self) -> None: ...


LOGIN_FAILURES, LOGIN_WINDOW = 5, 300.0  # failed log-ins per (email, address) in 5 minutes
SIGNUPS, SIGNUP_WINDOW = 5, 3600.0  # sign-ups per client address in an hour


@dataclass
class MemoryWindowLimiter:
    """In this process: the single-process default."""

    limit: int
    window: float
    events: dict[str, deque[float]] = field(default_factory=dict)

    async def retry_after(self, key: str) -> float | None:
        times = self.events.get(key)
        now = time.monotonic()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times or len(times) < self.limit:
            return None
        return times[0] + self.window - now

    async def acquire(self, key: str) -> float | None:
        wait = await self.retry_after(key)  # no await inside: nothing runs between the check and the record
        if wait is None:
            await self.record(key)
        return wait

    async def record(self, key: str) -> None:
        if len(self.events) > 100_000:  # bound the memory an address-spraying attacker can make us use
            self.events.clear()
        self.events.setdefault(key, deque()).append(time.monotonic())

    async def clear(self, key: str) -> None:
        self.events.pop(key, None)

    async def close(self) -> None:
        self.events.clear()


# KEYS: the key's sorted set of event times. ARGV: op ("check" | "acquire" | "record" | "clear"), limit,
# window (s).
# Redis's TIME is the clock, as for the rate limits; the set expires a window after its last event.
_WINDOW_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local op, limit, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if op == 'clear' then
  redis.call('DEL', KEYS[1])
  return ''
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if op == 'record' then
  redis.call('ZADD', KEYS[1], now, string.format('%.6f', now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
  return ''
end
if redis.call('ZCARD', KEYS[1]) < limit then
  if op == 'acquire' then
    redis.call('ZADD', KEYS[1], now, string.format('%.6f', now))
    redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
  end
  return ''
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
return string.format('%.17g', tonumber(oldest) + window - now)
"""


class RedisWindowLimiter:
    """In Redis, shared by gateway replicas (else each replica would allow its own `limit`). Keys are stored
    hashed: no email or address in Redis."""

    def __init__(self, url: str, prefix: str, limit: int, window: float) -> None:
        self._redis = redis_client(url)
        self._script = self._redis.register_script(_WINDOW_SCRIPT)
        self._prefix, self.limit, self.window = prefix, limit, window

    async def _run(self, op: str, key: str) -> bytes:
        hashed = self._prefix + hashlib.sha256(key.encode()).hexdigest()
        return await run_script(self._script, [hashed], [op, self.limit, self.window])

    async def retry_after(self, key: str) -> float | None:
        wait = await self._run("check", key)
        return float(wait) if wait else None

    async def acquire(self, key: str) -> float | None:
        wait = await self._run("acquire", key)
        return float(wait) if wait else None

    async def record(self, key: str) -> None:
        await self._run("record", key)

    async def clear(self, key: str) -> None:
        await self._run("clear", key)

    async def close(self) -> None:
        await self._redis.aclose()


def make_window_limiter(redis_url: str | None, name: str, limit: int, window: float) -> WindowLimiter:
    """In-process by default; in Redis (shared across replicas, under llamaserve:<name>:) given --redis-url."""
    if redis_url:
        return RedisWindowLimiter(redis_url, f"llamaserve:{name}:", limit, window)
    return MemoryWindowLimiter(limit, window)
