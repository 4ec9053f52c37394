"""The OpenAI-compatible routes: chat completions, completions, models, tokenize and detokenize."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from llamaserve.backends.local import LocalModel
from llamaserve.chat.template import TemplateError
from llamaserve.engine import EngineOverloaded, InvalidPrompt, Output, RequestHandle, SamplingParams
from llamaserve.protocol.chat import ChatCompletion, ChatCompletionRequest, ChatMessage
from llamaserve.protocol.common import SamplingFields
from llamaserve.protocol.completions import Completion, CompletionRequest
from llamaserve.protocol.errors import APIError, invalid
from llamaserve.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter()

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy endpoint


def _model(request: Request, name: str | None) -> LocalModel:
    model: LocalModel = request.app.state.model
    if name is not None and name != model.id:
        raise APIError(
            404,
            f"The model '{name}' does not exist. Available: {model.id}",
            param="model",
            code="model_not_found",
            type="not_found_error",
        )
    return model


# --- validation beyond field ranges ---------------------------------------------------------------------------
def _check_sampling(body: SamplingFields, model: LocalModel) -> None:
    if body.n > model.engine.n_slots:
        raise invalid(f"n={body.n} exceeds the {model.engine.n_slots} parallel sequences this server runs", "n")
    if body.stream_options is not None and not body.stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    for key in body.logit_bias or {}:
        if not model.llama.is_valid_token(int(key)):
            raise invalid(
                f"logit_bias token id {key} is not in the vocabulary (0..{model.llama.n_vocab - 1})",
                "logit_bias",
            )


def _not_yet(param: str, what: str) -> APIError:
    return invalid(f"{what} is not supported by this server yet", param, code="unsupported_parameter")


def _check_chat_features(body: ChatCompletionRequest, model: LocalModel) -> None:
    if body.logprobs or body.top_logprobs is not None:
        raise _not_yet("logprobs", "logprobs")
    if body.echo:
        raise _not_yet("echo", "echo on chat completions")
    if body.tools and body.tool_choice != "none":
        raise _not_yet("tools", "tool calling")
    if body.response_format is not None and body.response_format.type != "text":
        raise _not_yet("response_format", f"response_format {body.response_format.type!r}")
    for i, message in enumerate(body.messages):
        if message.has_images():
            raise invalid(
                f"model {model.id} does not accept image input (messages[{i}].content has an image_url part)",
                f"messages[{i}].content",
                code="image_input_not_supported",
            )


def _template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def _submit(model: LocalModel, prompt: list[int], params: SamplingParams, n: int, param: str) -> RequestHandle:
    try:
        return model.engine.submit(prompt, params, n)
    except InvalidPrompt as e:
        raise invalid(str(e), param, code=e.code) from e
    except EngineOverloaded as e:
        raise APIError(
            503, str(e), type="server_overloaded", code="engine_overloaded", headers={"Retry-After": "1"}
        ) from e


# --- shared response pieces -----------------------------------------------------------------------------------
def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _engine_error(out: Output) -> APIError:
    return APIError(500, f"generation failed: {out.error}", type="server_error", code="engine_error")


async def _merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Output]]:
    """Outputs of several requests as they come, tagged with the request's index."""
    if len(handles) == 1:
        async for out in handles[0].outputs():
            yield 0, out
        return
    merged: asyncio.Queue[tuple[int, Output | None]] = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle) -> None:
        async for out in handle.outputs():
            merged.put_nowait((i, out))
        merged.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            i, item = await merged.get()
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


async def _collect(request: Request, handles: list[RequestHandle], n: int) -> tuple[list[str], list[str | None]]:
    """All text of all choices; cancels generation if the client goes away first."""
    texts = [""] * (len(handles) * n)
    reasons: list[str | None] = [None] * len(texts)

    async def consume() -> None:
        async for i, out in _merged(handles):
            if out.error:
                raise _engine_error(out)
            texts[i * n + out.choice] += out.text
            if out.finish_reason:
                reasons[i * n + out.choice] = out.finish_reason

    work = asyncio.create_task(consume())
    watch = asyncio.create_task(_until_disconnected(request))
    try:
        done, _ = await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            for h in handles:  # frees their slots at the engine's next step
                h.close()
    if work not in done:
        raise APIError(499, "the client closed the connection", code="client_closed_request")
    work.result()
    return texts, reasons


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _sse_response(stream: AsyncIterator[str], handles: list[RequestHandle]) -> StreamingResponse:
    def close() -> None:  # also when the client left before the stream started
        for h in handles:
            h.close()

    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(close),
    )


# --- chat -----------------------------------------------------------------------------------------------------
@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    model = _model(request, body.model)
    _check_sampling(body, model)
    _check_chat_features(body, model)
    try:
        prompt_text = model.render_chat(_template_messages(body.messages))
    except TemplateError as e:
        raise invalid(str(e), "messages") from e
    prompt = model.tokenize_chat_prompt(prompt_text)
    fields = body.model_copy(update={"max_tokens": body.max_completion_tokens or body.max_tokens})
    handle = _submit(model, prompt, fields.sampling_params(model.config.default_max_tokens), body.n, "messages")
    rid, created = _new_id("chatcmpl"), int(time.time())
    if body.stream:
        return _sse_response(_chat_stream(handle, rid, created, model.id, body.include_usage), [handle])
    texts, reasons = await _collect(request, [handle], body.n)
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model.id,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": reason,
                }
                for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
            ],
            "usage": _usage(len(prompt), handle.completion_tokens, handle.cached_tokens),
        }
    )


