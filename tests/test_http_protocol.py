"""The response transport: a response's head and body leave in one write; a lone head (a stream's) leaves on the
loop's next turn, and what follows it is not held; nothing held is lost at close. On a real socket transport, its
writes counted."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from llamaserve.api.http_protocol import CoalescingTransport


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
