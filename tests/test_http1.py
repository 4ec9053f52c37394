"""The upstream HTTP/1.1 client against scripted servers on loopback: what it sends, the reply framings it reads
(Content-Length, chunked, ended by the close), keep-alive reuse, and each failure it must report (refused, reset
before or during a reply, a reply that never comes, a bad reply); reading paused while its reader lags."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from llamaserve.backends.http1 import HIGH_WATER, ConnectionFailed, Http1Client

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[str]:
    """A server on a free loopback port whose connections `handler` serves; yields its base URL."""
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        srv.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    line, *fields = head.decode("latin-1").split("\r\n")[:-2]
    headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return line.encode(), headers, body


def json_reply(payload: object) -> bytes:
    body = json.dumps(payload).encode()
    return f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_request_goes_out_as_written_and_its_connection_is_reused() -> None:
    seen: list[tuple[bytes, dict[str, str], bytes]] = []
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while not reader.at_eof():
            try:
                request = await read_request(reader)
            except asyncio.IncompleteReadError:
                break
            seen.append(request)
            writer.write(json_reply({"n": len(seen)}))
            await writer.drain()
        writer.close()

    async def main() -> None:
        async with server(handler) as base:
            client = Http1Client(base, {"Authorization": "Bearer sk-x"})
            for i in range(3):
                reply = await client.request("POST", "chat/completions", b'{"a":1}', {"X-Request-Id": "r1"})
                assert (reply.status, json.loads(await reply.read())) == (200, {"n": i + 1})
                reply.release()
            reply = await client.request("GET", "../tokenize")
            await reply.read()
            reply.release()
            await client.close()
        line, headers, body = seen[0]
        assert line == b"POST /v1/chat/completions HTTP/1.1"
        assert headers["authorization"] == "Bearer sk-x" and headers["x-request-id"] == "r1"
        assert headers["host"].startswith("127.0.0.1:") and body == b'{"a":1}'
        assert seen[3][0] == b"GET /tokenize HTTP/1.1" and "content-length" not in seen[3][1]
        assert connections == 1  # one keep-alive connection for all four

    run(main)


def test_chunked_and_close_delimited_replies_are_read_whole() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_request(reader)
        if b"chunked" in line:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with server(handler) as base:
            client = Http1Client(base)
            reply = await client.request("POST", "chunked", b"{}")
            assert [c async for c in reply.chunks()] and reply.connection.complete
            reply.release()
            # The server closed the kept-alive connection: the request goes again on a new one, not a failure.
            reply = await client.request("POST", "chunked", b"{}")
            assert await reply.read() == b"hello world"
            reply.release()
            reply = await client.request("POST", "close", b"{}")
            assert await reply.read() == b"until the end"
            reply.release()
            assert client.idle == [] or all(c.lost for c in client.idle)

    run(main)


def test_refused_and_reset_connections_fail_as_connection_failures() -> None:
    async def reset_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.transport.abort()

    async def reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.transport.abort()

    async def main() -> None:
        async with server(reset_after_request) as base:
            pass  # closed: its port now refuses
        with pytest.raises(ConnectionFailed):
            await Http1Client(base).request("POST", "x", b"{}")
        async with server(reset_after_request) as base:
            with pytest.raises(ConnectionFailed):
                await Http1Client(base).request("POST", "x", b"{}")
        async with server(reset_mid_body) as base:
            reply = await Http1Client(base).request("POST", "x", b"{}")
            assert reply.status == 200
            with pytest.raises(ConnectionFailed):
                await reply.read()

    run(main)


def test_a_reply_that_stops_coming_times_out_and_an_invalid_one_fails() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")  # then nothing
        await writer.drain()
        await asyncio.sleep(10)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(10)

    async def main() -> None:
        async with server(silent) as base:
            client = Http1Client(base, read_timeout=0.3)
            reply = await client.request("POST", "x", b"{}")
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TimeoutError):
                await reply.read()
            assert 0.25 < loop.time() - started < 2
            reply.release()
            assert not client.idle  # a timed-out connection is not reused
        async with server(garbage) as base:
            with pytest.raises(ConnectionFailed, match="not valid HTTP"):
                await Http1Client(base).request("POST", "x", b"{}")

    run(main)


def test_reading_pauses_while_the_reader_lags_and_resumes_without_timing_out() -> None:
    total = 8 * HIGH_WATER

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
        for _ in range(total // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()

    async def main() -> None:
        async with server(firehose) as base:
            reply = await Http1Client(base, read_timeout=0.3).request("POST", "x", b"{}")
            await asyncio.sleep(0.5)  # the reader lags past the read timeout: reading paused, no timeout
            connection = reply.connection
            assert connection.paused and connection.buffered <= HIGH_WATER + 65536 * 4
            assert len(await reply.read()) == total

    run(main)


def test_a_reply_left_early_closes_its_connection() -> None:
    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await reader.read()  # until the client closes
        writer.close()

    async def main() -> None:
        async with server(stream) as base:
            client = Http1Client(base)
            reply = await client.request("POST", "x", b"{}")
            assert await reply.connection.next_chunk() == b"hello"
            reply.release()
            await asyncio.sleep(0.1)
            assert client.idle == [] and client.connections == 0

    run(main)


def test_requests_beyond_the_connection_limit_wait_for_a_connection() -> None:
    connections = 0

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            await asyncio.sleep(0.05)
            writer.write(json_reply({"ok": True}))
            await writer.drain()

    async def one(client: Http1Client) -> object:
        reply = await client.request("POST", "x", b"{}")
        try:
            return json.loads(await reply.read())
        finally:
            reply.release()

    async def main() -> None:
        async with server(slow) as base:
            client = Http1Client(base, limit=1)
            assert await asyncio.gather(*(one(client) for _ in range(4))) == [{"ok": True}] * 4
            assert connections == 1 and client.connections == 1
            await client.close()

    run(main)
