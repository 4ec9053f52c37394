"""Text completions on the local engine (OpenAI's legacy endpoint), with echo and logprobs."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from llamaserve.backends.local import LocalModel
from llamaserve.engine import Output, RequestHandle
from llamaserve.engine.logprobs import TokenLogprob
from llamaserve.protocol.completions import DEFAULT_COMPLETION_MAX_TOKENS, CompletionRequest
from llamaserve.protocol.errors import invalid
from llamaserve.serving.admission import Call
from llamaserve.serving.generation import (
    LocalSetup,
    check_prompt_bytes,
    check_sampling,
    collect,
    completion_budget,
    engine_error,
    merged,
    prompt_work,
    refuse_when_full,
    streamed,
    submit,
    text_bytes,
)
from llamaserve.serving.logprobs import LegacyLogprobs
from llamaserve.serving.reply import SSE_DONE, Reply, new_id, sse, usage

TOKEN_BYTES = 4  # a prompt of token ids, measured as text: ids are checked one by one


def _prompts(body: CompletionRequest, model: LocalModel) -> list[list[int]]:
    prompts = []
    for p in body.prompts():
        tokens = model.tokenize_text(p) if isinstance(p, str) else p
        if any(not model.llama.is_valid_token(t) for t in tokens):
            raise invalid(f"prompt has token ids outside the vocabulary (0..{model.llama.n_vocab - 1})", "prompt")
        prompts.append(tokens)
    return prompts


async def create_completion(local: LocalSetup, body: CompletionRequest, call: Call) -> Reply:
    model = local.model
    check_sampling(body, model)
    if body.max_tokens == 0 and not body.echo:
        raise invalid("max_tokens 0 generates nothing: it scores the prompt, with echo (and logprobs)", "max_tokens")
    if body.suffix:
        raise invalid(
            f"model {model.id} does not support suffix (fill-in-the-middle)", "suffix", code="unsupported_parameter"
        )
    work = 0
    for p in body.prompts():  # cheap refusals first: each prompt must fit the context
        if isinstance(p, str):
            check_prompt_bytes(model, text_bytes([p]), "prompt")
        elif len(p) >= model.max_model_len:
            message = f"the prompt is {len(p)} tokens; this model's context is {model.max_model_len} tokens"
            raise invalid(message, "prompt", code="context_length_exceeded")
        work += text_bytes([p]) if isinstance(p, str) else TOKEN_BYTES * len(p)
    await local.gate.check(call.caller, 1)  # a key over its limits: 429 before tokenizing
    prompts = await prompt_work(work, _prompts, body, model)
    params = dataclasses.replace(
        body.sampling_params(DEFAULT_COMPLETION_MAX_TOKENS),
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if body.echo else None,
    )
    budget = completion_budget(model, [len(p) for p in prompts], params, body.n)
    prompt_tokens = sum(len(p) for p in prompts)
    refuse_when_full(model, len(prompts) * body.n)
    admission = await local.gate.admit(call, model.id, prompt_tokens, budget, local.price)
    handles = submit(model, prompts, params, body.n, "prompt", admission)
    echoes = [model.detokenize(t) if body.echo else "" for t in prompts]
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model.id}
    if body.stream:
        return streamed(_stream(model, body, handles, echoes, head), handles, admission)
    results = await collect(call, handles, body.n, admission)
    choices = []
    for i, r in enumerate(results):
        logprobs = None
        if body.logprobs is not None:
            build = LegacyLogprobs(model.llama)
            # Every choice of a prompt echoes the same prompt; its first choice computed the logprobs.
            prompt_logprobs = results[i - i % body.n].prompt_logprobs if body.echo else None
            logprobs = _joined(build(prompt_logprobs or []), build(r.logprobs)) if body.echo else build(r.logprobs)
        choices.append(
            {"index": i, "text": echoes[i // body.n] + r.text, "logprobs": logprobs, "finish_reason": r.finish_reason}
        )
    u = usage(
        sum(len(p) for p in prompts),
        sum(h.completion_tokens for h in handles),
        sum(h.cached_tokens for h in handles),
    )
    return Reply(admission.headers, body={**head, "choices": choices, "usage": u})


def _joined(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {key: a[key] + b[key] for key in a}


async def _stream(
    model: LocalModel, body: CompletionRequest, handles: list[RequestHandle], echoes: list[str], head: dict
) -> AsyncIterator[str]:
    n = body.n
    builders = [LegacyLogprobs(model.llama) for _ in range(len(handles) * n)]

    def chunk(index: int, text: str, out: Output | None, logprobs: list[TokenLogprob] | None = None) -> str:
        if logprobs is None:
            logprobs = out.logprobs or [] if out else []
        lp = builders[index](logprobs) if body.logprobs is not None else None
        choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": out.finish_reason if out else None}
        data: dict[str, Any] = {**head, "choices": [choice]}
        if body.include_usage:
            data["usage"] = None
        return sse(data)

    # Echo goes first; with logprobs it waits for the prompt's numbers, which come with its first output.
    wait_for_prompt = body.echo and body.logprobs is not None
    held: dict[int, list[Output]] = {i: [] for i in range(len(handles))} if wait_for_prompt else {}
    if body.echo and not wait_for_prompt:
        for i, echo in enumerate(echoes):
            for c in range(n):
                yield chunk(i * n + c, echo, None, [])
    async for i, out in merged(handles):
        if out.error:
            yield sse(engine_error(out).body.model_dump())
            return
        if i in held:
            if out.prompt_logprobs is None:
                held[i].append(out)  # another choice of this prompt got ahead of the first
                continue
            for c in range(n):
                yield chunk(i * n + c, echoes[i], None, out.prompt_logprobs)
            for early in held.pop(i):
                yield chunk(i * n + early.choice, early.text, early)
        if out.text or out.finish_reason or out.logprobs:
            yield chunk(i * n + out.choice, out.text, out)
    if body.include_usage:
        u = usage(
            sum(h.prompt_tokens for h in handles),
            sum(h.completion_tokens for h in handles),
            sum(h.cached_tokens for h in handles),
        )
        yield sse({**head, "choices": [], "usage": u})
    yield SSE_DONE
