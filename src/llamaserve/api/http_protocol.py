"""uvicorn's HTTP/1.1 protocol (httptools), writing a response's head and body in one go.

uvicorn writes the status line and headers as soon as the app sends `http.response.start`, and the body with the
next message: two writes, two TCP segments, and two wake-ups of the reader for one small response. On a machine
where the reader shares the cores with us, the first wake-up lets it preempt us before the body goes out
(bench/gateway_bench.py: 0.2–0.4 ms a request through the gateway, the engine doing the same). Here a response's
head waits for the response's next write, or for the end of the event loop's turn, whichever comes first: a
non-streamed response leaves in one write, and a stream's head still leaves at once. Nothing else is held: a
stream's events go out as they are sent.

It also cuts off a client that stops reading. Once its socket's buffer is full, the client's TCP window is zero
and uvicorn waits for it for ever, the response's credit hold and its place in the key's concurrency with it.
With TCP_USER_TIMEOUT (Linux), the kernel closes a connection whose data has waited unacknowledged, or whose
window has stayed shut, for `write_timeout` seconds: the response sees its client gone (generation stopped, the
request settled as cancelled). A peer that vanished is given up on as soon (not after ~15 minutes of
retransmissions). An idle keep-alive connection is not affected: nothing is waiting to be sent on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

WRITE_TIMEOUT = 60.0  # seconds sent data may wait for the client's acknowledgement before the connection is cut


class HttpProtocol(HttpToolsProtocol):
    write_timeout = WRITE_TIMEOUT  # set per server by `with_write_timeout`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            with contextlib.suppress(OSError):  # not TCP (a Unix socket): nothing to bound
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.write_timeout * 1000))
        self.transport = CoalescingTransport(transport, self.loop)  # what each request's response writes to

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.transport.expect_head()  # type: ignore[attr-defined]


def with_write_timeout(seconds: float) -> type[HttpProtocol]:
    """The protocol class for a server whose clients may stall `seconds` (uvicorn takes a class)."""
    return type("HttpProtocol", (HttpProtocol,), {"write_timeout": seconds})


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
