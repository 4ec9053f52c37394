"""Defects fuzzing found: one bad request must cost only itself (the engine, the event loop and other requests go
on), and requests too large to serve are refused early and cheaply."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest

from llamaserve.engine import Engine, LlamaModel, SamplingParams
from tests.conftest import MODEL, Server

T = TypeVar("T")


# --- the engine, driven directly: what reaches it past the API's validation must still fail alone -------------
def run_engine(model: LlamaModel, body: Callable[[Engine], Awaitable[T]]) -> T:
    async def main() -> T:
        engine = Engine(model)
        engine.start(asyncio.get_running_loop())
        try:
            return await asyncio.wait_for(body(engine), 60)
        finally:
            engine.stop()

    return asyncio.run(main())


async def generate(engine: Engine, tokens: list[int], params: SamplingParams) -> tuple[str, str | None, str | None]:
    """(text, finish_reason, error) of one request."""
    text, reason, error = "", None, None
    async for out in engine.submit(tokens, params).outputs():
        text += out.text
        reason = out.finish_reason or reason
        error = out.error or error
    return text, reason, error


@pytest.mark.parametrize(
    "grammar",
    [
        'root ::= "\ud800"',  # a lone surrogate: UTF-8 cannot carry it (this used to end the engine loop)
        "root ::= ( ",  # llama.cpp refuses to parse it
        "root ::= x",  # an undefined rule
    ],
)
def test_a_request_whose_sampler_cannot_be_built_fails_alone(embedded_llama: LlamaModel, grammar: str) -> None:
    prompt = embedded_llama.tokenize("The capital of France is", add_special=True)
    greedy = SamplingParams(max_tokens=4, temperature=0.0)

    async def body(engine: Engine) -> list[tuple[str, str | None, str | None]]:
        bad = SamplingParams(max_tokens=4, temperature=0.0, grammar=grammar)
        results = [await generate(engine, prompt, bad)]
        results += await asyncio.gather(generate(engine, prompt, greedy), generate(engine, prompt, bad))
        assert engine.alive
        return results

    (_, reason, error), good, (_, reason2, error2) = run_engine(embedded_llama, body)
    assert reason == reason2 == "error" and error and error2 and "grammar" in error
    assert good[1] == "length" and good[0] and good[2] is None


# --- through a real server ------------------------------------------------------------------------------------
def chat(http: httpx.Client, **fields: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, **fields}
    return http.post("/v1/chat/completions", json=body)


def assert_still_serving(server: Server, http: httpx.Client) -> None:
    r = chat(http)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200


LONE_SURROGATE_SCHEMA = '{"type": "object", "properties": {"\\ud800": {"type": "string"}}, "required": ["\\ud800"]}'


@pytest.mark.parametrize(
    "response_format",
    [
        '{"type": "json_schema", "json_schema": {"name": "x", "schema": ' + LONE_SURROGATE_SCHEMA + "}}",
        '{"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["\\udfff"]}}}',
    ],
)
def test_a_lone_surrogate_in_a_schema_is_a_400_and_the_server_goes_on(
    server: Server, http: httpx.Client, response_format: str
) -> None:
    # Raw JSON: the escape \ud800 is valid JSON that no Python str written here could carry to the wire.
    raw = '{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "response_format": %s}'
    r = http.post(
        "/v1/chat/completions",
        content=(raw % (MODEL, response_format)).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("response_format"), r.text
    assert_still_serving(server, http)


# A schema the API's validation lets through (its $ref loop opens an object each time round) but whose every
# value must hold another: no finite value. Before, llama.cpp took the grammar and generated until max_tokens.
ENDLESS = {
    "$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}, "required": ["next"]}},
    "$ref": "#/$defs/node",
}


def test_a_schema_with_no_finite_value_is_a_400(server: Server, http: httpx.Client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "endless", "schema": ENDLESS}}
    r = chat(http, response_format=fmt, max_tokens=64)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format.json_schema.schema" and error["code"] == "unsupported_schema"
    assert "no finite value" in error["message"]
    tool = {"type": "function", "function": {"name": "walk", "parameters": ENDLESS}}
    r = chat(http, tools=[tool], tool_choice="required", max_tokens=64)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "tools[0].function.parameters" and "no finite value" in error["message"]
    assert_still_serving(server, http)


# --- /v1/completions: a bounded number of choices ---------------------------------------------------------
@pytest.mark.parametrize(
    ("prompt", "n", "message"),
    [
        (["Hi"] * 129, 1, "at most 128 prompts"),
        ([[1, 2]] * 129, 1, "at most 128 prompts"),
        (["Hi"] * 20, 8, "n × the number of prompts may be at most 128, got 8 × 20"),
    ],
)
def test_too_many_completion_choices_are_a_400(http: httpx.Client, prompt: list[Any], n: int, message: str) -> None:
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "n": n, "max_tokens": 1})
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["param"] == "prompt" and message in error["message"], error


def test_128_completion_choices_are_served(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": ["Hi"] * 16, "n": 8, "max_tokens": 1})
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["choices"]) == 128


# --- prompt size: refused by bytes at once, or rendered and tokenized off the event loop -----------------------
PARTS = [{"type": "text", "text": "é" * 10**6}]  # 2 MB in 1 M characters


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 3_000_000}]}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PARTS}]}, "messages"),
        ("/v1/completions", {"prompt": ["Hi", "x" * 3_000_000]}, "prompt"),
    ],
)
def test_a_prompt_no_context_can_hold_is_refused_by_its_size_at_once(
    http: httpx.Client, path: str, body: dict[str, Any], param: str
) -> None:
    start = time.monotonic()
    r = http.post(path, json={"model": MODEL, "max_tokens": 1, **body})
    elapsed = time.monotonic() - start
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == param
    assert "bytes" in error["message"], error  # refused by its size: never tokenized (3 MB took ~5 s)
    assert elapsed < 2, elapsed


def test_the_server_answers_while_large_prompts_are_tokenized(server: Server) -> None:
    """330 kB of text is below the size limit (4096 tokens × 81 bytes, this vocabulary's longest token), so it
    is rendered and tokenized, and only then refused for its tokens: about 0.5 s of work each, which blocked
    every other request (/health included) while it ran on the event loop."""
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x" * 330_000}]}

    async def main() -> tuple[list[float], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.auth, timeout=60) as c:
            posts = [asyncio.create_task(c.post("/v1/chat/completions", json=body)) for _ in range(4)]
            latencies = []
            while not all(p.done() for p in posts):
                start = time.monotonic()
                assert (await c.get("/health")).status_code == 200
                latencies.append(time.monotonic() - start)
                await asyncio.sleep(0.02)
            return latencies, [p.result() for p in posts]

    latencies, responses = asyncio.run(main())
    for r in responses:
        assert r.status_code == 400, r.text[:300]
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and "tokens" in error["message"], error
    assert len(latencies) >= 5, latencies  # the health checks ran while the prompts were being worked on
    assert max(latencies) < 0.5, latencies
