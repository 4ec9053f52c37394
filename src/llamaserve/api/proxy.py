"""Chat and text completions for models served by upstream engines: the request, already validated and
admitted (key, limits, hold), goes to an upstream picked by the model's router; the reply comes back with the
model's public name, and its usage settles the hold.

The hold is sized before any token is counted: prompt tokens are bounded by the prompt's UTF-8 bytes (no
tokenizer of the upstream's model here), completion tokens by max_tokens × n. The charge is what the upstream
reports in `usage` (streams ask for it with `stream_options.include_usage`); where it reports none (a stream
broken midway, an engine that omits usage), both counts are estimated at 4 bytes of text a token.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.datastructures import State
from starlette.types import Receive, Scope, Send

from llamaserve.api.common import SSE_DONE, sse
from llamaserve.api.platform import Admission, admit, check_model_allowed
from llamaserve.backends.http1 import ConnectionFailed
from llamaserve.backends.upstream import Router, Upstream, UpstreamReply
from llamaserve.billing.store import Caller
from llamaserve.chat.images import ImageError, ImageLimits, load_image
from llamaserve.protocol.common import SamplingFields
from llamaserve.protocol.errors import invalid
from llamaserve.registry import ModelSpec

PER_MESSAGE_OVERHEAD = 8  # tokens a chat template adds around each message (role headers, end markers)
# Tokens a chat template may add on its own: a default system prompt, Llama 3.1's date header, tool instructions.
TEMPLATE_ALLOWANCE = 512
IMAGE_TOKEN_BOUND = 6404  # tokens an image may take: Llama 3.2 Vision's 4 tiles × 1601


@dataclass
class UpstreamModel:
    spec: ModelSpec
    router: Router


def find_upstream(state: State, name: str) -> UpstreamModel | None:
    """The upstream model `name` (id or alias) means in an app's `state`, if any."""
    models: dict[str, UpstreamModel] = state.upstream_models
    for model in models.values():
        if name == model.spec.id or name in model.spec.aliases:
            return model
    return None


def prompt_tokens(payload: dict[str, Any]) -> tuple[int, int]:
    """The prompt's tokens as (an upper bound, what is charged when the upstream reports none).

    The bound: every token covers at least one byte of text, and an image counts as IMAGE_TOKEN_BOUND tokens. The
    charge without `usage` (a broken stream, an engine that omits it) is 4 bytes of text a token, the completion's
    own rule, rather than the bound that was held."""
    text, other = _prompt_size(payload)
    allowance = TEMPLATE_ALLOWANCE if "messages" in payload else 0
    return text + other + allowance, math.ceil(text / 4) + other


def _prompt_size(payload: dict[str, Any]) -> tuple[int, int]:
    """(bytes of text, tokens of the rest: each message's template overhead, images) of a prompt."""
    messages = payload.get("messages")
    if messages is None:
        return len(json.dumps(payload.get("prompt") or "", ensure_ascii=False).encode()), PER_MESSAGE_OVERHEAD * 2
    text, other = _json_bytes(payload.get("tools")), 0
    for message in messages:
        other += PER_MESSAGE_OVERHEAD
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
        for part in parts:
            if part.get("type") == "image_url":
                other += IMAGE_TOKEN_BOUND
            else:
                text += len((part.get("text") or "").encode())
        text += _json_bytes(message.get("tool_calls"))
    return text, other


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode()) if value else 0


def has_images(payload: dict[str, Any]) -> bool:
    return any(
        isinstance(part, dict) and part.get("type") == "image_url"
        for message in payload.get("messages") or []
        for part in (message.get("content") if isinstance(message.get("content"), list) else [])
    )


async def inline_images(payload: dict[str, Any], spec: ModelSpec, limits: ImageLimits) -> None:
    """Fetch and check every image part here and pass it on as a data URI, so the upstream never fetches an
    address the gateway would refuse."""
    for i, message in enumerate(payload.get("messages") or []):
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            if part.get("type") != "image_url":
                continue
            where = f"messages[{i}].content[{j}]"
            if "vision" not in spec.capabilities:
                raise invalid(
                    f"model {spec.id} does not accept image input ({where} has an image_url part)",
                    where,
                    code="image_input_not_supported",
                )
            try:
                image = await load_image(part["image_url"]["url"], limits)
            except ImageError as e:
                raise invalid(f"{where}: {e}", where, code=e.code) from e
            part["image_url"] = {**part["image_url"], "url": image.data_uri()}


