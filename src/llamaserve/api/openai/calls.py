"""Between HTTP and serving: a request becomes a Call (its caller, id, and a way to tell its client has gone),
and a serving Reply becomes a response."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from llamaserve.billing.store import Caller
from llamaserve.protocol.errors import shutting_down
from llamaserve.serving.admission import Call
from llamaserve.serving.directory import ModelDirectory
from llamaserve.serving.reply import Reply, run_after, sse


def models_of(request: Request) -> ModelDirectory:
    return request.app.state.models


def call_of(request: Request, caller: Caller) -> Call:
    async def disconnected() -> None:  # the body has been read: the next message is the client leaving
        while (await request.receive())["type"] != "http.disconnect":
            pass

    call = Call(caller, request.state.request_id, disconnected, request.app.state.lifecycle.stopping)
    request.state.call = call  # the access log reads its admission
    return call


def respond(reply: Reply, call: Call) -> Response:
    if reply.events is not None:
        return StreamingResponse(
            _until_stopping(reply.events, call.server_stopping),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **reply.headers},
            background=BackgroundTask(run_after, reply.after),
        )
    return AfterJSONResponse(reply.body, reply.headers, reply.after)


async def _until_stopping(events: AsyncIterator[str], stopping: asyncio.Event) -> AsyncIterator[str]:
    """The events, until the server stops while they run (its drain ran out): then an error event ends them."""
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            yield event
            if stopping.is_set():
                yield sse(shutting_down().body.model_dump())
                return


class AfterJSONResponse(JSONResponse):
    """A JSON response that runs `after` once it has been sent, or failed to be (Starlette's background tasks
    run only after a send that succeeded)."""

    def __init__(self, content: Any, headers: dict[str, str], after: Callable[[], Any] | None) -> None:
        super().__init__(content, headers=headers)
        self.after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await run_after(self.after)
