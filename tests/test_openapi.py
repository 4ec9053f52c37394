"""/openapi.json tells the truth: request bodies are the protocol's models, every route declares its errors in
OpenAI's shape and who may call it, and real responses of a live server (chat, streamed and not, completions,
models, tokenize, the account's balance and usage, and each kind of error) validate against the response
schemas the spec declares for their status, in a strict reading: an object may carry no field the spec does not
name."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import pytest
import schemathesis

from tests.conftest import MODEL, Server, start_server

ADMIN = "openapi-admin-key"
MESSAGES = [{"role": "user", "content": "Say hi."}]
ERROR_REF = "#/components/schemas/ErrorResponse"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with start_server("--parallel", "4", "--admin-key", ADMIN) as s:
        yield s


@pytest.fixture(scope="module")
def spec(server: Server) -> dict[str, Any]:
    r = httpx.get(f"{server.base_url}/openapi.json")
    assert r.status_code == 200
    return r.json()


@pytest.fixture(scope="module")
def strict(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with `additionalProperties: false` on every object schema that lists its properties (and allows
    no others already): a response field the spec does not name fails validation."""
    strict = copy.deepcopy(spec)
    for schema in strict["components"]["schemas"].values():
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    return strict


def operation(spec: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    return spec["paths"][path][method.lower()]


def check(spec: dict[str, Any], method: str, path: str, r: httpx.Response) -> Any:
    """Validate a response against the schema the spec declares for its status and content type; returns the
    body (JSON, or the list of SSE data payloads)."""
    declared = operation(spec, method, path)["responses"]
    assert str(r.status_code) in declared, f"{method} {path}: {r.status_code} is not declared: {r.text}"
    media = r.headers["content-type"].split(";")[0]
    content = declared[str(r.status_code)]["content"]
    assert media in content, f"{method} {path} {r.status_code}: {media} is not declared ({list(content)})"
    schema = content[media]["schema"]
    if media == "text/event-stream":
        return [validate(spec, payload_schema(schema), event) for event in sse_events(r.text)]
    return validate(spec, schema, r.json())


def validate(spec: dict[str, Any], schema: dict[str, Any], instance: Any) -> Any:
    document = {**schema, "components": spec["components"]}  # refs are #/components/schemas/...
    jsonschema.validate(instance, document, cls=jsonschema.Draft202012Validator)
    return instance


def payload_schema(event: dict[str, Any]) -> dict[str, Any]:
    """The schema of an event's JSON `data` (the spec also allows the final `[DONE]`)."""
    [done, payload] = event["properties"]["data"]["anyOf"]
    assert done == {"const": "[DONE]"} and payload["contentMediaType"] == "application/json"
    return payload["contentSchema"]


def sse_events(text: str) -> list[Any]:
    """The JSON payloads of an SSE body, which must end with `data: [DONE]`."""
    data = [block.removeprefix("data: ") for block in text.split("\n\n") if block]
    assert data and data[-1] == "[DONE]", text[-200:]
    return [json.loads(d) for d in data[:-1]]


def admin(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)


def new_key(server: Server, account: str, plan: str = "unlimited", credits: str = "10") -> dict[str, Any]:
    """An account with one key; returns the key's view, with the whole key in `key`."""
    with admin(server) as a:
        assert a.post("/admin/accounts", json={"name": account, "plan": plan, "credits": credits}).status_code == 201
        r = a.post(f"/admin/accounts/{account}/keys", json={"name": "k"})
        assert r.status_code == 201, r.text
        return r.json()


# --- the document itself ---------------------------------------------------------------------------------------
def test_spec_is_a_valid_openapi_document(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(spec).validate()  # against the OpenAPI 3.1 meta-schema


def test_request_bodies_are_the_protocol_models(spec: dict[str, Any]) -> None:
    from llamaserve.protocol.chat import ChatCompletionRequest

    bodies = {
        "/v1/chat/completions": "ChatCompletionRequest",
        "/v1/completions": "CompletionRequest",
        "/tokenize": "TokenizeRequest",
        "/detokenize": "DetokenizeRequest",
    }
    for path, model in bodies.items():
        body = operation(spec, "POST", path)["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
    chat = spec["components"]["schemas"]["ChatCompletionRequest"]
    assert set(chat["properties"]) == set(ChatCompletionRequest.model_fields)
    assert chat["additionalProperties"] is False  # unknown fields are a 400, and the spec says so
    assert set(chat["required"]) == {"model", "messages"}
    stop = chat["properties"]["stop"]
    assert stop["maxItems"] == 4 and stop["items"]["minLength"] == 1  # the validators' rules, stated
    assert chat["properties"]["logit_bias"]["propertyNames"] == {"pattern": "^-?[0-9]{1,10}$"}


def test_every_operation_declares_its_errors_in_one_shape(spec: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            responses = op["responses"]
            assert "422" not in responses, f"{method} {path}"  # validation errors are 400s
            assert "500" in responses, f"{method} {path}"
            for status, response in responses.items():
                if int(status) >= 400 and path not in ("/health", "/ready"):
                    assert response["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}, (path, status)
    inference = {"400", "401", "402", "403", "404", "429", "502", "503", "504"}
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert inference <= set(operation(spec, "POST", path)["responses"]), path
    error = spec["components"]["schemas"]["ErrorDetail"]
    assert set(error["properties"]) == {"message", "type", "param", "code"}


def test_security_says_who_may_call_what(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert schemes["apiKey"] == {**schemes["apiKey"], "type": "http", "scheme": "bearer"}
    assert schemes["adminKey"]["scheme"] == "bearer"
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            security = op.get("security")
            keyed = (
                "/v1/chat",
                "/v1/completions",
                "/v1/models",
                "/v1/account",
                "/v1/files",
                "/v1/batches",
                "/tokenize",
                "/detokenize",
            )
            if path.startswith(keyed) or path == "/v1/{model}":
                assert security == [{"apiKey": []}], path
            elif path.startswith("/admin"):
                assert {"adminKey": []} in security, path
            elif path.startswith("/v1/dashboard") or path == "/auth/logout":
                session = {"session": []} if method == "get" else {"session": [], "csrf": []}
                assert security == [session], (method, path)
            elif path in ("/auth/login", "/auth/signup"):
                assert security == [{"csrf": [], "presession": []}]
            else:
                assert security is None, path  # /health, /ready, /metrics, /auth/session
    for path in ("/v1/chat/completions", "/v1/account/balance", "/admin/accounts"):
        method = "post" if "chat" in path else "get"
        assert {"401", "403"} <= set(spec["paths"][path][method]["responses"]), path


def test_engine_without_accounts_declares_no_keys() -> None:
    with start_server("--parallel", "1", command="engine") as engine:
        spec = httpx.get(f"{engine.base_url}/openapi.json").json()
    chat = operation(spec, "POST", "/v1/chat/completions")
    assert "security" not in chat and "401" not in chat["responses"]
    assert "securitySchemes" not in spec.get("components", {}) or not spec["components"]["securitySchemes"]
    assert "/admin/accounts" not in spec["paths"]


# --- live responses against the document ---------------------------------------------------------------------
def chat(server: Server, key: str | None = None, **body: Any) -> httpx.Response:
    payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, **body}
    return httpx.post(
        f"{server.v1}/chat/completions",
        json=payload,
        headers={"Authorization": f"Bearer {key or server.api_key}"},
        timeout=120,
    )


WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CHAT_VARIANTS = [
    pytest.param({}, id="plain"),
    pytest.param({"n": 2, "logprobs": True, "top_logprobs": 2}, id="n-logprobs"),
    pytest.param({"echo": True, "logprobs": True}, id="echo"),
    pytest.param({"tools": [WEATHER], "tool_choice": "required", "max_tokens": 30}, id="forced-tool-call"),
    pytest.param({"response_format": {"type": "json_object"}, "max_tokens": 8}, id="json"),
]


@pytest.mark.parametrize("body", CHAT_VARIANTS)
def test_chat_responses_match_the_spec(server: Server, strict: dict[str, Any], body: dict[str, Any]) -> None:
    r = chat(server, **body)
    assert r.status_code == 200, r.text
    check(strict, "POST", "/v1/chat/completions", r)
    streamed = chat(server, stream=True, stream_options={"include_usage": True}, **body)
    chunks = check(strict, "POST", "/v1/chat/completions", streamed)
    assert chunks[-1]["usage"]["total_tokens"] > 0


def test_completions_match_the_spec(server: Server, strict: dict[str, Any]) -> None:
    client = server.http()
    for body in ({"prompt": "Once upon", "max_tokens": 3}, {"prompt": ["a", "b"], "echo": True, "logprobs": 2}):
        body = {"model": MODEL, "temperature": 0, "max_tokens": 3, **body}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        check(strict, "POST", "/v1/completions", r)
        streamed = client.post("/v1/completions", json={**body, "stream": True})
        assert check(strict, "POST", "/v1/completions", streamed)


def test_models_tokenize_and_the_account_match_the_spec(server: Server, strict: dict[str, Any]) -> None:
    client = server.http()
    check(strict, "GET", "/v1/models", client.get("/v1/models"))
    check(strict, "GET", "/v1/models/{model_id}", client.get(f"/v1/models/{MODEL}"))
    tokens = check(strict, "POST", "/tokenize", client.post("/tokenize", json={"prompt": "hi"}))["tokens"]
    check(strict, "POST", "/tokenize", client.post("/tokenize", json={"messages": MESSAGES, "tools": [WEATHER]}))
    check(strict, "POST", "/detokenize", client.post("/detokenize", json={"tokens": tokens}))
    assert chat(server).status_code == 200
    check(strict, "GET", "/v1/account/balance", client.get("/v1/account/balance"))
    usage = check(strict, "GET", "/v1/account/usage", client.get("/v1/account/usage"))
    assert usage["data"]
    check(strict, "GET", "/health", httpx.get(f"{server.base_url}/health"))
    check(strict, "GET", "/ready", httpx.get(f"{server.base_url}/ready"))


def test_admin_responses_match_the_spec(server: Server, strict: dict[str, Any]) -> None:
    with admin(server) as a:
        check(strict, "POST", "/admin/accounts", a.post("/admin/accounts", json={"name": "spec", "credits": "1"}))
        check(strict, "GET", "/admin/accounts", a.get("/admin/accounts"))
        check(strict, "PATCH", "/admin/accounts/{name}", a.patch("/admin/accounts/spec", json={"plan": "pro"}))
        grant = a.post("/admin/accounts/spec/credits", json={"amount": "2.5"})
        check(strict, "POST", "/admin/accounts/{name}/credits", grant)
        key = check(strict, "POST", "/admin/accounts/{name}/keys", a.post("/admin/accounts/spec/keys", json={}))
        check(strict, "GET", "/admin/accounts/{name}/keys", a.get("/admin/accounts/spec/keys"))
        r = a.post(f"/admin/keys/{key['prefix']}/disable")
        check(strict, "POST", "/admin/keys/{prefix}/{action}", r)


def test_error_responses_match_the_spec(server: Server, strict: dict[str, Any]) -> None:
    """One of each status the API answers with, checked against what the spec declares for it."""
    path = "/v1/chat/completions"
    broke = new_key(server, "broke", credits="0")["key"]
    disabled = new_key(server, "disabled-key")
    with admin(server) as a:
        assert a.post(f"/admin/keys/{disabled['prefix']}/disable").status_code == 200
    free = new_key(server, "free-plan", plan="free")["key"]
    cases = {
        400: chat(server, temperature=5),
        401: chat(server, key="ls-nope_nope"),
        402: chat(server, key=broke),
        403: chat(server, key=disabled["key"]),
        404: chat(server, model="no-such-model"),
    }
    with ThreadPoolExecutor(6) as pool:  # the free plan's 5 requests a minute at once: one of them is a 429
        burst = list(pool.map(lambda _: chat(server, key=free, max_tokens=1), range(6)))
    cases[429] = next(r for r in burst if r.status_code == 429)
    for status, r in cases.items():
        assert r.status_code == status, (status, r.text)
        body = check(strict, "POST", path, r)
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert cases[429].headers["retry-after"]
    client = server.http()
    check(strict, "GET", "/v1/account/usage", client.get("/v1/account/usage", params={"since": "yesterday"}))
    check(strict, "POST", "/tokenize", client.post("/tokenize", json={"prompt": "x", "model": "nope"}))
    check(strict, "GET", "/admin/accounts", httpx.get(f"{server.base_url}/admin/accounts", headers=client.headers))
    unknown = httpx.get(f"{server.base_url}/v1/nothing-here")
    assert unknown.status_code == 404 and set(unknown.json()["error"]) == {"message", "type", "param", "code"}
