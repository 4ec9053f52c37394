"""A lean HTTP/1.1 client for the gateway's hop to its upstream engines: keep-alive connections to one base URL,
each an asyncio protocol whose replies httptools parses (uvicorn's parser: already a dependency).

Why not aiohttp: every proxied request runs the client twice (out and back), and at one client each run starts
from cold caches, so its cost is the code it touches. aiohttp's request path is about 100 Python functions (URL
joining, cookie jar, payload objects, tracing hooks, stream readers); this is about 20, for what the hop needs:
a JSON body out; a reply with Content-Length, chunked or ended by the close; a timeout on every wait for bytes;
reading paused while the reader lags (a stalled client stalls its upstream, not our memory).

Errors: `ConnectionFailed` for a connection that could not be made or broke, `TimeoutError` for bytes that did
not come within the read timeout. A reply read to its end goes back to the pool with its connection; one left
early closes its connection (the rest of its body is not ours to wait for).
"""

from __future__ import annotations

import asyncio
import posixpath
import time
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 256 * 1024  # bytes of a reply buffered unread before reading from its socket pauses


class ConnectionFailed(Exception):
    """The upstream could not be reached, or the connection broke (reset, closed early, unparsable reply)."""


class Http1Client:
    """A pool of keep-alive connections to `base_url`'s host; request paths are relative to its path."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str] | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        limit: int = 1000,
        keepalive: float = 4.0,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"an upstream URL must be http://host[:port]/path, not {base_url!r}")
        self.host, self.port = url.hostname, url.port or 80
        self.base_path = url.path.rstrip("/") + "/"
        self.head = "".join(f"{name}: {value}\r\n" for name, value in {"Host": url.netloc, **(headers or {})}.items())
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        # Idle connections are closed after `keepalive` seconds: before the server does (uvicorn, so vLLM and our
        # engine: 5 s), so that we never send on a connection the server is closing.
        self.limit, self.keepalive = limit, keepalive
        self.idle: list[Connection] = []  # most recently used last
        self.connections = 0  # open, idle or not
        self.waiting: deque[asyncio.Future[None]] = deque()  # for a connection, when `limit` are open
        self.targets: dict[str, str] = {}  # request path → request target

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        read_timeout: float | None = None,
    ) -> Reply:
        """Send a request; returns its reply once the status line and headers are in (the body still coming)."""
        head = f"{method} {self._target(path)} HTTP/1.1\r\n{self.head}"
        if headers:
            head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        if body or method == "POST":
            head += f"Content-Length: {len(body)}\r\n"
        data = f"{head}\r\n".encode("latin-1") + body
        for fresh in (False, True):
            connection, reused = await self._acquire(fresh)
            try:
                connection.send(data, read_timeout or self.read_timeout)
                await connection.headers_in()
                return Reply(connection)
            except ConnectionFailed:
                connection.close()
                # A kept-alive connection the server closed as we sent on it (idle too long there): nothing
                # came back, so nothing was served; once more on a new connection.
                if fresh or not reused or connection.received:
                    raise
            except BaseException:  # timed out or cancelled: no reply will be read on this connection
                connection.close()
                raise
        raise AssertionError("unreachable")

    def _target(self, path: str) -> str:
        target = self.targets.get(path)
        if target is None:  # a path like ../tokenize resolves against the base path, as a URL would
            target = self.targets[path] = posixpath.normpath(self.base_path + path.lstrip("/"))
        return target

    async def _acquire(self, fresh: bool) -> tuple[Connection, bool]:
        """A connection for one request, and whether it served others before (kept alive)."""
        while True:
            while self.idle and not fresh:
                connection = self.idle.pop()
                if connection.reusable(self.keepalive):
                    return connection, True
                connection.close()
            if self.connections < self.limit:
                break
            waiter = asyncio.get_running_loop().create_future()  # woken when a connection is released or closed
            self.waiting.append(waiter)
            await waiter
        self.connections += 1
        try:
            connect = asyncio.get_running_loop().create_connection(lambda: Connection(self), self.host, self.port)
            _, connection = await asyncio.wait_for(connect, self.connect_timeout)
        except TimeoutError as e:
            self._closed(None)
            raise ConnectionFailed(f"no connection within {self.connect_timeout:g}s") from e
        except OSError as e:
            self._closed(None)
            raise ConnectionFailed(str(e) or type(e).__name__) from e
        except BaseException:
            self._closed(None)
            raise
        return connection, False

    def _release(self, connection: Connection) -> None:
        connection.idle_since = time.monotonic()
        self.idle.append(connection)
        self._wake_one()

    def _closed(self, connection: Connection | None) -> None:
        self.connections -= 1
        if connection in self.idle:
            self.idle.remove(connection)
        self._wake_one()

    def _wake_one(self) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        for connection in self.idle[:]:
            connection.close()
        self.idle.clear()


class Connection(asyncio.Protocol):
    """One keep-alive connection and the reply being read on it (one request at a time)."""

    def __init__(self, client: Http1Client) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        self.lost = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.reason = ""
        self.keep_alive = False  # the reply allows another request on this connection
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.complete = False
        self.error: BaseException | None = None
        self.received = False  # any byte of the reply
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.timer: asyncio.TimerHandle | None = None
        self.read_timeout = 0.0
        self.last_data = 0.0

    # --- the caller's side ---

    def reusable(self, keepalive: float) -> bool:
        assert self.transport is not None
        return not self.lost and not self.transport.is_closing() and time.monotonic() - self.idle_since < keepalive

    def send(self, data: bytes, read_timeout: float) -> None:
        assert self.transport is not None
        self._reset()
        self.read_timeout, self.last_data = read_timeout, self.loop.time()
        self.timer = self.loop.call_at(self.last_data + read_timeout, self._check_idle)
        self.transport.write(data)

    async def headers_in(self) -> None:
        while not self.status:
            self._raise_error()
            await self._wait()

    async def next_chunk(self) -> bytes | None:
        """The body's bytes received since the last call (waiting for some), or None at its end."""
        while not self.chunks:
            if self.complete:
                return None
            self._raise_error()
            await self._wait()
        data = b"".join(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        self.chunks.clear()
        self.buffered = 0
        if self.paused:
            self.paused = False
            self.last_data = self.loop.time()  # the wait for bytes starts again now
            assert self.transport is not None
            self.transport.resume_reading()
        return data

    def finish(self) -> None:
        """The reply is done with: back to the pool if it was read to its end on a keep-alive connection."""
        if self.complete and self.keep_alive and not self.lost:
            self.client._release(self)
        else:
            self.close()

    def close(self) -> None:
        self._stop_timer()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def _wait(self) -> None:
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _fail(self, error: BaseException) -> None:
        if self.error is None and not self.complete:
            self.error = error
        self._stop_timer()
        self._wake()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check_idle(self) -> None:
        """The read timeout: no bytes for `read_timeout` while a reply is awaited (not while reading is paused:
        then the reader is the one behind)."""
        self.timer = None
        if self.complete or self.error is not None:
            return
        now = self.loop.time()
        if not self.paused and now - self.last_data >= self.read_timeout:
            self._fail(TimeoutError(f"no bytes from the upstream in {self.read_timeout:g}s"))
            self.close()
            return
        self.timer = self.loop.call_at(max(now, self.last_data) + self.read_timeout, self._check_idle)

    # --- asyncio's side ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport (uvloop's is no asyncio subclass)

    def data_received(self, data: bytes) -> None:
        self.received = True
        self.last_data = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(ConnectionFailed(f"the upstream's reply is not valid HTTP/1.1 ({e})"))
            self.close()

    def eof_received(self) -> None:
        return None  # closes the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.client._closed(self)
        delimited = "content-length" in self.headers or "transfer-encoding" in self.headers
        if self.status and not delimited and not self.complete and self.error is None:
            self.complete = True  # a body delimited by the connection's end
            self._stop_timer()
            self._wake()
        else:
            self._fail(ConnectionFailed(f"the upstream closed the connection ({exc or 'end of stream'})"))

    # --- httptools' callbacks ---

    def on_status(self, status: bytes) -> None:
        self.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # known only while parsing
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._stop_timer()
        self._wake()


class Reply:
    """A reply whose status line and headers are in; its body read whole (`read`) or as it comes (`chunks`)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.status = connection.status
        self.reason = connection.reason
        self.headers = connection.headers
        self.released = False

    async def read(self) -> bytes:
        parts = []
        while (data := await self.connection.next_chunk()) is not None:
            parts.append(data)
        return b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        while (data := await self.connection.next_chunk()) is not None:
            yield data

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.connection.finish()
