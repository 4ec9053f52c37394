"""Admission: whether a request may run, and what it costs once it has.

One pipeline for every endpoint and backend, in the order a hosted API answers (the seeds' error codes): the
key authenticated (401/403, by the route) → the model allowed for the key (403, by the model directory) → the
rate limits (429, `Gate.check` before costly work, `Gate.admit` to take them) → the worst-case cost held (402,
`Admission.hold`) → generate → `Admission.settle`: the real cost charged and the rest released, in one
transaction, whether the request finished, failed, timed out or lost its client. No HTTP here: a route hands
over a `Call`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from llamaserve.billing.limits import PLANS, UNLIMITED, Decision, Plan, RateLimiter
from llamaserve.billing.pricing import Price, format_credits
from llamaserve.billing.store import Caller, Store, Usage, database_unavailable
from llamaserve.engine import RequestHandle
from llamaserve.protocol.errors import APIError

log = logging.getLogger(__name__)
AUTH_CACHE_SECONDS = 5.0
SHORT_OF_CREDITS_SECONDS = 60.0  # after a 402, the account's requests wait for their hold before going upstream
# Waits between tries of a settlement the database could not take: one back within a minute still gets it.
SETTLE_RETRY_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
HEARTBEAT_SECONDS = 2.0  # how often a gateway says it is alive (the owner of its holds)
DEAD_AFTER = dt.timedelta(seconds=10)  # a gateway silent this long is dead: its holds are released
DRAIN_SECONDS = 10.0  # at shutdown, how long settlements still trying may take before they are left to the sweep


@dataclass
class Platform:
    store: Store
    limiter: RateLimiter
    price: Price
    request_timeout: float  # seconds a request may run before it gets 504
    admin_key: str | None = None  # guards /admin/...; None: admin API off
    max_concurrent_per_account: int = 128  # inference requests one account may have open at once (streams too)
    stale_after: dt.timedelta = dt.timedelta(hours=1)  # a hold older than this belongs to no live request
    active: Counter[int] = field(default_factory=Counter)  # open inference requests by key id
    settling: set[asyncio.Task[None]] = field(default_factory=set)  # settlements in flight (awaited at shutdown)
    # Recently authenticated keys (by the key's hash, never the key), so a busy key costs no query per request.
    # A key disabled elsewhere (CLI, another replica) takes effect within AUTH_CACHE_SECONDS; the admin API of
    # this process clears the cache at once.
    auth_cache: dict[str, tuple[Caller, float]] = field(default_factory=dict)
    short_of_credits: dict[int, float] = field(default_factory=dict)  # account id → until (monotonic)

    async def authenticate(self, presented: str) -> Caller:
        digest = hashlib.sha256(presented.encode()).hexdigest()
        cached = self.auth_cache.get(digest)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        caller = await self.store.authenticate(presented)
        if len(self.auth_cache) > 10_000:
            self.auth_cache.clear()
        self.auth_cache[digest] = (caller, now + AUTH_CACHE_SECONDS)
        return caller

    async def keep_alive(self) -> None:
        """Beat every HEARTBEAT_SECONDS and release the holds of gateways that stopped beating (killed, crashed),
        charging nothing. This process sweeps only once its own beats have gone through for DEAD_AFTER without a
        gap: after a database outage every gateway missed beats, and live ones must have beaten again first."""
        steady_since = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await self.store.heartbeat()
                if time.monotonic() - steady_since >= DEAD_AFTER.total_seconds():
                    released = await self.store.release_stale_holds(self.stale_after, DEAD_AFTER)
                    if released:
                        log.warning("released %d credit holds of gateways that stopped", released)
            except Exception as e:  # the database out of reach: beat again next time
                log.warning("heartbeat failed: %s", e)
                steady_since = time.monotonic()

    def plan(self, name: str) -> Plan:
        return PLANS.get(name, PLANS["free"])

    async def drain(self) -> None:
        if self.settling:
            await asyncio.wait(self.settling, timeout=DRAIN_SECONDS)


# `llamaserve engine` serves without accounts (a gateway in front does the accounting): everyone is this caller.
ANONYMOUS = Caller(key_id=0, key_prefix="", account_id=0, account_name="", plan="unlimited", allowed_models=None)


async def never_disconnects() -> None:
    """`Call.disconnected` of a request whose client does not stop it: a batch line, or one sent with an
    Idempotency-Key (its retry gets the whole answer)."""
    await asyncio.Event().wait()


@dataclass
class Call:
    """One inference request as serving sees it, with HTTP left behind in the route: who asked, its id, and how
    to tell that its client has gone."""

    caller: Caller
    request_id: str
    disconnected: Callable[[], Awaitable[None]]  # returns once the client has closed the connection
    # Set when the server stops while the request runs (its drain ran out): the request ends now, with a 503
    # or, once streaming, a `shutting_down` error event.
    server_stopping: asyncio.Event = field(default_factory=asyncio.Event)
    admission: Admission | None = None  # once admitted: the access log's model, backend, tokens and outcome
    # A batch line's discount off the model's price; None: a live request. A batch line counts against no live
    # rate limit, and its settlement is handed to the batch runner (`Admission.handed_over`), which writes it
    # in one transaction with the line's output.
    batch_discount: float | None = None


def check_model_allowed(caller: Caller, model_id: str) -> None:
    if caller.allowed_models is not None and model_id not in caller.allowed_models:
        raise APIError(
            403,
            f"this API key may not use model {model_id!r} (allowed: {', '.join(caller.allowed_models)})",
            type="permission_error",
            param="model",
            code="model_not_allowed",
        )


@dataclass
class Admission:
    """One admitted request: its rate-limit headers and its credit hold, until settled. Without a platform
    (an engine without accounts) there is nothing to hold or settle."""

    platform: Platform | None
    caller: Caller
    request_id: str
    model_id: str
    prompt_tokens: int
    reserved_tokens: int  # completion tokens the hold and the token limit were sized for
    hold_id: int
    decision: Decision
    price: Price | None = None  # the model's; None: the platform's default
    hold_amount: int = 0
    started: float = field(default_factory=time.monotonic)
    settled: bool = False
    estimated: bool = False  # the settled token counts are an estimate (an upstream that reported no usage)
    status: str | None = None  # set to force a status (timeout, error) when settling
    # For the access log and the request metrics (read when the response has ended):
    backend: str | None = None  # "local", or the upstream's URL once one answered
    first_token_at: float | None = None  # perf_counter of the first token
    completion_tokens: int | None = None  # known once finished
    outcome: str | None = None  # the settled status: ok, cancelled, error, timeout, rejected
    holding: asyncio.Task[None] | None = None  # the hold being placed beside the upstream call (hold_beside)
    # A batch line's: its settlement (charge, usage) once it has ended, for the batch runner to write.
    handed_over: asyncio.Future[tuple[int, Usage]] | None = None

    @property
    def headers(self) -> dict[str, str]:
        return self.decision.headers()

    @property
    def timeout(self) -> float | None:
        return self.platform.request_timeout if self.platform else None

    @property
    def short_of_credits(self) -> bool:
        """Whether this account was refused for credits a moment ago (so its next hold will likely fail too)."""
        return self.platform is not None and self.platform.short_of_credits.get(self.caller.account_id, 0) > (
            time.monotonic()
        )

    @contextlib.contextmanager
    def hold_beside(self) -> Iterator[None]:
        """Place the hold (in a task of its own) while the body of this `with` waits for the upstream. A hold that
        fails (402, database out of reach) cancels that wait; the failure is then raised here, and by `hold()`.
        The task's first step comes at the loop's next turn: after the body's first write."""
        task = asyncio.current_task()
        assert task is not None
        holding = self.holding = asyncio.get_running_loop().create_task(self._place_hold())
        waiting = True

        def stop_waiting(hold: asyncio.Task[None]) -> None:
            if waiting and not hold.cancelled() and hold.exception() is not None:
                task.cancel()

        holding.add_done_callback(stop_waiting)
        try:
            yield
        except asyncio.CancelledError:
            failure = holding.exception() if holding.done() and not holding.cancelled() else None
            if failure is None:
                raise
            task.uncancel()  # the cancellation was ours: the hold's failure is the answer
            raise failure from None
        finally:
            waiting = False

    async def hold(self) -> None:
        """Hold the worst-case cost (402 if the balance cannot cover it, the rate limit's tokens given back);
        after `hold_beside`, wait for that hold (or raise its failure)."""
        if self.holding is not None:
            await self.holding
        else:
            await self._place_hold()

    async def _place_hold(self) -> None:
        platform = self.platform
        if platform is None:
            return
        assert self.price is not None
        self.hold_amount = self.price.cost(self.prompt_tokens, self.reserved_tokens)
        hold_id = await platform.store.hold(self.caller.account_id, self.hold_amount, self.request_id)
        if hold_id is None:
            if self.handed_over is None:  # a live request: its rate-limit tokens back, its account's next wait
                platform.short_of_credits[self.caller.account_id] = time.monotonic() + SHORT_OF_CREDITS_SECONDS
                plan = platform.plan(self.caller.plan)
                await platform.limiter.refund(self.caller.limit_key, plan, self.prompt_tokens + self.reserved_tokens)
            balance = (await platform.store.account_by_id(self.caller.account_id)).balance
            raise APIError(
                402,
                f"Insufficient credits: this request may cost up to {format_credits(self.hold_amount)} credits "
                f"(prompt + max_tokens × n) and the balance is {format_credits(balance)}; add credits or lower "
                "max_tokens",
                type="insufficient_credits",
                code="insufficient_credits",
                headers=self.headers,
            )
        self.hold_id = hold_id
        if self.handed_over is None:  # batch lines do not count against the live concurrency cap
            platform.active[self.caller.account_id] += 1  # until settled

    def settle_on_close(self, handles: list[RequestHandle]) -> None:
        """Settle once every handle has closed (finished, failed, or cancelled by a departed client)."""
        open_handles = set(range(len(handles)))

        def closed(i: int) -> None:
            open_handles.discard(i)
            if not open_handles:
                self._settle_handles(handles)

        for i, handle in enumerate(handles):
            handle.on_close = lambda i=i: closed(i)

    def _settle_handles(self, handles: list[RequestHandle]) -> None:
        completion = sum(h.completion_tokens for h in handles)
        firsts = [h.first_token_at for h in handles if h.first_token_at is not None]
        self.first_token_at = min(firsts, default=None)
        status = "error" if any(h.failed for h in handles) else "ok" if all(h.done for h in handles) else "cancelled"
        self.settle(completion, status)

    def settle(
        self, completion_tokens: int, status: str, prompt_tokens: int | None = None, estimated: bool = False
    ) -> None:
        """Settle in the background (once): charge `completion_tokens` and the prompt (the real count if known
        now, else the one admitted), release the rest of the hold. `estimated`: the counts are an estimate."""
        if self.settled:
            return
        if self.holding is not None and not self.holding.done():  # settled once the hold is in (or refused)
            self.holding.add_done_callback(lambda _: self.settle(completion_tokens, status, prompt_tokens, estimated))
            return
        self.settled, self.estimated = True, estimated
        if prompt_tokens is not None:
            self.prompt_tokens = prompt_tokens
        self.completion_tokens, self.outcome = completion_tokens, self.status or status
        if self.platform is None or not self.hold_id:  # nothing held: nothing to settle
            return
        if self.handed_over is not None:
            if not self.handed_over.done():
                self.handed_over.set_result(self._settlement(completion_tokens, self.status or status))
            return
        self.platform.active[self.caller.account_id] -= 1
        if not self.platform.active[self.caller.account_id]:
            del self.platform.active[self.caller.account_id]
        task = asyncio.get_running_loop().create_task(self._charge(completion_tokens, self.status or status))
        self.platform.settling.add(task)
        task.add_done_callback(self.platform.settling.discard)

    def _settlement(self, completion_tokens: int, status: str) -> tuple[int, Usage]:
        """What to charge (at most the hold) and the usage record."""
        assert self.platform is not None
        # A request the engine refused (e.g. a prompt longer than the context) computed nothing: it costs nothing.
        price = self.price or self.platform.price
        charge = 0 if status == "rejected" else price.cost(self.prompt_tokens, completion_tokens)
        if charge > self.hold_amount:  # the store charges at most the hold: say loudly that the bound was short
            log.warning(
                "request %s used %d micro-credits, more than its hold of %d; charged the hold",
                self.request_id,
                charge,
                self.hold_amount,
            )
        latency_ms = int((time.monotonic() - self.started) * 1000)
        usage = Usage(
            self.request_id, self.model_id, self.prompt_tokens, completion_tokens, status, latency_ms, self.estimated
        )
        return min(charge, self.hold_amount), usage

    async def _charge(self, completion_tokens: int, status: str) -> None:
        platform = self.platform
        assert platform is not None
        charge, usage = self._settlement(completion_tokens, status)
        try:
            await self._write_settlement(charge, usage)
            unused = self.reserved_tokens - completion_tokens
            if unused > 0:
                await platform.limiter.refund(self.caller.limit_key, platform.plan(self.caller.plan), unused)
        except Exception:  # the hold stays open and the sweep releases it, uncharged; say so loudly
            log.exception("could not settle hold %s of request %s", self.hold_id, self.request_id)

    async def _write_settlement(self, charge: int, usage: Usage) -> None:
        """Settle in the store, trying again while the database is out of reach. Safe to repeat: a settlement
        that committed although its answer was lost is found settled and not charged twice."""
        assert self.platform is not None
        for wait in (*SETTLE_RETRY_SECONDS, None):
            try:
                await self.platform.store.settle(self.hold_id, charge, usage, self.caller.key_id)
                return
            except Exception as e:
                if wait is None or not database_unavailable(e):
                    raise
                log.warning("settling hold %s: database unavailable (%s); retrying in %gs", self.hold_id, e, wait)
                await asyncio.sleep(wait)