async def _chat_stream(
    handle: RequestHandle, rid: str, created: int, model_id: str, include_usage: bool
) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]]) -> str:
        data: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "choices": choices,
        }
        if include_usage:
            data["usage"] = None
        return _sse(data)

    try:
        for i in range(handle.n):
            yield chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        async for out in handle.outputs():
            if out.error:
                yield _sse(_engine_error(out).body.model_dump())
                return
            if out.text or out.finish_reason:
                delta = {"content": out.text} if out.text else {}
                yield chunk(
                    [
                        {
                            "index": out.choice,
                            "delta": delta,
                            "logprobs": None,
                            "finish_reason": out.finish_reason,
                        }
                    ]
                )
        if include_usage:
            usage = _usage(len(handle.prompt_tokens), handle.completion_tokens, handle.cached_tokens)
            yield _sse(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model_id,
                    "choices": [],
                    "usage": usage,
                }
            )
        yield "data: [DONE]\n\n"
    finally:
        handle.close()


# --- completions ----------------------------------------------------------------------------------------------
@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request) -> Any:
    model = _model(request, body.model)
    _check_sampling(body, model)
    if body.logprobs is not None:
        raise _not_yet("logprobs", "logprobs")
    if body.suffix:
        raise invalid(
            f"model {model.id} does not support suffix (fill-in-the-middle)",
            "suffix",
            code="unsupported_parameter",
        )
    prompts: list[list[int]] = []
    for p in body.prompts():
        tokens = model.tokenize_text(p) if isinstance(p, str) else p
        if any(not model.llama.is_valid_token(t) for t in tokens):
            raise invalid(f"prompt has token ids outside the vocabulary (0..{model.llama.n_vocab - 1})", "prompt")
        prompts.append(tokens)
    params = body.sampling_params(COMPLETIONS_DEFAULT_MAX_TOKENS)
    handles: list[RequestHandle] = []
    try:
        for tokens in prompts:
            handles.append(_submit(model, tokens, params, body.n, "prompt"))
    except APIError:
        for h in handles:
            h.close()
        raise
    echoes = [model.detokenize(t) if body.echo else "" for t in prompts]
    rid, created = _new_id("cmpl"), int(time.time())
    if body.stream:
        return _sse_response(
            _completion_stream(handles, echoes, body.n, rid, created, model.id, body.include_usage), handles
        )
    texts, reasons = await _collect(request, handles, body.n)
    usage = _usage(
        sum(len(p) for p in prompts),
        sum(h.completion_tokens for h in handles),
        sum(h.cached_tokens for h in handles),
    )
    choices = [
        {"index": i, "text": echoes[i // body.n] + text, "logprobs": None, "finish_reason": reasons[i]}
        for i, text in enumerate(texts)
    ]
    return JSONResponse(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model.id,
            "choices": choices,
            "usage": usage,
        }
    )


async def _completion_stream(
    handles: list[RequestHandle],
    echoes: list[str],
    n: int,
    rid: str,
    created: int,
    model_id: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(index: int, text: str, finish_reason: str | None) -> str:
        data: dict[str, Any] = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model_id,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            data["usage"] = None
        return _sse(data)

    for i, echo in enumerate(echoes):
        if echo:
            for c in range(n):
                yield chunk(i * n + c, echo, None)
    async for i, out in _merged(handles):
        if out.error:
            yield _sse(_engine_error(out).body.model_dump())
            return
        if out.text or out.finish_reason:
            yield chunk(i * n + out.choice, out.text, out.finish_reason)
    if include_usage:
        usage = _usage(
            sum(len(h.prompt_tokens) for h in handles),
            sum(h.completion_tokens for h in handles),
            sum(h.cached_tokens for h in handles),
        )
        yield _sse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model_id,
                "choices": [],
                "usage": usage,
            }
        )
    yield "data: [DONE]\n\n"


# --- models, tokenize -----------------------------------------------------------------------------------------
def _model_card(model: LocalModel, created: int) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": created,
        "owned_by": "llamaserve",
        "max_model_len": model.max_model_len,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    model: LocalModel = request.app.state.model
    return {"object": "list", "data": [_model_card(model, request.app.state.started)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    return _model_card(_model(request, model_id), request.app.state.started)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    model = _model(request, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise invalid("give exactly one of prompt or messages", "prompt")
    if body.messages is not None:
        try:
            text = model.render_chat(_template_messages(body.messages), body.add_generation_prompt)
        except TemplateError as e:
            raise invalid(str(e), "messages") from e
        tokens = model.tokenize_chat_prompt(text)
    else:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        tokens = model.tokenize_text(body.prompt or "", add_special=add_special)
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=model.max_model_len)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    model = _model(request, body.model)
    if any(not model.llama.is_valid_token(t) for t in body.tokens):
        raise invalid(f"token ids must be in 0..{model.llama.n_vocab - 1}", "tokens")
    return DetokenizeResponse(prompt=model.detokenize(body.tokens))
