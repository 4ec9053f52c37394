"""An instant OpenAI-protocol upstream: fixed one-token replies, no model. Behind the gateway it leaves only the
gateway's own cost to measure (bench/gateway_bench.py --engine stub).

    python bench/stub_upstream.py --port PORT
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web

MODEL = "stub"
USAGE = {"prompt_tokens": 30, "completion_tokens": 1, "total_tokens": 31}
MESSAGE = {"role": "assistant", "content": "Hi"}
REPLY = {
    "id": "chatcmpl-stub",
    "object": "chat.completion",
    "created": 0,
    "model": MODEL,
    "choices": [{"index": 0, "message": MESSAGE, "finish_reason": "length"}],
    "usage": USAGE,
}
CHUNKS = [
    {"choices": [{"index": 0, "delta": MESSAGE, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
    {"choices": [], "usage": USAGE},
]
EVENTS = b"".join(
    f"data: {json.dumps({'id': 'chatcmpl-stub', 'object': 'chat.completion.chunk', 'model': MODEL, **c})}\n\n".encode()
    for c in CHUNKS
)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if not body.get("stream"):
        return web.json_response(REPLY)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(EVENTS)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=p.parse_args().port, print=None)


if __name__ == "__main__":
    main()
