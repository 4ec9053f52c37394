"""Rate limits: both limiters on real time, the Redis one against a real Redis server (LLAMASERVE_TEST_REDIS_URL,
default redis://127.0.0.1:6379/0; skipped when unreachable unless CI is set). Async tests run under anyio's
pytest plugin."""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from llamaserve.api.platform.attempts import MemoryWindowLimiter, RedisWindowLimiter, WindowLimiter
from llamaserve.billing.limits import (
    PLANS,
    Bucket,
    Decision,
    MemoryLimiter,
    Plan,
    RateLimiter,
    RedisLimiter,
    format_reset,
    make_limiter,
)

REDIS_URL = os.environ.get("LLAMASERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
FREE = PLANS["free"]

NewLimiter = Callable[[], RateLimiter]


def require_redis() -> None:
    """Skip without a Redis server, except in CI, where a missing server is a failure."""
    try:
        import redis

        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1) as client:
            client.ping()
    except Exception as e:  # any failure (no package, refused, timeout) means no usable server
        message = f"Redis at {REDIS_URL} unreachable: {e!r}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


async def redis_keys(prefix: str) -> dict[str, int]:
    """The keys under `prefix`, with their remaining time to live in ms."""
    from redis.asyncio import Redis

    async with Redis.from_url(REDIS_URL, decode_responses=True) as client:
        return {key: await client.pttl(key) async for key in client.scan_iter(match=f"{prefix}*")}


async def delete_keys(prefix: str) -> None:
    from redis.asyncio import Redis

    async with Redis.from_url(REDIS_URL) as client:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)


@pytest.fixture
def prefix() -> str:
    # Unique per test so that runs (and parallel runs) never share buckets.
    return f"llamaserve-test:{uuid.uuid4().hex}:"


