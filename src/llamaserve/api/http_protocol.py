"""uvicorn's HTTP/1.1 protocol (httptools), writing a response's head and body in one go.

uvicorn writes the status line and headers as soon as the app sends `http.response.start`, and the body with the
next message: two writes, two TCP segments, and two wake-ups of the reader for one small response. On a machine
where the reader shares the cores with us, the first wake-up lets it preempt us before the body goes out
(bench/gateway_bench.py: about 0.3–0.5 ms a request through the gateway, with the engine doing the same). Here a
write waits for the next one, or for the end of the event loop's turn, whichever comes first: a non-streamed
response leaves in one write, and a stream's head still leaves at once (before its first event is computed).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingHttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = CoalescingTransport(transport, self.loop)  # what each request's response writes to


class CoalescingTransport:
    """A transport whose write is held until the next write (then both go as one) or the loop's next turn."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._held is None:
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            held, self._held = self._held, None
            self._transport.write(held + data)

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
