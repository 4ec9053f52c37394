"""Drop-in compatibility: the clients people already use, driven against a real server as they drive OpenAI's.

The official `openai` SDK (sync, async, streaming, `chat.completions.parse`, tool round trips that send the SDK's
own message objects back, the `developer` role, raw responses and each error class), LangChain's `ChatOpenAI`
(`invoke`, `stream`, `bind_tools`, `with_structured_output` in its three methods), and the seed documents'
example bodies as printed. The server's registry serves the embedded model under the seeds' model names too, so
those bodies need one edit: the placeholder `logit_bias` key `ANY_ADDITIONAL_PROPERTY` becomes a token id."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from llamaserve.config import resolve_model
from tests.conftest import MODEL, Server, start_server

ADMIN = "compat-admin"
AIMLAPI_MODEL = "meta-llama/Meta-Llama-3.1-405B-Instruct-Turbo"
SEGMIND_MODEL = "llama-v3p1-405b-instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    registry = tmp_path_factory.mktemp("compat") / "models.toml"
    registry.write_text(
        "[[models]]\n"
        f'id = "{MODEL}"\n'
        f"aliases = {json.dumps([AIMLAPI_MODEL, SEGMIND_MODEL])}\n"
        "[[models.backends]]\n"
        'type = "local"\n'
        f'path = "{resolve_model(None)[0]}"\n'
    )
    with start_server("--config", str(registry), "--parallel", "4", "--admin-key", ADMIN) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return server.openai()


def chat(client: openai.OpenAI, **body: Any) -> Any:
    return client.chat.completions.create(**{"model": MODEL, "max_tokens": 8, "temperature": 0, **body})


# --- the openai SDK ---------------------------------------------------------------------------------------------
def test_the_sdks_own_messages_go_back_as_history(client: openai.OpenAI) -> None:
    """`messages.append(reply.message.model_dump())` sends refusal, annotations, audio and function_call (all
    null): accepted. A forced call's message, dumped, then the tool's result, then the next turn."""
    first = chat(client, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=40)
    message = first.choices[0].message
    dumped = message.model_dump()
    assert {"refusal", "annotations", "audio", "function_call"} <= set(dumped) and message.tool_calls
    history = [*ASK, dumped, {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "Sunny, 21 C"}]
    second = chat(client, messages=history, tools=[WEATHER])
    history += [second.choices[0].message.model_dump(), {"role": "user", "content": "Thanks!"}]
    assert chat(client, messages=history).choices[0].finish_reason in ("stop", "length")


def test_developer_is_the_system_role(server: Server, client: openai.OpenAI) -> None:
    http = server.http()

    def tokens(role: str) -> list[int]:
        body = {"model": MODEL, "messages": [{"role": role, "content": "Be brief."}, *ASK]}
        return http.post("/tokenize", json=body).json()["tokens"]

    assert tokens("developer") == tokens("system")
    assert chat(client, messages=[{"role": "developer", "content": "Be brief."}, *ASK]).choices[0].message.content


def test_fields_that_change_nothing_here_are_accepted(client: openai.OpenAI) -> None:
    ignored = {
        "store": True,
        "metadata": {"team": "search", "run": "42"},
        "service_tier": "auto",
        "prompt_cache_key": "user-1234",
        "safety_identifier": "hashed-user-1234",
        "verbosity": "low",
        "user": "user-1234",
        "parallel_tool_calls": False,
        "modalities": ["text"],
        "stream_options": {"include_usage": True},  # with stream false: nothing to include it in
    }
    plain = chat(client, messages=ASK, seed=7)
    both = chat(client, messages=ASK, seed=7, extra_body=ignored)
    assert both.choices[0].message.content == plain.choices[0].message.content
    parts = [{"type": "text", "text": "What is the weather in Oslo?", "cache_control": {"type": "ephemeral"}}]
    assert chat(client, messages=[{"role": "user", "content": parts}], seed=7).choices[0].message.content == (
        plain.choices[0].message.content
    )


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),
        ({"modalities": ["text", "audio"]}, "modalities[1]", "invalid_value"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported_parameter"),
        ({"functions": [WEATHER["function"]]}, "functions", "unsupported_parameter"),
        ({"function_call": "auto"}, "function_call", "unsupported_parameter"),
        ({"web_search_options": {}}, "web_search_options", "unsupported_parameter"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "invalid_value"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k", "invalid_value"),
        ({"best_of": 2}, "best_of", "unrecognized_argument"),
        ({"messages": [{"role": "assistant", "content": "x", "function_call": {"name": "f", "arguments": "{}"}}]},
         "messages[0].function_call", "unsupported_parameter"),
    ],
)  # fmt: skip
def test_fields_that_would_change_the_output_are_a_400_naming_them(
    client: openai.OpenAI, extra: dict[str, Any], param: str, code: str
) -> None:
    messages = extra.pop("messages", ASK)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_body=extra)
    error = refused.value.body
    assert isinstance(error, dict) and (error["param"], error["code"]) == (param, code), error


class City(BaseModel):
    name: str = Field(max_length=20)
    warm: bool


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a warm city."}],
        response_format=City,
        max_tokens=100,
        temperature=0,  # greedy: one outcome, not a sampled walk through optional whitespace
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City), completion.choices[0].message.content


def test_async_streaming_and_raw_headers(client: openai.OpenAI, server: Server) -> None:
    async def stream() -> tuple[str, Any]:
        text, usage = "", None
        async with openai.AsyncOpenAI(base_url=server.v1, api_key=server.api_key) as aclient:
            chunks = await aclient.chat.completions.create(
                model=MODEL, messages=ASK, max_tokens=8, stream=True, stream_options={"include_usage": True}
            )
            async for chunk in chunks:
                text += "".join(c.delta.content or "" for c in chunk.choices)
                usage = chunk.usage or usage
        return text, usage

    text, usage = asyncio.run(stream())
    assert text and usage is not None and usage.completion_tokens > 0
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=ASK, max_tokens=2)
    assert raw.headers["x-request-id"] and raw.parse().choices[0].message is not None


def test_each_error_is_its_sdk_class(server: Server, client: openai.OpenAI) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for name, credits in (("broke", "0"), ("limited", "1")):
        account = {"name": name, "plan": "free", "credits": credits}
        assert httpx.post(f"{server.base_url}/admin/accounts", json=account, headers=admin).status_code == 201

    def new_key(account: str) -> dict[str, str]:
        return httpx.post(f"{server.base_url}/admin/accounts/{account}/keys", json={}, headers=admin).json()

    broke, disabled, limited_key = new_key("broke")["key"], new_key("limited"), new_key("limited")["key"]
    httpx.post(f"{server.base_url}/admin/keys/{disabled['prefix']}/disable", headers=admin)
    cases: list[tuple[type[openai.APIStatusError], openai.OpenAI, dict[str, Any]]] = [
        (openai.BadRequestError, client, {"messages": ASK, "temperature": 9}),
        (openai.AuthenticationError, openai.OpenAI(base_url=server.v1, api_key="ls-nope_nope"), {"messages": ASK}),
        (openai.PermissionDeniedError, openai.OpenAI(base_url=server.v1, api_key=disabled["key"]), {"messages": ASK}),
        (openai.NotFoundError, client, {"messages": ASK, "model": "no-such-model"}),
        (openai.APIStatusError, openai.OpenAI(base_url=server.v1, api_key=broke), {"messages": ASK}),  # 402
    ]
    for kind, caller, body in cases:
        with pytest.raises(kind) as raised:
            caller.chat.completions.create(**{"model": MODEL, "max_tokens": 2, **body})
        assert raised.value.status_code in (400, 401, 402, 403, 404) and raised.value.body, raised.value
    assert raised.value.status_code == 402 and raised.value.code == "insufficient_credits"  # type: ignore[attr-defined]
    limited = openai.OpenAI(base_url=server.v1, api_key=limited_key, max_retries=0)
    with pytest.raises(openai.RateLimitError):  # a free account: 5 requests a minute
        for _ in range(6):
            limited.completions.create(model=MODEL, prompt="Hi", max_tokens=0, echo=True)


# --- the seeds' examples, as printed -------------------------------------------------------------------------
# ../shared/seeds/aimlapi-llama-3.1-405b-turbo.txt: the request body of its API schema, and its Python example.
AIMLAPI_FULL_EXAMPLE = {
    "model": "meta-llama/Meta-Llama-3.1-405B-Instruct-Turbo",
    "messages": [{"role": "system", "content": "text", "name": "text"}],
    "max_tokens": 512,
    "stop": "text",
    "stream": False,
    "stream_options": {"include_usage": True},
    "n": 1,
    "seed": 1,
    "top_p": 1,
    "top_k": 1,
    "temperature": 1,
    "repetition_penalty": 1,
    "logprobs": True,
    "echo": True,
    "min_p": 1,
    "presence_penalty": 1,
    "frequency_penalty": 1,
    "logit_bias": {"ANY_ADDITIONAL_PROPERTY": 1},
    "tools": [{"type": "function", "function": {"description": "text", "name": "text", "parameters": None}}],
    "tool_choice": "none",
    "response_format": {"type": "text"},
}
AIMLAPI_PYTHON_EXAMPLE = {
    "model": "meta-llama/Meta-Llama-3.1-405B-Instruct-Turbo",
    "messages": [{"role": "user", "content": "Hello"}],
}
# ../shared/seeds/segmind-llama-3.1-405b.txt: posted to /v1/llama-v3p1-405b-instruct, no model in the body.
SEGMIND_EXAMPLE = {
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What's in this image?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/image.jpg"}},
            ],
        }
    ]
}


def test_the_seed_examples_as_printed(server: Server) -> None:
    http = server.http()
    r = http.post("/v1/chat/completions", json=AIMLAPI_FULL_EXAMPLE)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text  # the placeholder key
    full = {**AIMLAPI_FULL_EXAMPLE, "logit_bias": {"1": 1}, "max_tokens": 16}  # (512 tokens of "text": slow here)
    r = http.post("/v1/chat/completions", json=full)
    assert r.status_code == 200, r.text
    body = r.json()
    # The model's own id answers, as OpenAI answers an alias with the snapshot it names.
    assert body["model"] == MODEL and body["choices"][0]["logprobs"]["content"] and body["prompt"]
    assert body["usage"]["prompt_tokens"] > 0
    r = http.post("/v1/chat/completions", json=AIMLAPI_PYTHON_EXAMPLE)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    # The embedded model takes no images: the image part is refused by name, before anything is fetched.
    r = http.post(f"/v1/{SEGMIND_MODEL}", json=SEGMIND_EXAMPLE)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages[0].content[1]", r.text
    assert error["code"] == "image_input_not_supported"


def test_models_list_prices_in_credits(server: Server) -> None:
    card = server.http().get(f"/v1/models/{MODEL}").json()
    assert card["pricing"] == {"input_credits_per_million_tokens": 0.1, "output_credits_per_million_tokens": 0.2}


# --- LangChain --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def langchain(server: Server) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=server.v1, api_key=server.api_key, model=MODEL, max_tokens=48, temperature=0)


def test_langchain_invoke_stream_and_tools(langchain: Any) -> None:
    assert langchain.invoke("Say hello.").content
    assert "".join(chunk.content for chunk in langchain.stream("Say hello."))
    reply = langchain.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Oslo?")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "get_weather", reply


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_structured_output(langchain: Any, method: str) -> None:
    result = langchain.with_structured_output(City, method=method, include_raw=True).invoke(
        "Name a warm city, as JSON with keys name and warm."
    )
    raw = result["raw"]
    if method == "json_mode":  # the server guarantees a JSON object, not the schema's keys (OpenAI's contract)
        assert isinstance(json.loads(raw.content), dict), raw.content
    else:  # a grammar holds the model to the schema
        assert isinstance(result["parsed"], City) and result["parsing_error"] is None, result
