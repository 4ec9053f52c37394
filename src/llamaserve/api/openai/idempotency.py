"""`Idempotency-Key`: a POST that creates work, sent again with the same key and body, is answered with the first
response (status and body; a stream as the same stream) and `Idempotent-Replayed: true`, and is not charged
again. The key's response is kept in the store for `--idempotency-hours`, so any replica answers the retry.

The semantics chosen:
- the same key with a different body (or on another endpoint) is a 400 naming the header;
- a retry while the first request still runs waits for it (polling the store, bounded by the request timeout),
  then gets its response; past the bound, 409 with `Retry-After`;
- a request refused or failed (any 4xx or 5xx) keeps nothing: a corrected retry runs;
- a client that leaves mid-way does not stop the request: with a key, its generation runs to its end, is charged
  once, and is kept for the retry (without a key, leaving cancels it, as always).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.responses import Response

from llamaserve.api.openai.calls import respond
from llamaserve.billing.idempotency import Claimed, IdempotencyStore
from llamaserve.protocol.errors import APIError, invalid
from llamaserve.serving.admission import Call, never_disconnects
from llamaserve.serving.reply import Reply, run_after

log = logging.getLogger(__name__)
HEADER = "Idempotency-Key"
MAX_KEY = 255
POLL_SECONDS = 0.25  # how often a retry looks again for a first request running on another replica
STORED_BYTES_PER_ACCOUNT = 256 * 1024 * 1024  # responses an account's live keys may hold
REPLAYED = {"Idempotent-Replayed": "true"}


async def idempotent(
    request: Request, call: Call, serve: Callable[[], Awaitable[Reply]], content: bytes | None = None
) -> Response:
    """`serve()`'s reply as a response; with an Idempotency-Key, at most once per key (see the module). `content`:
    what identifies the request when its body is no JSON (an upload), else the JSON body does."""
    key = request.headers.get(HEADER)
    keys: IdempotencyStore | None = getattr(request.app.state, "idempotency", None)
    if key is None or keys is None:
        return respond(await serve(), call)
    if not 0 < len(key) <= MAX_KEY or not key.isprintable() or not key.isascii():
        raise invalid(f"{HEADER} must be 1 to {MAX_KEY} printable ASCII characters", HEADER)
    account = call.caller.account_id
    digest = await _request_hash(request, content)
    platform = request.app.state.gate.platform
    deadline = time.monotonic() + (platform.request_timeout if platform is not None else 600)
    while True:
        claim = await keys.claim(account, key, digest)
        if claim.outcome is Claimed.RUN:
            break
        if claim.outcome is Claimed.MISMATCH:
            raise invalid(
                f"this {HEADER} was used with a different request (body or endpoint); use a new key",
                HEADER,
                code="idempotency_key_reused",
            )
        if claim.outcome is Claimed.DONE:
            return _replay(claim.status_code, claim.stream, claim.response)
        if time.monotonic() > deadline:
            raise APIError(
                409,
                f"a request with this {HEADER} is still running; retry when it has ended",
                code="idempotency_key_in_use",
                headers={"Retry-After": "1"},
            )
        await keys.wait_ended(account, key, POLL_SECONDS)  # woken at once when the first runs in this process
    if await keys.stored_bytes(account) > STORED_BYTES_PER_ACCOUNT:
        await keys.forget(account, key)
        raise APIError(
            429,
            f"this account's idempotency keys hold {STORED_BYTES_PER_ACCOUNT} bytes of responses, the most kept; "
            "send without the header, or wait for keys to expire",
            type="rate_limit_error",
            code="idempotency_storage_full",
            headers={"Retry-After": "60"},
        )
    call.disconnected = never_disconnects  # with a key, a client that leaves does not stop the work: the retry gets it
    try:
        reply = await serve()
    except BaseException:
        await keys.forget(account, key)
        raise
    if reply.events is None:
        assert reply.body is not None
        await _keep(keys, account, key, False, json.dumps(reply.body, ensure_ascii=False).encode())
        return respond(reply, call)
    return _teed(request, reply, keys, account, key, call)


async def _keep(keys: IdempotencyStore, account: int, key: str, stream: bool, response: bytes) -> None:
    """Keep the response for retries. If the store cannot take it, the answer still goes out, and the key is
    freed so that a retry is not left waiting (it runs again)."""
    try:
        await keys.finish(account, key, 200, stream, response)
    except Exception:
        log.exception("could not keep the response of an Idempotency-Key; its key is freed")
        with contextlib.suppress(Exception):
            await keys.forget(account, key)


async def _request_hash(request: Request, content: bytes | None) -> str:
    """The request as sent: its path and its JSON body, keys sorted (the same body in another layout is the same)."""
    canonical = content
    if canonical is None:
        raw = await request.body()
        try:
            canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
        except ValueError:
            canonical = raw
    return hashlib.sha256(request.url.path.encode() + b"\n" + canonical).hexdigest()


def _replay(status: int, stream: bool, response: bytes) -> Response:
    if stream:
        events = [event + "\n\n" for event in response.decode().split("\n\n") if event]
        return StreamingResponse(_iterate(events), media_type="text/event-stream", headers=REPLAYED)
    return JSONResponse(json.loads(response), status_code=status, headers=REPLAYED)


async def _iterate(events: list[str]) -> AsyncIterator[str]:
    for event in events:
        yield event


def _teed(request: Request, reply: Reply, keys: IdempotencyStore, account: int, key: str, call: Call) -> Response:
    """The stream, consumed by a task of its own: to the client while it reads, and whole into the store at its
    end, also when the client left before it (the generation runs on, and is charged, once)."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    assert reply.events is not None
    events = reply.events

    async def consume() -> None:
        sent: list[str] = []
        try:
            async for event in events:
                sent.append(event)
                queue.put_nowait(event)
            await _keep(keys, account, key, True, "".join(sent).encode())
        except BaseException:
            await keys.forget(account, key)
            raise
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await run_after(reply.after)

    task = asyncio.get_running_loop().create_task(consume())
    running: set[asyncio.Task[None]] = request.app.state.idempotent_streams
    running.add(task)
    task.add_done_callback(running.discard)

    async def relay() -> AsyncIterator[str]:
        while (event := await queue.get()) is not None:
            yield event

    return respond(Reply(reply.headers, events=relay()), call)
