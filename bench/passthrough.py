"""The floor of any gateway: a bare ASGI app on uvicorn that forwards each body to the upstream with the gateway's
own HTTP client (backends/http1.py) and returns its reply, with no keys, validation, limits or credits.
bench/gateway_bench.py --floor sets it beside the gateway, so the gateway's own work can be told from the cost of
a second HTTP round trip.

    python bench/passthrough.py --port PORT --upstream http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn

from llamaserve.backends.http1 import Http1Client

JSON = [(b"content-type", b"application/json")]


class Passthrough:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.client: Http1Client | None = None

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
        assert self.client is not None
        reply = await self.client.request("POST", scope["path"], body, {"Content-Type": "application/json"})
        try:
            await send({"type": "http.response.start", "status": reply.status, "headers": JSON})
            async for data in reply.chunks():  # streams pass through chunk by chunk
                await send({"type": "http.response.body", "body": data, "more_body": True})
        finally:
            reply.release()
        await send({"type": "http.response.body", "body": b""})

    async def lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client = Http1Client(self.upstream)
                await send({"type": "lifespan.startup.complete"})
            else:
                if self.client is not None:
                    await self.client.close()
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
