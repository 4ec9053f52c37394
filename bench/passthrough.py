"""The floor of any gateway: a bare ASGI app on uvicorn that forwards each body to the upstream with the gateway's
own HTTP client (aiohttp, set up as backends/upstream.py sets it up) and returns its reply, with no keys,
validation, limits or credits.
bench/gateway_bench.py --floor sets it beside the gateway, so the gateway's own work can be told from the cost of
a second HTTP round trip.

    python bench/passthrough.py --port PORT --upstream http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn

from llamaserve.backends.upstream import Upstream
from llamaserve.registry import BackendSpec

JSON = [(b"content-type", b"application/json")]


class Passthrough:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.upstream_: Upstream | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
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
            await self.reply(send, 200, b'{"status": "ok"}')
            return
        assert self.upstream_ is not None
        url = self.upstream + scope["path"]
        headers = {"Content-Type": "application/json"}
        async with self.upstream_.session.post(url, data=body, headers=headers) as reply:
            await send({"type": "http.response.start", "status": reply.status, "headers": JSON})
            async for data in reply.content.iter_any():  # streams pass through chunk by chunk
                await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                spec = BackendSpec("upstream", url=self.upstream, model="any")
                self.upstream_ = Upstream.create(spec, timeout=60)
                await send({"type": "lifespan.startup.complete"})
            else:
                if self.upstream_ is not None:
                    await self.upstream_.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    async def reply(send: Any, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": JSON})
        await send({"type": "http.response.body", "body": body})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="base URL of the upstream (no /v1)")
    args = p.parse_args()
    uvicorn.run(Passthrough(args.upstream), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