class Gate:
    """Admission, one pipeline for every endpoint and backend: the key's model allowed (403, when the model
    directory resolves a name), its rate limits (429), the worst-case cost held (402); then `Admission.settle`
    charges what was used. Without a platform (`llamaserve engine`) everyone is admitted and nothing is held."""

    def __init__(self, platform: Platform | None) -> None:
        self.platform = platform

    async def authenticate(self, token: str) -> Caller:
        """The caller a presented key belongs to (AuthError if none); everyone, without a platform."""
        return ANONYMOUS if self.platform is None else await self.platform.authenticate(token)

    async def check(self, caller: Caller, tokens: int) -> None:
        """429 now if the key's rate limits could not take a request of `tokens`, taking nothing from them: so
        that a key over its limits gets no work done (images fetched, prompts rendered) before `admit` refuses
        it."""
        if self.platform is None:
            return
        plan = self.platform.plan(caller.plan)
        decision = await self.platform.limiter.check(caller.limit_key, plan, tokens)
        if not decision.allowed:
            raise _rate_limited(plan, tokens, decision)

    async def count(self, caller: Caller) -> None:
        """Take one of the key's requests a minute for work that generates nothing (tokenizing): 429 when
        spent."""
        if self.platform is not None:
            await _acquire(self.platform, caller, 0)

    async def admit(
        self,
        call: Call,
        model_id: str,
        prompt_tokens: int,
        completion_tokens: int,
        price: Price | None = None,
        hold: bool = True,
    ) -> Admission:
        """Rate limit (429) and hold the worst-case cost (402) for a request of `prompt_tokens` that may generate
        up to `completion_tokens` in all its choices. With `hold=False` the caller holds later (`hold_beside`)."""
        caller, platform = call.caller, self.platform
        if platform is None:
            call.admission = Admission(
                None, caller, call.request_id, model_id, prompt_tokens, completion_tokens, 0, UNLIMITED
            )
            return call.admission
        if call.batch_discount is not None:  # a batch line: no live limits; the discounted price
            decision, price = UNLIMITED, (price or platform.price).discounted(call.batch_discount)
        else:
            if platform.active[caller.account_id] >= platform.max_concurrent_per_account:
                raise APIError(
                    429,
                    f"Too many concurrent requests: this account has {platform.max_concurrent_per_account} open, "
                    "the most allowed; wait for one to finish",
                    type="rate_limit_error",
                    code="too_many_concurrent_requests",
                    headers={"Retry-After": "1"},
                )
            decision = await _acquire(platform, caller, prompt_tokens + completion_tokens)
        admission = Admission(
            platform,
            caller,
            call.request_id,
            model_id,
            prompt_tokens,
            completion_tokens,
            0,
            decision,
            price or platform.price,
        )
        if call.batch_discount is not None:
            admission.handed_over = asyncio.get_running_loop().create_future()
        call.admission = admission
        if hold:
            await admission.hold()
        return admission


async def _acquire(platform: Platform, caller: Caller, tokens: int) -> Decision:
    """Take a request and `tokens` from the key's rate limits, or 429."""
    plan = platform.plan(caller.plan)
    decision = await platform.limiter.acquire(caller.limit_key, plan, tokens)
    if not decision.allowed:
        raise _rate_limited(plan, tokens, decision)
    return decision


def _rate_limited(plan: Plan, tokens: int, decision: Decision) -> APIError:
    if decision.retry_after is None:
        message = (
            f"Request too large: {tokens} tokens (prompt + max_tokens × n) exceed the {plan.tokens_per_minute} "
            f"tokens per minute of plan {plan.name!r}; lower max_tokens"
        )
    else:
        message = f"Rate limit reached for plan {plan.name!r}; retry in {decision.retry_after:.1f}s"
    return APIError(429, message, type="rate_limit_error", code="rate_limit_exceeded", headers=decision.headers())
