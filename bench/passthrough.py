"""The floor of any gateway: a bare ASGI app on uvicorn that forwards each body to the upstream and returns its
reply, with no keys, validation, limits or credits.
bench/gateway_bench.py --floor sets it beside the gateway, so the gateway's own work can be told from the cost of
a second HTTP round trip.

`--client` picks the HTTP client of the hop, so the choice of client can be measured on its own: aiohttp (the
default) is set up as backends/upstream.py sets up the gateway's; httpx is an `httpx.AsyncClient` with a pool of
the same size and keep-alive, streaming each reply through with `client.stream(...)` and `aiter_raw()`.

    python bench/passthrough.py --port PORT --upstream http://127.0.0.1:8001 [--client httpx]
"""

from __future__ import annotations

import argparse
from typing import Any, Protocol

import httpx
import uvicorn

from llamaserve.backends.upstream import CONNECTIONS, KEEPALIVE_SECONDS, Upstream
from llamaserve.registry import BackendSpec

JSON = [(b"content-type", b"application/json")]
HEADERS = {"Content-Type": "application/json"}
TIMEOUT = 60.0  # seconds, each wait for bytes (as the gateway's model timeout)

Send = Any  # ASGI's send callable


class Forwarder(Protocol):
    async def forward(self, url: str, body: bytes, send: Send) -> None: ...

    async def close(self) -> None: ...


async def start(send: Send, status: int) -> None:
    await send({"type": "http.response.start", "status": status, "headers": JSON})


async def chunk(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


class AiohttpForwarder:
    """The gateway's own client: Upstream.create's ClientSession (pool, keep-alive, timeouts, trust_env)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = Upstream.create(BackendSpec("upstream", url=upstream, model="any"), timeout=TIMEOUT)

    async def forward(self, url: str, body: bytes, send: Send) -> None:
        async with self.upstream.session.post(url, data=body, headers=HEADERS) as reply:
            await start(send, reply.status)
            async for data in reply.content.iter_any():  # streams pass through chunk by chunk
                await chunk(send, data)

    async def close(self) -> None:
        await self.upstream.close()


class HttpxForwarder:
    """httpx with the same pool size, keep-alive and timeouts as the aiohttp session, so only the client differs."""

    def __init__(self) -> None:
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS, keepalive_expiry=KEEPALIVE_SECONDS
            ),
            timeout=httpx.Timeout(TIMEOUT, connect=min(5.0, TIMEOUT), pool=None),
        )

    async def forward(self, url: str, body: bytes, send: Send) -> None:
        async with self.client.stream("POST", url, content=body, headers=HEADERS) as reply:
            await start(send, reply.status_code)
            async for data in reply.aiter_raw():  # streams pass through chunk by chunk
                await chunk(send, data)

    async def close(self) -> None:
        await self.client.aclose()


class Passthrough:
    def __init__(self, upstream: str, client: str) -> None:
        self.upstream = upstream
        self.client = client
        self.forwarder: Forwarder | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/health":
            await start(send, 200)
            await send({"type": "http.response.body", "body": b'{"status": "ok"}'})
            return
        assert self.forwarder is not None
        await self.forwarder.forward(self.upstream + scope["path"], body, send)
        await send({"type": "http.response.body", "body": b""})

    async def lifespan(self, receive: Any, send: Send) -> None:
        """The clients are made here: aiohttp's session needs the running loop."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.forwarder = AiohttpForwarder(self.upstream) if self.client == "aiohttp" else HttpxForwarder()
                await send({"type": "lifespan.startup.complete"})
            else:
                if self.forwarder is not None:
                    await self.forwarder.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="base URL of the upstream (no /v1)")
    p.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp", help="HTTP client of the hop")
    args = p.parse_args()
    uvicorn.run(Passthrough(args.upstream, args.client), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
