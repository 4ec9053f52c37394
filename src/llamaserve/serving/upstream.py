"""Chat and text completions for models served by upstream engines: the request, validated, is admitted (limits,
hold) and goes to an upstream picked by the model's router; the reply comes back with the model's public name,
and its usage settles the hold.

The hold is sized before any token is counted: prompt tokens are bounded by the prompt's UTF-8 bytes, completion
tokens by max_tokens × n. The charge is what the upstream reports in `usage` (streams ask for it with
`stream_options.include_usage`); where it reports none (a stream broken midway, an engine that omits usage), the
tokens are counted with the model's tokenizer if the registry names one, else estimated at 4 bytes of text a
token, and the usage the client gets says `estimated: true` (backends/counting.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from llamaserve.backends.counting import Count, TokenCounter, prompt_size
from llamaserve.backends.upstream import (
    Router,
    Upstream,
    UpstreamFailure,
    UpstreamReply,
    error_detail,
    gateway_error,
)
from llamaserve.chat.images import ImageLimits
from llamaserve.protocol.chat import DEFAULT_CHAT_MAX_TOKENS, ChatCompletionRequest
from llamaserve.protocol.common import SamplingFields
from llamaserve.protocol.completions import DEFAULT_COMPLETION_MAX_TOKENS, CompletionRequest
from llamaserve.protocol.tokenize import DetokenizeRequest, TokenizeRequest
from llamaserve.registry import ModelSpec
from llamaserve.serving.admission import Admission, Call, Gate
from llamaserve.serving.images import RequestImages, image_refused
from llamaserve.serving.reply import SSE_DONE, Reply, sse

log = logging.getLogger(__name__)

# Tokens a chat template may add on its own: a default system prompt, Llama 3.1's date header, tool instructions.
TEMPLATE_ALLOWANCE = 512


class UpstreamServing:
    """A model served by upstream engines (the registry's `upstream` backends), picked by its router."""

    def __init__(
        self, spec: ModelSpec, router: Router, counter: TokenCounter, gate: Gate, image_limits: ImageLimits
    ) -> None:
        self.spec, self.router, self.gate, self.image_limits = spec, router, gate, image_limits
        self.counter = counter  # counts what the upstream does not report
        self.id = spec.id

    async def chat(self, body: ChatCompletionRequest, call: Call) -> Reply:
        return await self._generate(body, call, "chat", DEFAULT_CHAT_MAX_TOKENS)

    async def completion(self, body: CompletionRequest, call: Call) -> Reply:
        return await self._generate(body, call, "completions", DEFAULT_COMPLETION_MAX_TOKENS)

    async def tokenize(self, body: TokenizeRequest, call: Call) -> dict[str, Any]:
        """The upstream's answer (vLLM serves /tokenize at its root): only it knows the model's tokenizer."""
        return await self._forward("tokenize", body, call)

    async def detokenize(self, body: DetokenizeRequest, call: Call) -> dict[str, Any]:
        return await self._forward("detokenize", body, call)

    async def _forward(self, endpoint: str, body: TokenizeRequest | DetokenizeRequest, call: Call) -> dict[str, Any]:
        await self.gate.count(call.caller)  # tokenizing costs CPU: one of the key's requests a minute
        _, reply = await self.router.open(endpoint, body.model_dump(exclude_unset=True), False, call.request_id)
        return reply.json()

    async def _generate(self, body: SamplingFields, call: Call, endpoint: str, default_max: int) -> Reply:
        """Serve a validated request (`endpoint`: "chat" or "completions") upstream."""
        payload = upstream_payload(body)
        n_prompt = prompt_bound(payload)
        # The upstream obeys the limit it is sent: one limit, the one the hold and the token budget are sized for
        # (a default left out, or max_completion_tokens forwarded beside a hold sized for 512, went unbilled).
        payload.pop("max_completion_tokens", None)
        limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
        payload["max_tokens"] = default_max if limit is None else limit  # 0 scores a completions prompt
        budget = payload["max_tokens"] * body.n
        if "vision" not in self.spec.capabilities:  # refuses at the first image part, before holding or fetching
            await inline_images(payload, self.spec, self.image_limits)
        admission = await self.gate.admit(call, self.spec.id, n_prompt, budget, self.spec.price, hold=False)
        if body.stream:
            payload["stream_options"] = {"include_usage": True}
        # Images are fetched only for a request whose credits are held, and an account refused a moment ago waits
        # for its hold rather than make the upstream start work it will likely not be paid for. Otherwise the hold
        # (a database write, on its thread) is placed while the request goes upstream, so it adds no latency:
        # nothing reaches the client before the hold is placed, and a refused hold stops the call (`hold_beside`).
        if image_parts(payload) or admission.short_of_credits:
            await admission.hold()
            try:
                await inline_images(payload, self.spec, self.image_limits)
            except BaseException:
                admission.settle(0, "rejected", prompt_tokens=0)
                raise
            upstream, response = await self._open(admission, endpoint, payload, body.stream)
        else:
            with admission.hold_beside():
                upstream, response = await self._open(admission, endpoint, payload, body.stream)
            try:
                await admission.hold()
            except BaseException:
                response.close()
                admission.settle(0, "rejected", prompt_tokens=0)  # a hold that lands after all: released uncharged
                raise
        admission.backend = upstream.spec.name
        usage = Usage(self.counter, payload)
        if not body.stream:
            return await self._complete(admission, upstream, response, usage)
        relay = Relay(admission, self.spec.id, upstream, response, body.include_usage, usage)
        return Reply(admission.headers, events=relay.events(), after=relay.close)

    async def _open(
        self, admission: Admission, endpoint: str, payload: dict[str, Any], stream: bool
    ) -> tuple[Upstream, UpstreamReply]:
        try:
            return await self.router.open(endpoint, payload, stream, admission.request_id)
        except BaseException:
            admission.settle(0, "error", prompt_tokens=0)  # nothing was produced: nothing to charge
            raise

    async def _complete(self, admission: Admission, upstream: Upstream, response: UpstreamReply, usage: Usage) -> Reply:
        try:
            data = response.json()
            choices = data["choices"]
            for choice in choices:
                usage.add(choice, choice.get("message") or {})
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            admission.settle(0, "error", prompt_tokens=0)  # nothing usable was delivered: nothing to charge
            upstream.failed()
            raise gateway_error(502, "sent a reply that is not a completion") from e
        data["model"] = self.spec.id
        usage.reported = data.get("usage") or {}
        try:
            data["usage"] = counts = await usage.counts()
        except BaseException:  # cancelled while counting: settle now, by estimate
            _settle(admission, usage.estimate(), "cancelled")
            raise
        # Settled once the reply has gone out (or failed to): the settlement's work waits until then.
        return Reply(admission.headers, body=data, after=partial(_settle, admission, counts, "ok"))


def prompt_bound(payload: dict[str, Any]) -> int:
    """An upper bound of the prompt's tokens, for the hold: every token covers at least one byte of text, and an
    image counts as IMAGE_TOKEN_BOUND tokens."""
    text, other = prompt_size(payload)
    return text + other + (TEMPLATE_ALLOWANCE if "messages" in payload else 0)


def image_parts(payload: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """The payload's image parts, each with its place (messages[i].content[j])."""
    return [
        (part, f"messages[{i}].content[{j}]")
        for i, message in enumerate(payload.get("messages") or [])
        for j, part in enumerate(message.get("content") if isinstance(message.get("content"), list) else [])
        if isinstance(part, dict) and part.get("type") == "image_url"
    ]


async def inline_images(payload: dict[str, Any], spec: ModelSpec, limits: ImageLimits) -> None:
    """Fetch and check every image part here and pass it on as a data URI, so the upstream never fetches an
    address the gateway would refuse."""
    parts = image_parts(payload)
    if parts and "vision" not in spec.capabilities:
        raise image_refused(spec.id, parts[0][1])
    images = RequestImages([where for _, where in parts], limits)
    for part, where in parts:
        image = await images.load(part["image_url"]["url"], where)
        part["image_url"] = {**part["image_url"], "url": image.data_uri()}


def upstream_payload(body: SamplingFields) -> dict[str, Any]:
    """The request as an upstream engine is sent it: the fields we accept and ignore are never serialized (an
    engine written by others may refuse them), and stream_options goes only with a stream."""
    payload = body.model_dump(exclude_unset=True, by_alias=True)
    if not body.stream:
        payload.pop("stream_options", None)
    return payload


class Usage:
    """A request's token counts: the upstream's `usage` where it sent one, else counted (TokenCounter) from the
    request and the text delivered, and then marked `estimated` unless a tokenizer counted them."""

    def __init__(self, counter: TokenCounter, payload: dict[str, Any]) -> None:
        self.counter, self.payload = counter, payload
        self.reported: dict[str, Any] = {}
        self.texts: dict[int, list[str]] = {}  # each choice's delivered text: content, tool-call names and arguments

    def add(self, choice: dict[str, Any], message: dict[str, Any]) -> None:
        """Note the text of a choice (non-streamed) or of a stream's delta."""
        texts = self.texts.setdefault(int(choice.get("index") or 0), [])
        texts.append(message.get("content") or choice.get("text") or "")
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            texts.append((function.get("name") or "") + (function.get("arguments") or ""))

    @property
    def known(self) -> bool:
        return isinstance(self.reported.get("completion_tokens"), int)

    async def counts(self) -> dict[str, Any]:
        """The usage object for the client and the settlement (`estimated: true` when estimated)."""
        if self.known:
            prompt, completion = int(self.reported.get("prompt_tokens") or 0), int(self.reported["completion_tokens"])
            return {**self.reported, "prompt_tokens": prompt, "total_tokens": prompt + completion}
        texts = ["".join(t) for t in self.texts.values()]
        if self.counter.renderer is not None:  # rendering and tokenizing: off the event loop
            prompt, completion = await asyncio.to_thread(self._count, texts)
        else:
            prompt, completion = self._count(texts)
        usage = {"prompt_tokens": prompt.tokens, "completion_tokens": completion.tokens}
        usage["total_tokens"] = prompt.tokens + completion.tokens
        if prompt.estimated or completion.estimated:
            usage["estimated"] = True
        return usage

    def _count(self, texts: list[str]) -> tuple[Count, Count]:
        return self.counter.prompt(self.payload), self.counter.completion(texts)

    def estimate(self) -> dict[str, Any]:
        """The counts at once, estimated (for a settlement that cannot wait for a count)."""
        bytes_only = TokenCounter()
        prompt = bytes_only.prompt(self.payload).tokens
        completion = bytes_only.completion(["".join(t) for t in self.texts.values()]).tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "estimated": True}


def _settle(admission: Admission, usage: dict[str, Any], status: str) -> None:
    admission.settle(
        usage["completion_tokens"], status, prompt_tokens=usage["prompt_tokens"], estimated="estimated" in usage
    )


class MalformedStream(Exception):
    """The upstream's stream is not OpenAI's SSE (a line that is not JSON, an error event, an early end)."""


class Relay:
    """Streams an upstream's SSE to the client under our model name; keeps its usage for the settlement.

    Real engines differ: some send no usage chunk even when asked (the gateway then counts and, if the client
    asked, sends one itself), some end without `[DONE]` after the last choice finished (taken as done), some send
    keep-alive comments or `data:` without a space. A line that is not JSON, an error event or an end before any
    choice finished ends the client's stream with an error event; what was delivered is charged."""

    def __init__(
        self,
        admission: Admission,
        model_id: str,
        upstream: Upstream,
        response: UpstreamReply,
        wants_usage: bool,
        usage: Usage,
    ) -> None:
        self.admission, self.model_id, self.upstream, self.response = admission, model_id, upstream, response
        self.wants_usage, self.usage = wants_usage, usage
        self.finished = False  # a choice has a finish_reason
        self.done = False  # the stream ended as it should
        self.broken = False  # the upstream broke the stream (not the client leaving)
        self.closed = False
        self._settling: asyncio.Task[None] | None = None
        self.head: dict[str, Any] = {"object": "chat.completion.chunk"}  # the last chunk's id, object, created

    async def events(self) -> AsyncIterator[str]:
        try:
            async for event in self._relayed():
                yield event
            if self.wants_usage and not self.usage.known:  # the engine sent none: ours, before [DONE]
                yield sse({**self._head(), "choices": [], "usage": await self.usage.counts()})
            self.done = True
            yield SSE_DONE
        except (UpstreamFailure, TimeoutError, MalformedStream) as e:
            # Bytes already went to the client: no retry, no new status; end the stream with an error event.
            self.broken = True
            self.upstream.failed()
            what = "did not answer in time" if isinstance(e, TimeoutError) else str(e)
            yield sse(gateway_error(502, f"broke the stream: {what}").body.model_dump())
        finally:
            await self.close()

    async def _relayed(self) -> AsyncIterator[str]:
        """The upstream's events, rewritten, up to its [DONE] (or its end once a choice finished)."""
        async for line in self.response.lines():
            if not line.startswith("data:"):
                continue  # comments (keep-alives), event names, blank lines between events
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                raise MalformedStream(f"a line that is not JSON ({data[:80]!r})") from None
            if not isinstance(chunk, dict) or "error" in chunk:
                message, _ = error_detail(data, "an error event")
                raise MalformedStream(message)
            event = self._rewrite(chunk)
            if event is not None:
                yield event
        if not self.finished:
            raise MalformedStream("it ended before the completion finished")

    def _head(self) -> dict[str, Any]:
        return {**self.head, "model": self.model_id}

    def _rewrite(self, chunk: dict[str, Any]) -> str | None:
        if "model" in chunk:
            chunk["model"] = self.model_id
        self.head = {k: chunk[k] for k in ("id", "object", "created") if k in chunk} or self.head
        if chunk.get("usage"):
            self.usage.reported = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            self.usage.add(choice, delta)
            self.finished = self.finished or bool(choice.get("finish_reason"))
            if self.admission.first_token_at is None and (
                delta.get("content") or choice.get("text") or delta.get("tool_calls")
            ):
                self.admission.first_token_at = time.perf_counter()  # the first token, as the gateway sees it
        if not self.wants_usage:
            if not chunk.get("choices") and chunk.get("usage"):
                return None  # the usage chunk we asked for on our own account
            chunk.pop("usage", None)
        return sse(chunk)

    async def close(self) -> None:
        """Settle once (the stream ended, broke, or its client left): also when cancelled meanwhile."""
        if not self.closed:
            self.closed = True
            self.response.close()
            self._settling = asyncio.ensure_future(self._settle())
        if self._settling is not None:
            await asyncio.shield(self._settling)

    async def _settle(self) -> None:
        try:
            counts = await self.usage.counts()
        except Exception:  # a count must never leave the hold open: charge the estimate instead
            log.exception("counting the tokens of request %s", self.admission.request_id)
            counts = self.usage.estimate()
        status = "ok" if self.done else "error" if self.broken else "cancelled"
        _settle(self.admission, counts, status)