@pytest.fixture(params=["memory", "redis"])
async def new(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[NewLimiter]:
    """A factory of limiters of the parametrized kind, closed after the test. Limiters from one factory share
    state for Redis (replicas on one server) and not for memory (separate processes)."""
    kind = request.param
    if kind == "redis":
        require_redis()
    made: list[RateLimiter] = []

    def factory() -> RateLimiter:
        made.append(MemoryLimiter() if kind == "memory" else RedisLimiter(REDIS_URL, prefix=prefix))
        return made[-1]

    yield factory
    for limiter in made:
        await limiter.close()
    if kind == "redis":
        await delete_keys(prefix)


def reset_seconds(text: str) -> float:
    """Parses format_reset's output back into seconds."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:([\d.]+)s)?(?:(\d+)ms)?", text)
    assert match and text, text
    hours, minutes, seconds, ms = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds + ms / 1000


@pytest.mark.anyio
async def test_free_plan_allows_five_then_429_headers(new: NewLimiter) -> None:
    limiter = new()
    decisions = [await limiter.acquire("k", FREE, 100) for _ in range(5)]
    assert all(d.allowed and d.retry_after is None for d in decisions)
    assert [d.requests.remaining for d in decisions if d.requests] == [4, 3, 2, 1, 0]
    first = decisions[0].headers()
    assert first["x-ratelimit-limit-requests"] == "5"
    assert first["x-ratelimit-remaining-requests"] == "4"
    assert 11.5 < reset_seconds(first["x-ratelimit-reset-requests"]) <= 12  # one request refills in 12 s
    assert first["x-ratelimit-limit-tokens"] == "40000"
    assert 39_900 <= int(first["x-ratelimit-remaining-tokens"]) <= 39_910
    assert "Retry-After" not in first

    denied = await limiter.acquire("k", FREE, 100)
    assert not denied.allowed
    assert denied.retry_after is not None and 11.5 < denied.retry_after <= 12
    headers = denied.headers()
    assert headers["Retry-After"] == "12"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert 59 < reset_seconds(headers["x-ratelimit-reset-requests"]) <= 60
    assert 39_500 <= int(headers["x-ratelimit-remaining-tokens"]) <= 39_600  # the denial took no tokens

    other = await limiter.acquire("other key", FREE, 100)  # keys are independent
    assert other.allowed and other.requests and other.requests.remaining == 4


@pytest.mark.anyio
async def test_tokens_dimension(new: NewLimiter) -> None:
    plan = Plan("test", requests_per_minute=100, tokens_per_minute=1000)

    limiter = new()
    first = await limiter.acquire("k", plan, 800)
    assert first.allowed and first.tokens and first.tokens.remaining == 200
    assert first.tokens.reset_seconds == pytest.approx(48, abs=0.5)  # 800 tokens at 1000/min

    too_many = await limiter.acquire("k", plan, 300)
    assert not too_many.allowed
    assert too_many.retry_after == pytest.approx(6, abs=0.5)  # 100 more tokens at 1000/min
    assert too_many.requests and too_many.requests.remaining == 99  # no request taken either
    assert too_many.tokens and 200 <= too_many.tokens.remaining <= 210

    assert (await limiter.acquire("k", plan, 200)).allowed  # what remains still passes
    never = await limiter.acquire("k", plan, 1001)
    assert not never.allowed and never.retry_after is None
    assert "Retry-After" not in never.headers()  # waiting cannot help
    assert never.requests and never.requests.remaining == 98


@pytest.mark.anyio
async def test_check_decides_as_acquire_would_and_takes_nothing(new: NewLimiter) -> None:
    plan = Plan("test", requests_per_minute=3, tokens_per_minute=1000)

    limiter = new()
    for _ in range(5):  # checks take nothing: the three requests and the 1000 tokens are all still there
        checked = await limiter.check("k", plan, 1000)
        assert checked.allowed and checked.requests and checked.requests.remaining == 3
    assert (await limiter.acquire("k", plan, 1000)).allowed
    short = await limiter.check("k", plan, 500)  # the tokens are spent: refused, as acquire would refuse it
    assert not short.allowed and short.retry_after == pytest.approx(30, abs=0.5)
    assert short.headers()["x-ratelimit-remaining-requests"] == "2"
    for _ in range(2):
        assert (await limiter.acquire("k", plan, 0)).allowed
    spent = await limiter.check("k", plan, 0)  # the requests are spent: refused, with the wait for one
    assert not spent.allowed and spent.retry_after == pytest.approx(20, abs=0.5)
    assert spent.headers()["Retry-After"] == "20"
    assert not (await limiter.acquire("k", plan, 0)).allowed


@pytest.mark.anyio
async def test_refill(new: NewLimiter) -> None:
    plan = Plan("fast", requests_per_minute=600, tokens_per_minute=None)  # 10 requests a second

    limiter = new()
    allowed = 0
    while (await limiter.acquire("k", plan, 0)).allowed:
        allowed += 1
    assert 600 <= allowed <= 640  # the burst, plus what refilled while draining
    await asyncio.sleep(0.25)
    refilled = 0
    while (await limiter.acquire("k", plan, 0)).allowed:
        refilled += 1
    assert 2 <= refilled <= 4  # 2.5 requests, plus up to one left over from draining


@pytest.mark.anyio
async def test_refund(new: NewLimiter) -> None:
    plan = Plan("tokens only", requests_per_minute=None, tokens_per_minute=1000)

    limiter = new()
    taken = await limiter.acquire("k", plan, 1000)
    assert taken.allowed and taken.requests is None and taken.tokens and taken.tokens.remaining == 0
    assert not (await limiter.acquire("k", plan, 600)).allowed
    await limiter.refund("k", plan, 600)  # e.g. max_tokens was not reached
    assert (await limiter.acquire("k", plan, 600)).allowed

    await limiter.refund("k", plan, 10_000)  # never above capacity
    full = await limiter.acquire("k", plan, 0)
    assert full.tokens and full.tokens.remaining == 1000
    assert (await limiter.acquire("k", plan, 1000)).allowed
    assert not (await limiter.acquire("k", plan, 100)).allowed

    await limiter.refund("new key", plan, 500)  # a key never seen is full already
    fresh = await limiter.acquire("new key", plan, 0)
    assert fresh.tokens and fresh.tokens.remaining == 1000


@pytest.mark.anyio
async def test_unlimited_plan(new: NewLimiter) -> None:
    limiter = new()
    for _ in range(100):
        decision = await limiter.acquire("k", PLANS["unlimited"], 10**9)
        assert decision == Decision(allowed=True, retry_after=None, requests=None, tokens=None)
        assert decision.headers() == {}
    await limiter.refund("k", PLANS["unlimited"], 10)


@pytest.mark.anyio
async def test_concurrent_acquires_are_atomic(new: NewLimiter) -> None:
    limiter = new()
    decisions = await asyncio.gather(*(limiter.acquire("k", FREE, 10) for _ in range(50)))
    assert sum(d.allowed for d in decisions) == 5
    remaining = sorted(d.requests.remaining for d in decisions if d.allowed and d.requests)
    assert remaining == [0, 1, 2, 3, 4]  # each success saw its own take


@pytest.mark.anyio
async def test_negative_tokens_rejected(new: NewLimiter) -> None:
    limiter = new()
    with pytest.raises(ValueError):
        await limiter.acquire("k", FREE, -1)
    with pytest.raises(ValueError):
        await limiter.refund("k", FREE, -1)


@pytest.fixture
async def redis_prefix(prefix: str) -> AsyncIterator[str]:
    """A key prefix on the Redis server, its keys deleted after the test."""
    require_redis()
    yield prefix
    await delete_keys(prefix)


@pytest.mark.anyio
async def test_redis_replicas_share_limits(redis_prefix: str) -> None:
    a, b = RedisLimiter(REDIS_URL, prefix=redis_prefix), RedisLimiter(REDIS_URL, prefix=redis_prefix)
    try:
        decisions = await asyncio.gather(
            *(limiter.acquire("shared", FREE, 10) for _ in range(25) for limiter in (a, b))
        )
        assert sum(d.allowed for d in decisions) == 5
        assert not (await a.acquire("shared", FREE, 10)).allowed
        assert not (await b.acquire("shared", FREE, 10)).allowed
    finally:
        await a.close()
        await b.close()


@pytest.mark.anyio
async def test_redis_keys_are_namespaced_and_expire(redis_prefix: str) -> None:
    limiter = RedisLimiter(REDIS_URL, prefix=redis_prefix)
    try:
        await limiter.acquire("key-1", FREE, 20_000)
        await limiter.acquire("key-1", PLANS["unlimited"], 1)  # unlimited: no keys at all
        ttls = await redis_keys(redis_prefix)
    finally:
        await limiter.close()
    assert set(ttls) == {f"{redis_prefix}{{key-1}}:requests", f"{redis_prefix}{{key-1}}:tokens"}
    # Each vanishes a second after its bucket is full again: 1 request of 5/min in 12 s, 20000 of 40000 tokens/min
    # in 30 s.
    assert 11_000 < ttls[f"{redis_prefix}{{key-1}}:requests"] <= 13_000
    assert 29_000 < ttls[f"{redis_prefix}{{key-1}}:tokens"] <= 31_000


@pytest.mark.anyio
async def test_memory_limiter_exact_arithmetic() -> None:
    now = [1000.0]
    limiter = MemoryLimiter(clock=lambda: now[0])
    plan = Plan("test", requests_per_minute=6, tokens_per_minute=600)  # refills 0.1 request and 10 tokens a second
    for _ in range(6):
        assert (await limiter.acquire("k", plan, 50)).allowed
    denied = await limiter.acquire("k", plan, 50)
    assert denied.retry_after == pytest.approx(10)
    assert denied.requests == Bucket(limit=6, remaining=0, reset_seconds=pytest.approx(60))
    assert denied.tokens == Bucket(limit=600, remaining=300, reset_seconds=pytest.approx(30))
    now[0] += 9.9
    assert (await limiter.acquire("k", plan, 50)).retry_after == pytest.approx(0.1)
    now[0] += 0.1
    assert (await limiter.acquire("k", plan, 400)).allowed  # 300 + 10 s of refill: exactly 400
    now[0] += 61  # idle for a window: swept, and a new bucket is full
    assert (await limiter.acquire("other", plan, 0)).allowed
    assert "k" not in limiter._keys
    assert (await limiter.acquire("k", plan, 600)).allowed


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "250ms"),
        (0.0004, "1ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (12, "12s"),
        (59.9995, "1m0s"),
        (360, "6m0s"),
        (90.25, "1m30.25s"),
        (3600, "1h0m0s"),
        (3725, "1h2m5s"),
    ],
)
def test_format_reset(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_plans_and_factory() -> None:
    assert (FREE.requests_per_minute, FREE.tokens_per_minute) == (5, 40_000)
    assert (PLANS["pro"].requests_per_minute, PLANS["pro"].tokens_per_minute) == (50, 1_000_000)
    assert (PLANS["unlimited"].requests_per_minute, PLANS["unlimited"].tokens_per_minute) == (None, None)
    with pytest.raises(ValueError):
        Plan("broken", requests_per_minute=0, tokens_per_minute=None)
    assert isinstance(make_limiter(None), MemoryLimiter)
    assert isinstance(make_limiter(REDIS_URL), RedisLimiter)  # connects lazily


@pytest.mark.anyio
async def test_plan_change_keeps_buckets(new: NewLimiter) -> None:
    tokens_only = Plan("tokens only", requests_per_minute=None, tokens_per_minute=40_000)
    limiter = new()
    assert (await limiter.acquire("k", tokens_only, 30_000)).allowed
    upgraded = await limiter.acquire("k", FREE, 5_000)  # gains a requests limit: that bucket starts full
    assert upgraded.allowed and upgraded.requests and upgraded.requests.remaining == 4
    assert upgraded.tokens and 5_000 <= upgraded.tokens.remaining <= 5_100  # the tokens taken still count


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_window_limiter_counts_concurrent_events_once(kind: str, prefix: str) -> None:
    """Sign-ups per address (acquire: check and record in one step) and failed log-ins (record, clear): eight
    concurrent sign-ups from one address, through two replicas sharing Redis, let exactly five through."""
    if kind == "redis":
        require_redis()

    def new() -> WindowLimiter:
        return RedisWindowLimiter(REDIS_URL, prefix, 5, 3600.0) if kind == "redis" else MemoryWindowLimiter(5, 3600.0)

    a = new()
    b = new() if kind == "redis" else a  # in memory, replicas share nothing: one process
    try:
        waits = await asyncio.gather(*(limiter.acquire("10.0.0.1") for _ in range(4) for limiter in (a, b)))
        assert sum(w is None for w in waits) == 5, waits
        assert all(3590 < w <= 3600 for w in waits if w is not None), waits
        assert await a.retry_after("10.0.0.2") is None  # another address
        for _ in range(5):
            await b.record("ann\0" + "10.0.0.2")
        assert await a.retry_after("ann\0" + "10.0.0.2") is not None
        await a.clear("ann\0" + "10.0.0.2")
        assert await b.retry_after("ann\0" + "10.0.0.2") is None
    finally:
        await a.close()
        if b is not a:
            await b.close()
        if kind == "redis":
            await delete_keys(prefix)


@pytest.mark.anyio
async def test_deployments_sharing_one_redis_keep_their_buckets_apart() -> None:
    """Account 1 of one database and account 1 of another share no bucket; replicas of one database do, whatever
    password they connect with."""
    from llamaserve.billing.limits import make_limiter
    from llamaserve.config import PlatformConfig

    require_redis()
    one = PlatformConfig(database_url="postgresql+asyncpg://a:secret@db.example:5432/one").redis_namespace
    same = PlatformConfig(database_url="postgresql+asyncpg://b:other@db.example:5432/one").redis_namespace
    other = PlatformConfig(database_url="postgresql+asyncpg://a:secret@db.example:5432/two").redis_namespace
    assert one == same != other and "secret" not in one
    first, replica, second = (make_limiter(REDIS_URL, ns) for ns in (one, same, other))
    try:
        for _ in range(5):
            assert (await first.acquire("account-1", FREE, 1)).allowed
        assert not (await replica.acquire("account-1", FREE, 1)).allowed  # one deployment: one bucket
        assert (await second.acquire("account-1", FREE, 1)).allowed  # another deployment's account 1
    finally:
        for limiter in (first, replica, second):
            await limiter.close()
        for ns in (one, other):
            await delete_keys(f"llamaserve:ratelimit:{ns}:")
