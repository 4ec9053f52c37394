"""The response transport: a response's head and body leave in one write; a lone head (a stream's) leaves on the
loop's next turn, and what follows it is not held; nothing held is lost at close. On a real socket transport, its
writes counted."""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest

from llamaserve.api.runtime.http_protocol import CoalescingTransport
from tests.conftest import MODEL, Server, start_server


class Counted:
    """A real transport whose writes are counted on their way through."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.transport.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.transport, name)


@asynccontextmanager
async def connected() -> AsyncIterator[tuple[CoalescingTransport, Counted, socket.socket]]:
    ours, peer = socket.socketpair()
    peer.setblocking(False)  # read with the loop's sock_recv
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    counted = Counted(transport)  # type: ignore[arg-type]
    coalescing = CoalescingTransport(counted, loop)  # type: ignore[arg-type]
    coalescing.expect_head()  # as the protocol does when a request begins
    try:
        yield coalescing, counted, peer
    finally:
        transport.close()
        peer.close()


async def received(peer: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        data += await asyncio.wait_for(loop.sock_recv(peer, 4096), 5)
    return data


def test_a_head_and_its_body_leave_in_one_write() -> None:
    async def main() -> None:
        async with connected() as (transport, counted, peer):
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
            transport.write(b"{}")
            assert counted.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
            assert await received(peer, 40) == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
            await asyncio.sleep(0)  # the turn's flush finds nothing left
            assert len(counted.writes) == 1

    asyncio.run(main())


def test_a_lone_head_leaves_on_the_next_turn_and_events_are_not_held() -> None:
    async def main() -> None:
        async with connected() as (transport, counted, peer):
            transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            assert counted.writes == []
            await asyncio.sleep(0)
            assert counted.writes == [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]
            assert (await received(peer, 10)).startswith(b"HTTP/1.1 200 OK")
            transport.write(b"5\r\nhello\r\n")  # a stream's events go out as they are sent
            transport.write(b"5\r\nworld\r\n")
            assert counted.writes[1:] == [b"5\r\nhello\r\n", b"5\r\nworld\r\n"]

    asyncio.run(main())


def test_close_sends_what_is_held() -> None:
    async def main() -> None:
        async with connected() as (transport, counted, peer):
            transport.write(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n\r\n")
            transport.close()
            assert counted.writes == [b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n\r\n"]
            assert (await received(peer, 20)).startswith(b"HTTP/1.1 408")
            assert transport.is_closing()

    asyncio.run(main())


def test_a_write_held_for_a_closed_connection_is_dropped() -> None:
    async def main() -> None:
        async with connected() as (transport, counted, _peer):
            transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
            counted.transport.close()  # the client went away before the loop's turn ended
            await asyncio.sleep(0)
            assert counted.writes == []

    asyncio.run(main())


def test_only_the_head_of_each_response_is_held() -> None:
    async def main() -> None:
        async with connected() as (transport, counted, peer):
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
            transport.write(b"{}")
            transport.write(b"late")  # no new request began: nothing to hold
            assert counted.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", b"late"]
            transport.expect_head()  # the next request on the connection
            transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            assert len(counted.writes) == 2
            await asyncio.sleep(0)
            assert counted.writes[2:] == [b"HTTP/1.1 204 No Content\r\n\r\n"]

    asyncio.run(main())


# --- the head of a request, on a real server --------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine() -> Iterator[Server]:
    with start_server("--parallel", "1", "--header-timeout", "1", command="engine") as server:
        yield server


def _answer(server: Server, sent: bytes, wait: float = 10) -> bytes:
    """What the server answers on a connection that sends `sent` and then nothing, until it closes it."""
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(sent)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_a_connection_that_sends_no_head_in_time_is_closed(engine: Server) -> None:
    """Idle connections used to pile up to the process's file limit (then /health got no answer), and half-sent
    heads stayed open past 65 s."""
    started = time.monotonic()
    assert _answer(engine, b"").startswith(b"HTTP/1.1 408")
    assert _answer(engine, b"GET /health HTTP/1.1\r\nHost: x\r\n").startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 8
    assert httpx.get(f"{engine.base_url}/health").status_code == 200


def test_a_huge_head_is_refused(engine: Server) -> None:
    """A 64 MB header line was read whole; past 64 KiB the answer is 431 and the connection closes."""
    assert _answer(engine, b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 70_000).startswith(b"HTTP/1.1 431")
    # A large body is no large head.
    body = {"model": MODEL, "prompt": "word " * 60_000}
    r = httpx.post(f"{engine.base_url}/tokenize", json=body, timeout=60)
    assert r.status_code in (200, 400) and r.headers["content-type"] == "application/json", r.text[:200]


def test_idle_connections_past_the_cap_make_way_for_new_ones() -> None:
    """Past --max-connections, a new connection closes the one that has waited longest for a request: thousands
    of idle sockets used to leave /health without an answer ("Empty reply"). A connection serving a request (a
    stream, here) is never closed for it."""
    with start_server("--parallel", "1", "--max-connections", "32", command="engine") as server:
        host, port = server.base_url.removeprefix("http://").split(":")
        body = {"model": MODEL, "prompt": "Count:", "max_tokens": 48, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as stream:
                idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(200)]
                try:
                    assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200
                    assert "data: [DONE]" in "".join(stream.iter_text())
                    time.sleep(0.5)
                    readable, _, _ = select.select(idle, [], [], 1)
                    closed = [s for s in readable if s.recv(1) == b""]
                    assert 200 - 32 <= len(closed) < 200, len(closed)
                finally:
                    for s in idle:
                        s.close()
