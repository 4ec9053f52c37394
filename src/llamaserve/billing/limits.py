"""Per-key rate limits from the account's plan: requests per minute and tokens per minute.

Each limited dimension is a token bucket holding up to its per-minute limit and refilled continuously at limit/60
per second: a key may burst a whole minute's allowance, then passes at the steady rate. A request takes one request
and its tokens from both buckets at once, or nothing. `MemoryLimiter` keeps the buckets in this process;
`RedisLimiter` keeps them in Redis so that gateway replicas share them. The dashboard's limit on failed log-ins
is here too, kept the same two ways.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

WINDOW = 60.0  # seconds: the limits are per minute
# Float slack: a bucket that refilled to 0.9999999999 of a request after 12 s holds one request.
EPS = 1e-9


@dataclass(frozen=True)
class Plan:
    name: str
    requests_per_minute: int | None  # None: no limit
    tokens_per_minute: int | None

    def __post_init__(self) -> None:
        for limit in (self.requests_per_minute, self.tokens_per_minute):
            if limit is not None and limit <= 0:
                raise ValueError(f"plan {self.name!r}: a limit must be positive or None, not {limit}")


PLANS: dict[str, Plan] = {
    "free": Plan("free", requests_per_minute=5, tokens_per_minute=40_000),  # Segmind's free plan: 5 RPM
    "pro": Plan("pro", requests_per_minute=50, tokens_per_minute=1_000_000),
    "unlimited": Plan("unlimited", requests_per_minute=None, tokens_per_minute=None),
}


@dataclass(frozen=True)
class Bucket:
    """One dimension's state after the decision."""

    limit: int
    remaining: int
    reset_seconds: float  # until the bucket is full again


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float | None  # seconds until the request could pass; None: never (it exceeds the limit)
    requests: Bucket | None  # None: that dimension is unlimited
    tokens: Bucket | None

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers, plus Retry-After on a denial that waiting can cure."""
        headers: dict[str, str] = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                headers[f"x-ratelimit-limit-{name}"] = str(bucket.limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(bucket.remaining)
                headers[f"x-ratelimit-reset-{name}"] = format_reset(bucket.reset_seconds)
        if not self.allowed and self.retry_after is not None:
            # Whole seconds, rounded up at millisecond precision so 12.0000001 s stays "12".
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after - 1e-3)))
        return headers


UNLIMITED = Decision(allowed=True, retry_after=None, requests=None, tokens=None)


def format_reset(seconds: float) -> str:
    """A duration as OpenAI writes it (Go's time.Duration, to the millisecond): "250ms", "12s", "1.5s", "6m0s"."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    hours, minutes = divmod(minutes, 60)
    text = f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    return f"{hours}h{text}" if hours else text


class RateLimiter(Protocol):
    async def acquire(self, key: str, plan: Plan, tokens: int) -> Decision:
        """Atomically take 1 request and `tokens` tokens if both are available; otherwise take nothing."""
        ...

    async def check(self, key: str, plan: Plan, tokens: int) -> Decision:
        """The decision `acquire` would make now, taking nothing (for work done before a request is admitted)."""
        ...

    async def refund(self, key: str, plan: Plan, tokens: int) -> None:
        """Give back reserved tokens that were not used; never above capacity."""
        ...

    async def close(self) -> None: ...


# The bucket arithmetic, shared by MemoryLimiter; the Lua script below mirrors it for Redis.


def _refill(level: float, elapsed: float, limit: int | None) -> float:
    # An unlimited dimension reads as infinitely full, so a key whose plan gains that limit starts full.
    if limit is None:
        return math.inf
    return min(float(limit), level + max(0.0, elapsed) * limit / WINDOW)


def _wait(level: float, need: int, limit: int | None) -> float | None:
    """Seconds until the bucket holds `need`; 0 when it does now, None when it never will."""
    if limit is None or level + EPS >= need:
        return 0.0
    if need > limit:
        return None
    return (need - level) * WINDOW / limit


def _retry_after(plan: Plan, tokens: int, requests_level: float, tokens_level: float) -> float | None:
    """0.0 when both buckets can pay now; otherwise the longer wait (None if one never can)."""
    waits = (_wait(requests_level, 1, plan.requests_per_minute), _wait(tokens_level, tokens, plan.tokens_per_minute))
    return None if None in waits else max(w for w in waits if w is not None)


def _bucket(limit: int | None, level: float) -> Bucket | None:
    if limit is None:
        return None
    return Bucket(
        limit=limit, remaining=max(0, math.floor(level + EPS)), reset_seconds=(limit - level) * WINDOW / limit
    )


def _decision(plan: Plan, retry_after: float | None, requests_level: float, tokens_level: float) -> Decision:
    allowed = retry_after == 0.0
    return Decision(
        allowed=allowed,
        retry_after=None if allowed else retry_after,
        requests=_bucket(plan.requests_per_minute, requests_level),
        tokens=_bucket(plan.tokens_per_minute, tokens_level),
    )


def _is_unlimited(plan: Plan, tokens: int) -> bool:
    """Whether the plan limits nothing (validating `tokens` on the way: a negative count would mint tokens)."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, not {tokens}")
    return plan.requests_per_minute is None and plan.tokens_per_minute is None


@dataclass(slots=True)
class _Levels:
    """A key's two bucket levels as of `at` (a new key, or an unlimited dimension, is infinitely full)."""

    requests: float
    tokens: float
    at: float


class MemoryLimiter:
    """Token buckets per key in a dict: the single-process default.

    Atomic within the event loop because acquire and refund never await between reading and writing a bucket.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, _Levels] = {}
        self._swept_at = clock()

    async def acquire(self, key: str, plan: Plan, tokens: int) -> Decision:
        return self._decide(key, plan, tokens, take=True)

    async def check(self, key: str, plan: Plan, tokens: int) -> Decision:
        return self._decide(key, plan, tokens, take=False)

    def _decide(self, key: str, plan: Plan, tokens: int, take: bool) -> Decision:
        if _is_unlimited(plan, tokens):
            return UNLIMITED
        levels = self._levels(key, plan)
        retry_after = _retry_after(plan, tokens, levels.requests, levels.tokens)
        if retry_after == 0.0 and take:
            if plan.requests_per_minute is not None:
                levels.requests = max(0.0, levels.requests - 1)
            if plan.tokens_per_minute is not None:
                levels.tokens = max(0.0, levels.tokens - tokens)
        return _decision(plan, retry_after, levels.requests, levels.tokens)

    async def refund(self, key: str, plan: Plan, tokens: int) -> None:
        if _is_unlimited(plan, tokens) or plan.tokens_per_minute is None or key not in self._keys:
            return  # an absent key is full already
        levels = self._levels(key, plan)
        levels.tokens = min(float(plan.tokens_per_minute), levels.tokens + tokens)

    async def close(self) -> None:
        self._keys.clear()

    def _levels(self, key: str, plan: Plan) -> _Levels:
        """The key's levels refilled to now (a new key starts full)."""
        now = self._clock()
        self._sweep(now)
        levels = self._keys.setdefault(key, _Levels(math.inf, math.inf, now))
        elapsed, levels.at = now - levels.at, now
        levels.requests = _refill(levels.requests, elapsed, plan.requests_per_minute)
        levels.tokens = _refill(levels.tokens, elapsed, plan.tokens_per_minute)
        return levels

    def _sweep(self, now: float) -> None:
        # Any bucket is full again a window after its last use, and a full bucket is the same as none: drop idle
        # keys once a window so the dict does not grow with every key ever seen.
        if now - self._swept_at < WINDOW:
            return
        self._swept_at = now
        for key in [k for k, levels in self._keys.items() if now - levels.at >= WINDOW]:
            del self._keys[key]


# KEYS: the requests bucket, the tokens bucket. ARGV: op ("acquire" | "check" | "refund"), requests limit, tokens
# limit (-1: unlimited), tokens. A bucket is a hash {level, ts}; a missing one is full. The clock is Redis's TIME, so
# replicas with skewed clocks agree. Numbers go back as strings: Redis would truncate Lua numbers to integers.
_SCRIPT = """
local EPS = 1e-9
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local op, rlimit, tlimit, tokens = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])

local function level(key, limit)
  if limit < 0 then return 0 end
  local s = redis.call('HMGET', key, 'level', 'ts')
  if not s[1] then return limit end
  return math.min(limit, tonumber(s[1]) + math.max(0, now - tonumber(s[2])) * limit / 60)
end

local function store(key, limit, lvl)
  if limit < 0 then return end
  redis.call('HSET', key, 'level', lvl, 'ts', now)
  -- Gone once full again (plus a second of slack): a missing bucket reads as full.
  redis.call('PEXPIRE', key, math.ceil((limit - lvl) * 60000 / limit) + 1000)
end

local function wait(lvl, need, limit)
  if limit < 0 or lvl + EPS >= need then return 0 end
  if need > limit then return -1 end
  return (need - lvl) * 60 / limit
end

if op == 'refund' then
  if tlimit >= 0 and redis.call('EXISTS', KEYS[2]) == 1 then
    store(KEYS[2], tlimit, math.min(tlimit, level(KEYS[2], tlimit) + tokens))
  end
  return {}
end

local r, tk = level(KEYS[1], rlimit), level(KEYS[2], tlimit)
local wr, wt = wait(r, 1, rlimit), wait(tk, tokens, tlimit)
local retry = math.max(wr, wt)
if wr < 0 or wt < 0 then retry = -1 end
if retry == 0 and op == 'acquire' then
  r, tk = math.max(0, r - 1), math.max(0, tk - tokens)
  store(KEYS[1], rlimit, r)
  store(KEYS[2], tlimit, tk)
end
return {string.format('%.17g', retry), string.format('%.17g', r), string.format('%.17g', tk)}
"""


def _limit_arg(limit: int | None) -> int:
    return -1 if limit is None else limit


REDIS_TIMEOUT = 2.0  # seconds to connect to Redis or hear back from it: a hung Redis must not hang requests


class LimiterUnavailable(ConnectionError):
    """Redis, which keeps the shared rate limits, is out of reach: nothing can be admitted for now (503, retry)."""


def redis_client(url: str) -> Redis:
    from redis.asyncio import Redis  # imported here: Redis is needed only with --redis-url
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    # One retry at once (a pooled connection Redis dropped), not redis-py's ten with backoff: a request waits at
    # most 2 × REDIS_TIMEOUT for its answer or its 503.
    return Redis.from_url(
        url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT, retry=Retry(NoBackoff(), 1)
    )


async def run_script(script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    try:
        return await script(keys=keys, args=args)
    except (RedisConnectionError, RedisTimeoutError) as e:  # the client reconnects by itself at the next call
        raise LimiterUnavailable(f"Redis is out of reach ({e})") from e


class RedisLimiter:
    """Token buckets in Redis, shared by gateway replicas; one Lua script decides both buckets atomically."""

    def __init__(self, url: str, prefix: str = "llamaserve:ratelimit:") -> None:
        self._redis = redis_client(url)
        self._script = self._redis.register_script(_SCRIPT)  # EVALSHA, loading the script when Redis lacks it
        self._prefix = prefix

    def _keys(self, key: str) -> list[str]:
        # The braces are a Redis Cluster hash tag: both buckets of a key live in one slot, as a script needs.
        return [f"{self._prefix}{{{key}}}:requests", f"{self._prefix}{{{key}}}:tokens"]

    async def _run(self, op: str, key: str, plan: Plan, tokens: int) -> list[bytes]:
        args = [op, _limit_arg(plan.requests_per_minute), _limit_arg(plan.tokens_per_minute), tokens]
        return await run_script(self._script, self._keys(key), args)

    async def acquire(self, key: str, plan: Plan, tokens: int) -> Decision:
        return await self._decide("acquire", key, plan, tokens)

    async def check(self, key: str, plan: Plan, tokens: int) -> Decision:
        return await self._decide("check", key, plan, tokens)

    async def _decide(self, op: str, key: str, plan: Plan, tokens: int) -> Decision:
        if _is_unlimited(plan, tokens):
            return UNLIMITED
        retry, requests_level, tokens_level = (float(x) for x in await self._run(op, key, plan, tokens))
        return _decision(plan, None if retry < 0 else retry, requests_level, tokens_level)

    async def refund(self, key: str, plan: Plan, tokens: int) -> None:
        if not _is_unlimited(plan, tokens) and plan.tokens_per_minute is not None:
            await self._run("refund", key, plan, tokens)

    async def close(self) -> None:
        await self._redis.aclose()


def make_limiter(redis_url: str | None, namespace: str = "") -> RateLimiter:
    """The in-process limiter by default; a Redis one (shared across replicas) when given --redis-url, its keys
    under `namespace` (a deployment's, so that deployments sharing one Redis keep their buckets apart)."""
    if not redis_url:
        return MemoryLimiter()
    return RedisLimiter(
        redis_url, prefix=f"llamaserve:ratelimit:{namespace}:" if namespace else "llamaserve:ratelimit:"
    )
