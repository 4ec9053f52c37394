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

And it bounds what a request's head may cost, which uvicorn's httptools protocol does not (h11's size option does
not apply to it): a connection must send a whole head within `header_timeout` seconds of opening (or of its last
response), or it is closed; a head larger than MAX_HEAD_BYTES is answered 431 and the connection closed. Idle
keep-alive connections close after uvicorn's `timeout_keep_alive` (5 s).

And it bounds the connections held open: past `max_connections`, a new connection closes the one that has waited
longest for a request (idle, or still sending a head), as nginx reuses its keep-alive connections; connections
serving a request are never closed for it. Thousands of idle sockets (up to the file-descriptor limit) used to
leave no room for a /health check.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

WRITE_TIMEOUT = 60.0  # seconds sent data may wait for the client's acknowledgement before the connection is cut
HEADER_TIMEOUT = 10.0  # seconds a connection may take to send a request's head
MAX_HEAD_BYTES = 64 * 1024  # request line and headers (a 64 MB header line was read whole)
FD_RESERVE = 256  # file descriptors kept for the rest (database, upstreams, model files, logs)


class HttpProtocol(HttpToolsProtocol):
    write_timeout = WRITE_TIMEOUT  # set per server by `protocol_class`
    header_timeout = HEADER_TIMEOUT
    max_connections = 1024
    waiting: ClassVar[dict[HttpProtocol, None]] = {}  # connections waiting for a request, oldest first

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            with contextlib.suppress(OSError):  # not TCP (a Unix socket): nothing to bound
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.write_timeout * 1000))
        self.transport = CoalescingTransport(transport, self.loop)  # what each request's response writes to
        self._head_bytes: int | None = 0  # bytes of the head being read; None while a request is being served
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.header_timeout, self._head_too_slow)
        self.waiting[self] = None
        if len(self.connections) > self.max_connections:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        reading_head = self._head_bytes is not None
        if reading_head and self._head_timer is None:  # a kept-alive connection's next request begins
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)
        super().data_received(data)
        if reading_head and self._head_bytes is not None:  # the head is still not complete
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self._refuse(431, b"Request Header Fields Too Large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.transport.expect_head()  # type: ignore[attr-defined]

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        self.waiting.pop(self, None)
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.pipeline:  # (a pipelined request's head is already in)
            self._head_bytes = 0  # the next request's head, whose clock starts with its first byte
            self.waiting[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self.waiting.pop(self, None)
        super().connection_lost(exc)

    def _make_room(self) -> None:
        """Close the connection that has waited longest for a request (this one, if no other waits)."""
        oldest = next(iter(self.waiting))
        del self.waiting[oldest]
        oldest._cancel_head_timer()
        oldest.transport.close()

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._head_bytes is not None and not self.transport.is_closing():
            self._refuse(408, b"Request Timeout")

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, reason: bytes) -> None:
        head = b"HTTP/1.1 %d %s\r\ncontent-length: 0\r\nconnection: close\r\n\r\n" % (status, reason)
        self.transport.write(head)
        self.transport.close()


def protocol_class(write_timeout: float, header_timeout: float, max_connections: int = 0) -> type[HttpProtocol]:
    """The protocol class for a server whose clients may stall `write_timeout` seconds, take `header_timeout`
    seconds to send a request's head, and hold `max_connections` open (0: as many as the file-descriptor limit
    leaves room for; uvicorn takes a class)."""
    settings = {
        "write_timeout": write_timeout,
        "header_timeout": header_timeout,
        "max_connections": max_connections or descriptor_room(),
        "waiting": {},
    }
    return type("HttpProtocol", (HttpProtocol,), settings)


def descriptor_room() -> int:
    """Connections the process can hold: its file-descriptor limit, raised to the hard limit (systems start
    processes at 1024), less FD_RESERVE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return max(64, soft - FD_RESERVE)


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
