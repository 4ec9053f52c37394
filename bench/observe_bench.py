"""What the observability middleware costs per request: the same trivial ASGI app behind the bare request-id
middleware it replaced and behind `ObserveMiddleware` (request id, status and error counters, latency and token
histograms, one JSON access-log line written to a file), called in a loop without HTTP so only the middleware is
measured. Rounds interleave the variants; prints the median CPU microseconds per request of each and the
difference.

    .venv/bin/python bench/observe_bench.py --requests 20000 --rounds 7
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamaserve.api.runtime.observe import GatewayMetrics, ObserveMiddleware
from llamaserve.billing.limits import UNLIMITED
from llamaserve.billing.store import Caller
from llamaserve.logs import configure
from llamaserve.serving.admission import Admission, Call

CALLER = Caller(key_id=7, key_prefix="abcdefghij", account_id=3, account_name="a", plan="pro", allowed_models=None)
PATH = "/v1/chat/completions"
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"2")]


class BaselineMiddleware:
    """The request-id middleware before observability (api/request_id.py at 0e42bc5)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class Route:
    path = PATH


async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """What a generation route leaves behind: its route, caller and settled admission; then a response."""
    scope["route"] = Route
    state = scope["state"]
    state["caller"] = CALLER
    admission = Admission(None, CALLER, state["request_id"], "model", 31, 16, 0, UNLIMITED)
    admission.backend, admission.first_token_at = "local", time.perf_counter()
    admission.settle(16, "ok")
    state["call"] = Call(CALLER, state["request_id"], disconnected, admission)
    await send({"type": "http.response.start", "status": 200, "headers": list(HEADERS)})
    await send({"type": "http.response.body", "body": b"{}"})


async def disconnected() -> None:
    pass


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Message) -> None:
    pass


async def per_request_us(app: ASGIApp, n: int) -> float:
    """CPU microseconds per request (the process's CPU time: other load on the machine does not count)."""
    started = time.process_time()
    for _ in range(n):
        scope: dict[str, Any] = {
            "type": "http",
            "method": "POST",
            "path": PATH,
            "headers": [],
            "state": {"request_id": "r"},
        }
        await app(scope, receive, send)
    return (time.process_time() - started) / n * 1e6


async def main(n: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        configure("json", "info")
        log_file = (Path(tmp) / "access.log").open("a")
        logging.getLogger().handlers[0].setStream(log_file)  # type: ignore[attr-defined]
        observed = ObserveMiddleware(endpoint, GatewayMetrics())
        variants = {
            "bare endpoint": endpoint,
            "request id only (before)": BaselineMiddleware(endpoint),
            "observe, metrics only (log level warning)": observed,
            "observe (metrics + JSON log line)": observed,
        }
        access = logging.getLogger("llamaserve.access")
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, app in variants.items():
                access.setLevel(logging.WARNING if "metrics only" in name else logging.NOTSET)
                times[name].append(await per_request_us(app, n))
        log_file.close()
        lines = sum(1 for _ in (Path(tmp) / "access.log").open())
    for name, ts in times.items():
        print(f"{name:42s} {statistics.median(ts):7.2f} µs/request (median of {rounds} rounds of {n})")
    added = statistics.median(times["observe (metrics + JSON log line)"]) - statistics.median(
        times["request id only (before)"]
    )
    print(f"observability adds {added:.2f} µs per request ({lines} log lines written)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.rounds))
