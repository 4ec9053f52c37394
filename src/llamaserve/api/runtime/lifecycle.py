"""The server's life around the requests: limits on what a request may send, and a graceful stop.

SIGTERM starts a drain: new requests get 503 with Retry-After (and /ready says 503, so a load balancer stops
sending), requests in flight run to their end for up to the drain timeout, then the server stops. Requests still
running then end at once (`stopping`): a stream with a `shutting_down` error event, a non-streamed request with a
503; their holds are settled for what they delivered, and the store closed (the app's lifespan).
A second SIGTERM or Ctrl-C stops at once.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Paths that stay open while draining: probes and metrics must keep telling the truth until the end.
PROBES = frozenset({"/health", "/ready", "/metrics"})

# Seconds the requests still running when the drain ran out have to end themselves and settle, before uvicorn's
# own shutdown cancels what is left.
STOP_GRACE = 2.0


@dataclass
class Limits:
    max_body_bytes: int = 32 * 1024 * 1024  # a request body larger than this gets 413
    body_timeout: float = 30.0  # seconds a client may take to send its whole body (slow senders get 408)
    drain_timeout: float = 30.0  # seconds requests in flight may run after SIGTERM
    write_timeout: float = 60.0  # seconds sent data may wait for a client reading nothing (then it is cut off)
    header_timeout: float = 10.0  # seconds a connection may take to send a request's head (then it is closed)
    max_connections: int = 0  # connections held open at once (0: what the file-descriptor limit leaves room for)


@dataclass
class Lifecycle:
    limits: Limits = field(default_factory=Limits)
    draining: bool = False
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # the drain ran out: requests still running end
    in_flight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def started(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def ended(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Whether every request in flight ended within `timeout` seconds."""
        if self.in_flight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


class LifecycleMiddleware:
    """Pure ASGI: counts requests in flight, refuses new ones while draining, and bounds request bodies in size
    (413) and in the time the client takes to send them (408)."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining:
            await _error(scope, send, 503, "The server is shutting down; retry on another replica", "shutting_down")
            return
        limits = self.lifecycle.limits
        declared = _content_length(scope)
        if declared is not None and declared > limits.max_body_bytes:
            await _error(scope, send, 413, _too_large(limits.max_body_bytes), "request_too_large")
            return
        self.lifecycle.started()
        try:
            await self.app(scope, _bounded(scope, receive, send, limits), send)
        except _BodyRefused:
            pass  # the error response went out already
        finally:
            self.lifecycle.ended()


class _BodyRefused(BaseException):
    """The body was refused (408/413) and the error sent. A BaseException: FastAPI turns an Exception raised
    while it reads a body into a 400, whose second response start uvicorn refuses, logged as an unhandled error."""


def _bounded(scope: Scope, receive: Receive, send: Send, limits: Limits) -> Receive:
    """`receive` with the body's size and arrival time bounded (a body without Content-Length, or one that
    lies about it, is counted as it comes)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.body_timeout
    received = 0
    body_done = False

    async def receive_bounded() -> Message:
        nonlocal received, body_done
        if body_done:
            return await receive()  # after the body: only the disconnect, which may come at any time
        try:
            async with asyncio.timeout_at(deadline):  # no task per message, unlike wait_for (Python < 3.12)
                message = await receive()
        except TimeoutError:
            await _error(
                scope, send, 408, f"The request body did not arrive within {limits.body_timeout:g}s", "timeout"
            )
            raise _BodyRefused from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limits.max_body_bytes:
                await _error(scope, send, 413, _too_large(limits.max_body_bytes), "request_too_large")
                raise _BodyRefused
            body_done = not message.get("more_body", False)
        return message

    return receive_bounded


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(limit: int) -> str:
    return f"The request body is larger than the {limit // (1024 * 1024)} MB this server accepts"


async def _error(scope: Scope, send: Send, status: int, message: str, code: str) -> None:
    scope.setdefault("state", {})["error_code"] = code  # for the access log and the error counter
    kind = "server_unavailable" if status == 503 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"5"))
    if status in (408, 413):
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before its own shutdown: the first SIGTERM/SIGINT marks the server draining and
    stops it once the requests in flight have ended (or the drain timeout passed); a second stops it now."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.lifecycle.draining or not self.started:
            super().handle_exit(sig, frame)
            return
        self.lifecycle.draining = True
        self._drain = asyncio.get_running_loop().create_task(self._stop_after_drain(sig))

    async def _stop_after_drain(self, sig: int) -> None:
        if not await self.lifecycle.wait_idle(self.lifecycle.limits.drain_timeout):
            self.lifecycle.stopping.set()
            await self.lifecycle.wait_idle(STOP_GRACE)
        super().handle_exit(sig, None)
