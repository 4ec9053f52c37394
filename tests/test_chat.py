"""The OpenAI surface through the official client: shapes, streaming, usage, completions, models, tokenize."""

from __future__ import annotations

import httpx
import openai

from tests.conftest import MODEL, Server

HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]


def prompt_token_count(http: httpx.Client, messages: list[dict[str, object]]) -> int:
    r = http.post("/tokenize", json={"model": MODEL, "messages": messages})
    assert r.status_code == 200, r.text
    return r.json()["count"]


def test_chat_completion_shape_and_usage(client: openai.OpenAI, http: httpx.Client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, temperature=0)
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.model == MODEL
    assert r.created > 0
    [choice] = r.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None
    assert r.usage.prompt_tokens == prompt_token_count(http, HELLO)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 20


def test_completion_tokens_are_the_tokens_generated(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=23, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 23


def test_stream_reassembles_to_the_same_text(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=40, temperature=0.9, seed=1234)
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, stream=True))
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_content_parts_are_joined_like_a_string(http: httpx.Client) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    joined = [{"role": "user", "content": "Hello\nthere"}]
    assert prompt_token_count(http, parts) == prompt_token_count(http, joined)
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": parts, "max_tokens": 3})
    assert r.status_code == 200, r.text


def test_all_roles_and_names(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are terse.", "name": "rules"},
        {"role": "user", "content": "What is 2+2?", "name": "alice"},
        {"role": "assistant", "content": "4"},
        {"role": "tool", "content": '{"result": 4}', "tool_call_id": "call_1"},
        {"role": "user", "content": "Thanks"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)  # type: ignore[arg-type]
    assert r.choices[0].message.content is not None


def test_completions_echo_and_shape(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, echo=True)
    assert plain.object == "text_completion"
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    assert echoed.usage is not None and plain.usage is not None
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens == 6


def test_completions_stream_with_echo(client: openai.OpenAI) -> None:
    prompt = "Once upon a time"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text


def test_models(client: openai.OpenAI, http: httpx.Client) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert http.get("/v1/models/nope").status_code == 404


def test_tokenize_detokenize_round_trip(http: httpx.Client) -> None:
    text = "Hello, world! Ünïcödé ✓"
    tokens = http.post("/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert tokens["max_model_len"] > 0
    back = http.post("/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}).json()
    assert back["prompt"] == text
    chat = http.post("/tokenize", json={"model": MODEL, "messages": HELLO}).json()
    rendered = http.post("/detokenize", json={"model": MODEL, "tokens": chat["tokens"]}).json()["prompt"]
    assert "Write one sentence about the sea." in rendered
    assert rendered.endswith("<|im_start|>assistant\n")  # add_generation_prompt, from the GGUF's template


def test_health_and_metrics(server: Server, http: httpx.Client) -> None:
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    metrics = http.get("/metrics").text
    assert "llamaserve_engine_generated_tokens_total" in metrics
