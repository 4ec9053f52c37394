"""What a serving call answers, whatever the backend: a JSON body or a stream of server-sent events, and the
pieces both are made of (ids, usage objects, SSE framing). The route turns a Reply into an HTTP response."""

from __future__ import annotations

import inspect
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Reply:
    headers: dict[str, str]  # the rate-limit headers of the admission
    body: dict[str, Any] | None = None  # a JSON body, or
    events: AsyncIterator[str] | None = None  # SSE events, each framed by `sse`
    # Run once the reply has gone out, or failed to (a client gone before the stream started included): settles
    # what is still open. May be a coroutine function.
    after: Callable[[], Any] | None = None


async def run_after(after: Callable[[], Any] | None) -> None:
    """A reply's `after`, on the event loop (not in Starlette's thread pool: settling schedules tasks), awaited
    if it is a coroutine function."""
    if after is not None and inspect.isawaitable(result := after()):
        await result


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
