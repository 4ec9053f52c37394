"""What the chat and completions routes share: the model lookup, sampling checks, submitting to the engine,
collecting or streaming its outputs, usage and SSE framing."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from llamaserve.api.platform import Admission
from llamaserve.backends.local import LocalModel
from llamaserve.chat.images import ImageBudget, ImageLimits
from llamaserve.engine import EngineOverloaded, InvalidPrompt, Output, RequestHandle, SamplingParams
from llamaserve.engine.logprobs import TokenLogprob
from llamaserve.engine.mtmd import Chunk
from llamaserve.protocol.common import SamplingFields
from llamaserve.protocol.errors import APIError, invalid


def get_model(request: Request, name: str | None) -> LocalModel:
    """The local model a name (id or alias) means, or 404 listing what exists."""
    model: LocalModel | None = request.app.state.model
    if model is None or (name is not None and name not in request.app.state.local_names):
        available = sorted({*request.app.state.local_names, *request.app.state.upstream_models})
        raise APIError(
            404,
            f"The model '{name}' does not exist. Available: {', '.join(available)}",
            param="model",
            code="model_not_found",
            type="not_found_error",
        )
    return model


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


def image_budget(places: list[str], limits: ImageLimits) -> ImageBudget:
    """The budget a request's images (at `places`, in order) are loaded under; 400 at the first one past the
    count a request may hold, before anything is fetched."""
    if len(places) > limits.max_images:
        where = places[limits.max_images]
        raise invalid(f"{where}: a request may hold at most {limits.max_images} images", where, code="too_many_images")
    return ImageBudget(limits)


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
            handles.append(model.engine.submit(prompt, params, n, tenant=admission.caller.limit_key))
    except (InvalidPrompt, EngineOverloaded) as e:
        for h in handles:
            h.close()
        admission.status = "rejected"
        admission.settle_soon([])
        if isinstance(e, InvalidPrompt):
            raise invalid(str(e), param, code=e.code) from e
        raise _overloaded(str(e)) from e
    admission.settle_when_closed(handles)
    return handles


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


def engine_error(out: Output) -> APIError:
    return APIError(500, f"generation failed: {out.error}", type="server_error", code="engine_error")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


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


async def _until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so that is the next message)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class ChoiceResult:
    """Everything one choice produced, for a non-streaming response."""

    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None


async def collect(request: Request, handles: list[RequestHandle], n: int, admission: Admission) -> list[ChoiceResult]:
    """All outputs of all choices (request i's choice c at i * n + c); cancels generation if the client goes
    away first, or when the request runs past the platform's request_timeout (504)."""
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
    watch = asyncio.create_task(_until_disconnected(request))
    timeout = admission.timeout
    try:
        done, _ = await asyncio.wait([work, watch], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            admission.status = "timeout"
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            for h in handles:  # frees their slots at the engine's next step; settles what they produced
                h.close()
    if not done:
        raise APIError(
            504, f"the request took longer than {timeout}s and was stopped", type="timeout", code="request_timeout"
        )
    if work not in done:
        raise APIError(499, "the client closed the connection", code="client_closed_request")
    work.result()
    return results


def sse_response(
    stream: AsyncIterator[str], handles: list[RequestHandle], headers: dict[str, str]
) -> StreamingResponse:
    def close() -> None:  # also when the client left before the stream started
        for h in handles:
            h.close()

    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        background=BackgroundTask(close),
    )
