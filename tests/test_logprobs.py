"""Logprobs and echo: the numbers are checked, not only the shape.

Prompt logprobs are compared with a recomputation done here, in the test process, with llama.cpp directly (our
ctypes layer, a fresh context, the whole prompt in one batch): no server code is involved in the reference.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from llamaserve.config import resolve_model
from llamaserve.engine import ContextConfig, LlamaModel
from llamaserve.engine.llama import Batch
from tests.conftest import MODEL

QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]
PROMPT = "The three primary colours are red, yellow and"


def reference_logprobs(tokens: list[int]) -> np.ndarray:
    """log-softmax rows for every prompt position, computed from scratch."""
    path, _ = resolve_model(None)
    model = LlamaModel(str(path), ContextConfig(n_ctx_seq=512, n_seq_max=1, n_batch=512, n_threads=2))
    batch = Batch(512)
    try:
        for pos, token in enumerate(tokens):
            batch.add(token, pos, 0, True)
        assert model.decode(batch) == 0
        rows = np.stack([np.ctypeslib.as_array(model.logits(i)).astype(np.float64) for i in range(len(tokens))])
    finally:
        batch.free()
        model.close()
    peak = rows.max(axis=1, keepdims=True)
    return rows - peak - np.log(np.exp(rows - peak).sum(axis=1, keepdims=True))


def check_alternatives(token_logprob: float, alternatives: list[float]) -> None:
    """Probabilities of a position's alternatives (best first) sum to at most 1, and the chosen token's own
    logprob is a real log-probability."""
    assert token_logprob <= 0
    assert alternatives == sorted(alternatives, reverse=True)
    assert sum(math.exp(v) for v in alternatives) <= 1 + 1e-6


def test_chat_greedy_tokens_have_the_top_logprob(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, logprobs=True, top_logprobs=5
    )
    choice = r.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    items = choice.logprobs.content
    assert r.usage is not None
    # One entry per generated token with text (an end-of-sequence token has none).
    assert len(items) == r.usage.completion_tokens - (choice.finish_reason == "stop")
    assert "".join(i.token for i in items) == choice.message.content
    for item in items:
        assert len(item.top_logprobs) == 5
        best = item.top_logprobs[0]
        assert best.token == item.token and best.logprob == pytest.approx(item.logprob, abs=1e-9)
        assert item.bytes == list(item.token.encode())
        check_alternatives(item.logprob, [t.logprob for t in item.top_logprobs])


def test_chat_sampled_logprobs_are_raw_distribution(client: openai.OpenAI) -> None:
    """Sampling filters do not change reported logprobs: top_k=1 makes the choice greedy, but the logprobs stay
    those of the full distribution (below 0, with alternatives that top_k removed)."""
    r = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=6,
        temperature=0.7,
        seed=3,
        logprobs=True,
        top_logprobs=3,
        extra_body={"top_k": 1},
    )
    items = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert items
    for item in items:
        assert item.token == item.top_logprobs[0].token  # top_k=1: always the best token
        assert item.logprob < 0 and len(item.top_logprobs) == 3


def test_chat_logprobs_stream_match_non_stream(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, messages=QUESTION, max_tokens=10, temperature=0, logprobs=True)
    whole = client.chat.completions.create(**kwargs, top_logprobs=2)
    streamed = []
    for chunk in client.chat.completions.create(**kwargs, top_logprobs=2, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                streamed += choice.logprobs.content
    expected = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [i.token for i in streamed] == [i.token for i in expected]
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in expected], abs=1e-3)


def test_completions_logprobs_with_echo_equal_recomputation(http: httpx.Client) -> None:
    tokens = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    r = http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 3, "echo": True},
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    n_prompt = len(tokens)
    assert len(lp["tokens"]) == n_prompt + 4
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    # Offsets index the returned text (echoed prompt + completion).
    for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
        assert choice["text"][offset : offset + len(token)] == token
    reference = reference_logprobs(tokens)
    for pos in range(1, n_prompt):
        assert lp["token_logprobs"][pos] == pytest.approx(reference[pos - 1, tokens[pos]], abs=1e-3)
        top = lp["top_logprobs"][pos]
        best = np.argsort(-reference[pos - 1])[:3]
        assert list(top.values()) == pytest.approx([reference[pos - 1, t] for t in best], abs=1e-3)
    for pos in range(n_prompt, n_prompt + 4):  # greedy: the chosen token is the most likely one
        assert lp["token_logprobs"][pos] == pytest.approx(max(lp["top_logprobs"][pos].values()), abs=1e-9)
        check_alternatives(lp["token_logprobs"][pos], list(lp["top_logprobs"][pos].values()))


def test_max_tokens_zero_scores_the_prompt(client: openai.OpenAI, http: httpx.Client) -> None:
    """How lm-evaluation-harness scores a continuation: max_tokens 0, echo, logprobs. Every prompt token's logprob
    (against a recomputation here), nothing generated, usage of the prompt alone; without echo it is a 400."""
    tokens = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    choice = r.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length" and choice.logprobs is not None
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tokens), 0)
    scores = choice.logprobs.token_logprobs
    assert scores is not None and len(scores) == len(tokens) and scores[0] is None
    reference = reference_logprobs(tokens)
    assert scores[1:] == pytest.approx([reference[pos - 1, tokens[pos]] for pos in range(1, len(tokens))], abs=1e-3)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    assert refused.value.body["param"] == "max_tokens"  # type: ignore[index]


def test_completions_logprobs_stream(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 2, "echo": True}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]
    tokens: list[str] = []
    values: list[float | None] = []
    offsets: list[int] = []
    text = ""
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                text += choice["text"]
                tokens += choice["logprobs"]["tokens"]
                values += choice["logprobs"]["token_logprobs"]
                offsets += choice["logprobs"]["text_offset"]
    assert text == whole["text"]
    assert tokens == whole["logprobs"]["tokens"]
    assert offsets == whole["logprobs"]["text_offset"]
    assert values[0] is None
    assert values[1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:], abs=1e-3)


def test_chat_echo_returns_the_rendered_prompt(http: httpx.Client) -> None:
    tokens = http.post("/tokenize", json={"model": MODEL, "messages": QUESTION}).json()["tokens"]
    rendered = http.post("/detokenize", json={"model": MODEL, "tokens": tokens}).json()["prompt"]
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 3, "temperature": 0, "echo": True}
    plain = http.post("/v1/chat/completions", json=body).json()
    assert plain["prompt"] == [{"text": rendered, "logprobs": None}]
    with_lp = http.post("/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 1}).json()
    prompt = with_lp["prompt"][0]
    assert prompt["text"] == rendered
    assert len(prompt["logprobs"]["tokens"]) == with_lp["usage"]["prompt_tokens"] == len(tokens)
    reference = reference_logprobs(tokens)
    assert prompt["logprobs"]["token_logprobs"][0] is None
    for pos in range(1, len(tokens)):
        assert prompt["logprobs"]["token_logprobs"][pos] == pytest.approx(reference[pos - 1, tokens[pos]], abs=1e-3)
    # Streaming carries the same prompt in a chunk of its own.
    prompts = []
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                prompts += json.loads(line[6:]).get("prompt") or []
    assert prompts == [{"text": rendered, "logprobs": None}]
