"""Generation on the local engine, what chat and completions share: sampling checks, prompt work sized off the
event loop, the token budget, submitting to the engine, and collecting its outputs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from llamaserve.backends.local import LocalModel
from llamaserve.billing.pricing import Price
from llamaserve.chat.images import ImageLimits
from llamaserve.engine import EngineOverloaded, InvalidPrompt, Output, RequestHandle, SamplingParams
from llamaserve.engine.logprobs import TokenLogprob
from llamaserve.engine.mtmd import Chunk
from llamaserve.protocol.common import SamplingFields
from llamaserve.protocol.errors import APIError, invalid, shutting_down
from llamaserve.serving.admission import Admission, Call, Gate
from llamaserve.serving.reply import Reply


def check_sampling(body: SamplingFields, model: LocalModel) -> None:
    if body.n > model.engine.n_slots:
        raise invalid(f"n={body.n} exceeds the {model.engine.n_slots} parallel sequences this server runs", "n")
    for key in body.logit_bias or {}:
        if not model.llama.is_valid_token(int(key)):
            raise invalid(
                f"logit_bias token id {key} is not in the vocabulary (0..{model.llama.n_vocab - 1})",
                "logit_bias",
            )


# Rendering and tokenizing run on the event loop up to this much text (a few ms at most: tokenizing runs at
# 0.6 to 2 MB/s here), beyond it in a worker thread, so that a large prompt cannot stall every other request.
INLINE_PROMPT_BYTES = 4096
T = TypeVar("T")


def text_bytes(texts: Iterable[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def check_prompt_bytes(model: LocalModel, size: int, param: str) -> None:
    """Refuse, before any work, a prompt whose UTF-8 size no context of this model can hold."""
    if size > model.max_prompt_bytes:
        raise invalid(
            f"the prompt is {size} bytes: more than this model's context of {model.max_model_len} tokens can hold "
            f"whatever the text ({model.max_prompt_bytes} bytes)",
            param,
            code="context_length_exceeded",
        )


MESSAGE_WORK_BYTES = 256  # what rendering one message costs, as bytes of text: many small messages add up
SCHEMA_WORK_BYTES = 64 * 1024  # tools or a response schema: grammars to build, tools to render; never inline


def chat_work(text_size: int, messages: list[Any], schemas: bool) -> int:
    """A chat prompt's rendering work, in bytes of text (prompt_work's measure); `schemas`: it has tools or a
    JSON schema to follow."""
    return text_size + MESSAGE_WORK_BYTES * len(messages) + (SCHEMA_WORK_BYTES if schemas else 0)


async def prompt_work(size: int, work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` (rendering, tokenizing) for a prompt of `size` bytes: inline when small, else in a thread
    (llama_tokenize releases the GIL; a template renders in bytecode, which gives the loop its turns)."""
    if size <= INLINE_PROMPT_BYTES:
        return work(*args)
    return await asyncio.to_thread(work, *args)


def completion_budget(model: LocalModel, prompt_sizes: list[int], params: SamplingParams, n: int) -> int:
    """The most completion tokens a request can produce: what its hold and its token limit are sized for.
    prompt_sizes: each prompt's tokens (image tokens included)."""
    return n * sum(max(0, min(params.max_tokens, model.max_model_len - size)) for size in prompt_sizes)


def _overloaded(message: str) -> APIError:
    return APIError(503, message, type="server_overloaded", code="engine_overloaded", headers={"Retry-After": "1"})


def refuse_when_full(model: LocalModel, sequences: int) -> None:
    """503 before any hold when the engine's queue cannot take `sequences` more: under overload a refusal then
    costs no database write (submit checks again, exactly; this is the cheap early answer)."""
    engine = model.engine
    if engine.outstanding + sequences > engine.n_slots + engine.max_waiting:
        raise _overloaded(
            f"the engine is at capacity ({engine.n_slots} running, {engine.max_waiting} queued); retry shortly"
        )


def submit(
    model: LocalModel,
    prompts: Sequence[Sequence[int] | Sequence[Chunk]],
    params: SamplingParams,
    n: int,
    param: str,
    admission: Admission,
) -> list[RequestHandle]:
    """Queue every prompt of an admitted request; its credits settle when all of them have closed."""
    admission.backend = "local"
    handles: list[RequestHandle] = []
    try:
        for prompt in prompts:
            tenant, background = admission.caller.limit_key, admission.handed_over is not None  # a batch line
            handles.append(model.engine.submit(prompt, params, n, tenant=tenant, background=background))
    except (InvalidPrompt, EngineOverloaded) as e:
        for h in handles:
            h.close()
        admission.settle(0, "rejected")
        if isinstance(e, InvalidPrompt):
            raise invalid(str(e), param, code=e.code) from e
        raise _overloaded(str(e)) from e
    admission.settle_on_close(handles)
    return handles


def engine_error(out: Output) -> APIError:
    return APIError(500, f"generation failed: {out.error}", type="server_error", code="engine_error")


async def merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Output]]:
    """Outputs of several requests as they come, tagged with the request's index."""
    if len(handles) == 1:
        async for out in handles[0].outputs():
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, Output | None]] = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle) -> None:
        async for out in handle.outputs():
            queue.put_nowait((i, out))
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for h in handles:
            h.close()


@dataclass
class ChoiceResult:
    """Everything one choice produced, for a non-streaming response."""

    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None


async def collect(call: Call, handles: list[RequestHandle], n: int, admission: Admission) -> list[ChoiceResult]:
    """All outputs of all choices (request i's choice c at i * n + c); cancels generation if the client goes
    away first, when the request runs past the platform's request_timeout (504), or when the server stops (503)."""
    results = [ChoiceResult() for _ in range(len(handles) * n)]

    async def consume() -> None:
        async for i, out in merged(handles):
            if out.error:
                raise engine_error(out)
            result = results[i * n + out.choice]
            result.text += out.text
            result.logprobs += out.logprobs or []
            if out.prompt_logprobs is not None:
                result.prompt_logprobs = out.prompt_logprobs
            if out.finish_reason:
                result.finish_reason = out.finish_reason

    work = asyncio.create_task(consume())
    watch = asyncio.create_task(call.disconnected())
    stopped = asyncio.create_task(call.server_stopping.wait())
    timeout = admission.timeout
    try:
        done, _ = await asyncio.wait([work, watch, stopped], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            admission.status = "timeout"
    finally:
        watch.cancel()
        stopped.cancel()
        if not work.done():
            work.cancel()
            for h in handles:  # frees their slots at the engine's next step; settles what they produced
                h.close()
    if not done:
        raise APIError(
            504, f"the request took longer than {timeout}s and was stopped", type="timeout", code="request_timeout"
        )
    if stopped in done and work not in done:
        raise shutting_down()
    if work not in done:
        raise APIError(499, "the client closed the connection", code="client_closed_request")
    work.result()
    return results


def streamed(events: AsyncIterator[str], handles: list[RequestHandle], admission: Admission) -> Reply:
    """A stream's reply; its handles close once it has gone out (also when the client left before it started)."""

    def close() -> None:
        for h in handles:
            h.close()

    return Reply(admission.headers, events=events, after=close)


@dataclass
class LocalSetup:
    """What serving a local model works with: the model and its engine, admission, the model's price (None: the
    platform's), and the limits its image parts are fetched under."""

    model: LocalModel
    gate: Gate
    price: Price | None
    image_limits: ImageLimits
