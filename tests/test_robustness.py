"""Defects fuzzing found: one bad request must cost only itself (the engine, the event loop and other requests go
on), and requests too large to serve are refused early and cheaply."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpx
import pytest

from llamaserve.config import resolve_model
from llamaserve.engine import ContextConfig, Engine, LlamaModel, SamplingParams
from tests.conftest import MODEL, Server

T = TypeVar("T")


# --- the engine, driven directly: what reaches it past the API's validation must still fail alone -------------
@pytest.fixture
def llama() -> Iterator[LlamaModel]:
    path, _ = resolve_model(None)
    model = LlamaModel(str(path), ContextConfig(n_ctx_seq=512, n_seq_max=2, n_batch=64, n_threads=2))
    yield model
    model.close()


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
def test_a_request_whose_sampler_cannot_be_built_fails_alone(llama: LlamaModel, grammar: str) -> None:
    prompt = llama.tokenize("The capital of France is", add_special=True)
    greedy = SamplingParams(max_tokens=4, temperature=0.0)

    async def body(engine: Engine) -> list[tuple[str, str | None, str | None]]:
        bad = SamplingParams(max_tokens=4, temperature=0.0, grammar=grammar)
        results = [await generate(engine, prompt, bad)]
        results += await asyncio.gather(generate(engine, prompt, greedy), generate(engine, prompt, bad))
        assert engine.alive
        return results

    (_, reason, error), good, (_, reason2, error2) = run_engine(llama, body)
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
