"""uvicorn's HTTP/1.1 protocol (httptools), writing a response's head and body in one go.

uvicorn writes the status line and headers as soon as the app sends `http.response.start`, and the body with the
next message: two writes, two TCP segments, and two wake-ups of the reader for one small response. On a machine
where the reader shares the cores with us, the first wake-up lets it preempt us before the body goes out
(bench/gateway_bench.py: 0.2–0.4 ms a request through the gateway, the engine doing the same). Here a response's
head waits for the response's next write, or for the end of the event loop's turn, whichever comes first: a
non-streamed response leaves in one write, and a stream's head still leaves at once. Nothing else is held: a
stream's events go out as they are sent.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingHttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = CoalescingTransport(transport, self.loop)  # what each request's response writes to

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.transport.expect_head()  # type: ignore[attr-defined]


class CoalescingTransport:
    """A transport that holds a response's head (the first write after `expect_head`) until the next write, then
    sends both as one, or until the loop's next turn."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._head_next = False

    def expect_head(self) -> None:
        self._head_next = True

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data, self._held = self._held + data, None
        elif self._head_next:
            self._head_next = False
            self._held = data
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():  # the client left: nothing to deliver
                self._transport.write(held)

    def close(self) -> None:
        self.flush()  # a response followed by `connection: close` still gets out whole
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # the rest (is_closing, get_extra_info, reading) is the transport's
        return getattr(self._transport, name)