async def proxy(
    request: Request, body: SamplingFields, caller: Caller, model: UpstreamModel, path: str, default_max: int
) -> Any:
    check_model_allowed(caller, model.spec.id)
    payload = body.model_dump(exclude_unset=True, by_alias=True)
    n_prompt, prompt_guess = prompt_tokens(payload)
    budget = (body.max_tokens or default_max) * body.n
    if "vision" not in model.spec.capabilities:  # refuses at the first image part, before holding or fetching
        await inline_images(payload, model.spec, request.app.state.image_limits)
    request_id = request.state.request_id
    admission = await admit(request, caller, request_id, model.spec.id, n_prompt, budget, model.spec.price, hold=False)
    if body.stream:
        payload["stream_options"] = {"include_usage": True}
    # Images are fetched only for a request whose credits are held, and an account refused a moment ago waits for
    # its hold rather than make the upstream start work it will likely not be paid for. Otherwise the hold (a
    # database write, on its thread) is placed while the request goes upstream, so it adds no latency: nothing
    # reaches the client before the hold is placed, and a refused hold stops the call (`hold_beside`).
    if has_images(payload) or admission.short_of_credits:
        await admission.hold()
        try:
            await inline_images(payload, model.spec, request.app.state.image_limits)
        except BaseException:
            admission.finish(0, "rejected", prompt_tokens=0)
            raise
        upstream, response = await _open(admission, model, path, payload, body.stream)
    else:
        with admission.hold_beside():
            upstream, response = await _open(admission, model, path, payload, body.stream)
        try:
            await admission.held()
        except BaseException:
            upstream.outstanding -= 1
            response.close()
            admission.finish(0, "rejected", prompt_tokens=0)  # a hold that lands after all is released uncharged
            raise
    admission.backend = upstream.spec.name
    if not body.stream:
        return _complete(admission, model, upstream, response, prompt_guess)
    relay = Relay(admission, model, upstream, response, body.include_usage, prompt_guess)
    return StreamingResponse(
        relay.events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **admission.headers},
        background=BackgroundTask(relay.close),
    )


async def _open(
    admission: Admission, model: UpstreamModel, path: str, payload: dict[str, Any], stream: bool
) -> tuple[Upstream, UpstreamReply]:
    try:
        return await model.router.open(path, payload, stream, admission.request_id)
    except BaseException:
        admission.finish(0, "error", prompt_tokens=0)  # nothing was produced: nothing to charge
        raise


def _complete(
    admission: Admission, model: UpstreamModel, upstream: Upstream, response: UpstreamReply, prompt_guess: int
) -> Any:
    upstream.outstanding -= 1
    data = response.json()
    data["model"] = model.spec.id
    usage = data.get("usage") or {}
    prompt, completion = _usage_counts(usage, data, prompt_guess)
    return SettledJSONResponse(data, admission.headers, partial(admission.finish, completion, "ok", prompt))


class SettledJSONResponse(JSONResponse):
    """A JSON response that settles its request once it has been sent (or failed to be): the settlement's work
    waits until the reply is out."""

    def __init__(self, content: Any, headers: dict[str, str], settle: Callable[[], None]) -> None:
        super().__init__(content, headers=headers)
        self.settle = settle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.settle()


def _usage_counts(usage: dict[str, Any], data: dict[str, Any], prompt_guess: int) -> tuple[int, int]:
    """(prompt, completion) tokens from the upstream's usage; without it, both are estimated from their text
    (4 bytes a token, rounded up)."""
    if "completion_tokens" in usage:
        return int(usage.get("prompt_tokens") or 0), int(usage["completion_tokens"])
    text = "".join((c.get("message") or {}).get("content") or c.get("text") or "" for c in data.get("choices") or [])
    return prompt_guess, math.ceil(len(text.encode()) / 4)


class Relay:
    """Streams an upstream's SSE to the client under our model name; keeps its usage for the settlement."""

    def __init__(
        self,
        admission: Admission,
        model: UpstreamModel,
        upstream: Upstream,
        response: UpstreamReply,
        wants_usage: bool,
        prompt_guess: int,
    ) -> None:
        self.admission, self.model, self.upstream, self.response = admission, model, upstream, response
        self.wants_usage, self.prompt_guess = wants_usage, prompt_guess
        self.usage: dict[str, Any] = {}
        self.text_bytes = 0
        self.done = False
        self.broken = False  # the upstream broke the stream (not the client leaving)
        self.closed = False

    async def events(self) -> AsyncIterator[str]:
        try:
            async for line in self.response.lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    self.done = True
                    yield SSE_DONE
                    continue
                event = self._rewrite(json.loads(line[6:]))
                if event is not None:
                    yield event
        except (ConnectionFailed, TimeoutError):
            # Bytes already went to the client: no retry, no new status; end the stream with an error event.
            self.broken = True
            yield sse(
                {
                    "error": {
                        "message": "the upstream engine broke the stream",
                        "type": "bad_gateway",
                        "param": None,
                        "code": "bad_gateway",
                    }
                }
            )
            self.upstream.failed()
        finally:
            await self.close()

    def _rewrite(self, chunk: dict[str, Any]) -> str | None:
        if "model" in chunk:
            chunk["model"] = self.model.spec.id
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content") or choice.get("text") or ""
            self.text_bytes += len(text.encode())
            if self.admission.first_token_at is None and (text or delta.get("tool_calls")):
                self.admission.first_token_at = time.perf_counter()  # the first token, as the gateway sees it
        if not self.wants_usage:
            if not chunk.get("choices") and chunk.get("usage"):
                return None  # the usage chunk we asked for on our own account
            chunk.pop("usage", None)
        return sse(chunk)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.upstream.outstanding -= 1
        self.response.close()
        if "completion_tokens" in self.usage:
            prompt, completion = int(self.usage.get("prompt_tokens") or 0), int(self.usage["completion_tokens"])
        else:
            prompt, completion = self.prompt_guess, math.ceil(self.text_bytes / 4)
        status = "ok" if self.done else "error" if self.broken else "cancelled"
        self.admission.finish(completion, status, prompt_tokens=prompt)
