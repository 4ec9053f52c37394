"""Bad input gets a 4xx with an OpenAI-style error body that names the parameter, never a 5xx."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, Server

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]
BASE: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}
JSON_HEADERS = {"content-type": "application/json"}
LONG_TEXT = "hello " * 9000  # about 9000 tokens: more than the slot context and the model's own 8192


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def tool(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters or {"type": "object"}}}


def chat_body(**fields: Any) -> dict[str, Any]:
    return {**BASE, **fields}


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    """The error object of an error response, after checking its status and OpenAI's shape."""
    assert r.status_code < 500, f"{r.status_code}: {r.text}"
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


CHAT_400 = [
    pytest.param(chat_body(top_p=0), "top_p", id="top_p-0"),
    pytest.param(chat_body(top_p=1.5), "top_p", id="top_p-1.5"),
    pytest.param(chat_body(n=0), "n", id="n-0"),
    pytest.param(chat_body(max_tokens=0), "max_tokens", id="max_tokens-0"),
    pytest.param(chat_body(max_completion_tokens=0), "max_completion_tokens", id="max_completion_tokens-0"),
    pytest.param(chat_body(temperature=-1), "temperature", id="temperature-negative"),
    pytest.param(chat_body(temperature=2.5), "temperature", id="temperature-too-high"),
    pytest.param(chat_body(temperature="hot"), "temperature", id="temperature-string"),
    pytest.param(chat_body(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role", id="unknown-role"),
    pytest.param({"model": MODEL, "max_tokens": 4}, "messages", id="missing-messages"),
    pytest.param(chat_body(messages=[]), "messages", id="empty-messages"),
    pytest.param(chat_body(messages="hi"), "messages", id="messages-not-a-list"),
    pytest.param(chat_body(messages=[{"role": "user", "content": "hi", "foo": 1}]), "messages[0].foo", id="msg-extra"),
    pytest.param({"messages": MESSAGES}, "model", id="missing-model"),
    pytest.param(chat_body(stop=["a", "b", "c", "d", "e"]), "stop", id="stop-5-entries"),
    pytest.param(chat_body(logit_bias={"abc": 1}), "logit_bias", id="logit_bias-non-numeric-key"),
    pytest.param(chat_body(logit_bias={"999999": 1}), "logit_bias", id="logit_bias-out-of-vocab"),
    pytest.param(chat_body(logit_bias={"-1": 1}), "logit_bias", id="logit_bias-negative"),
    pytest.param(chat_body(presence_penalty=3), "presence_penalty", id="presence_penalty-3"),
    pytest.param(chat_body(frequency_penalty=-3), "frequency_penalty", id="frequency_penalty--3"),
    pytest.param(chat_body(top_logprobs=25), "top_logprobs", id="top_logprobs-25"),
    pytest.param(chat_body(frobnicate=1), "frobnicate", id="unknown-field"),
    pytest.param(chat_body(reasoning_effort="high"), "reasoning_effort", id="reasoning_effort"),
    pytest.param(chat_body(n=17), "n", id="n-over-slots"),
    pytest.param(chat_body(top_logprobs=3), "top_logprobs", id="top_logprobs-without-logprobs"),
    pytest.param(chat_body(response_format={"type": "xml"}), "response_format.type", id="response_format-xml"),
    pytest.param(
        chat_body(response_format={"type": "json_schema"}), "response_format.json_schema", id="json_schema-missing"
    ),
    pytest.param(
        chat_body(response_format=schema_format({"type": "integer", "minimum": 3})),
        "response_format.json_schema.schema",
        id="json_schema-minimum",
    ),
    pytest.param(
        chat_body(response_format=schema_format({"type": "string", "format": "email"})),
        "response_format.json_schema.schema",
        id="json_schema-format-email",
    ),
    pytest.param(
        chat_body(response_format={"type": "json_object"}, ignore_eos=True), "ignore_eos", id="json-ignore_eos"
    ),
    pytest.param(chat_body(tools=[{"type": "function", "function": {}}]), "tools[0].function.name", id="tool-no-name"),
    pytest.param(
        chat_body(tools=[tool("f", {"type": "string"})]), "tools[0].function.parameters", id="tool-params-not-object"
    ),
    pytest.param(
        chat_body(tools=[tool("f", {"type": "object", "properties": {"x": {"not": {}}}})], tool_choice="required"),
        "tools[0].function.parameters",
        id="tool-params-unsupported",
    ),
    pytest.param(chat_body(tools=[tool("f"), tool("f")]), "tools[1]", id="tool-duplicate-name"),
    pytest.param(
        chat_body(tools=[tool("f")], tool_choice={"type": "function", "function": {"name": "g"}}),
        "tool_choice",
        id="tool_choice-unknown-function",
    ),
    pytest.param(chat_body(tool_choice="required"), "tool_choice", id="tool_choice-without-tools"),
    pytest.param(chat_body(tools=[tool("f")], tool_choice="sometimes"), "tool_choice", id="tool_choice-bad-value"),
    pytest.param(
        chat_body(tools=[tool("f")], tool_choice="required", response_format={"type": "json_object"}),
        "response_format",
        id="forced-call-and-json",
    ),
]


@pytest.mark.parametrize(("body", "param"), CHAT_400)
def test_chat_bad_request(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    error = error_of(http.post(CHAT, json=body), 400)
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def test_unknown_field_message_names_it(http: httpx.Client) -> None:
    error = error_of(http.post(CHAT, json=chat_body(frobnicate=1)), 400)
    assert "frobnicate" in error["message"]


def test_unsupported_schema_names_the_keyword(http: httpx.Client) -> None:
    for schema, keyword in [
        ({"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}}, "minimum"),
        ({"type": "string", "pattern": "^a+$"}, "pattern"),
        ({"not": {"type": "null"}}, "not"),
        ({"type": "string", "format": "email"}, "email"),
    ]:
        error = error_of(http.post(CHAT, json=chat_body(response_format=schema_format(schema))), 400)
        assert error["code"] == "unsupported_schema", error
        assert keyword in error["message"], error


def test_image_input_is_refused(http: httpx.Client) -> None:
    content = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    ]
    error = error_of(http.post(CHAT, json=chat_body(messages=[{"role": "user", "content": content}])), 400)
    assert error["param"] is not None and error["param"].startswith("messages")
    assert MODEL in error["message"]
    assert "image" in error["message"].lower() and "not accept" in error["message"]


def test_invalid_json(http: httpx.Client) -> None:
    r = http.post(CHAT, content=b'{"model": "SmolLM2-135M-Instruct", "messages": [', headers=JSON_HEADERS)
    error = error_of(r, 400)
    assert "JSON" in error["message"], error
    assert error["param"] is None, error  # no parameter is at fault: the body does not parse


def test_body_not_an_object(http: httpx.Client) -> None:
    error = error_of(http.post(CHAT, content=b"[1, 2]", headers=JSON_HEADERS), 400)
    assert error["param"] is None


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_unknown_model(http: httpx.Client, path: str) -> None:
    body = chat_body(model="gpt-4") if path == CHAT else {"model": "gpt-4", "prompt": "hi", "max_tokens": 2}
    error = error_of(http.post(path, json=body), 404)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "gpt-4" in error["message"]


def test_unknown_model_card(http: httpx.Client) -> None:
    error = error_of(http.get("/v1/models/gpt-4"), 404)
    assert error["code"] == "model_not_found"


def test_unknown_route(http: httpx.Client) -> None:
    error = error_of(http.post("/v1/no/such/route", json={}), 404)
    assert error["param"] is None
    assert error["type"] == "not_found_error"


def test_wrong_method(http: httpx.Client) -> None:
    error_of(http.delete(CHAT), 405)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        pytest.param(CHAT, chat_body(messages=[{"role": "user", "content": LONG_TEXT}]), "messages", id="chat"),
        pytest.param(COMPLETIONS, {"model": MODEL, "prompt": LONG_TEXT, "max_tokens": 2}, "prompt", id="completions"),
    ],
)
def test_prompt_longer_than_context(http: httpx.Client, path: str, body: dict[str, Any], param: str) -> None:
    error = error_of(http.post(path, json=body), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == param
    max_model_len = http.get("/v1/models").json()["data"][0]["max_model_len"]
    assert f"context is {max_model_len} tokens" in error["message"]


COMPLETIONS_400 = [
    pytest.param({"prompt": []}, "prompt", id="empty-list"),
    pytest.param({"prompt": [999999]}, "prompt", id="token-out-of-vocab"),
    pytest.param({"prompt": "hi", "logprobs": 21}, "logprobs", id="logprobs-21"),
    pytest.param({"prompt": "hi", "suffix": "bye"}, "suffix", id="suffix"),
    pytest.param({"prompt": "hi", "top_p": 0}, "top_p", id="top_p-0"),
    pytest.param({"prompt": "hi", "n": 17}, "n", id="n-over-slots"),
    pytest.param({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", id="stop-5-entries"),
    pytest.param({"prompt": "hi", "bogus": True}, "bogus", id="unknown-field"),
    pytest.param({"max_tokens": 2}, "prompt", id="missing-prompt"),
]


@pytest.mark.parametrize(("fields", "param"), COMPLETIONS_400)
def test_completions_bad_request(http: httpx.Client, fields: dict[str, Any], param: str) -> None:
    error = error_of(http.post(COMPLETIONS, json={"model": MODEL, "max_tokens": 2, **fields}), 400)
    assert error["param"] == param, error


@pytest.mark.parametrize("prompt", [pytest.param("", id="empty"), pytest.param(["hi", ""], id="empty-in-list")])
def test_completions_empty_prompt_is_not_a_server_error(http: httpx.Client, prompt: str | list[str]) -> None:
    """An empty prompt is either answered or refused as bad input naming `prompt`; it is never a 500."""
    r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
    assert r.status_code < 500, f"{r.status_code}: {r.text}"
    if r.status_code != 200:
        assert error_of(r, 400)["param"] == "prompt"


def test_tokenize_errors(http: httpx.Client) -> None:
    both = error_of(http.post("/tokenize", json={"prompt": "hi", "messages": MESSAGES}), 400)
    assert both["param"] == "prompt"
    assert error_of(http.post("/detokenize", json={"tokens": [999999]}), 400)["param"] == "tokens"


def test_server_still_answers_after_bad_requests(server: Server, http: httpx.Client) -> None:
    r = http.post(CHAT, json=chat_body(temperature=0))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    server.wait_idle()
