"""Fuzzing a live server: schemathesis over every operation of /openapi.json (data that fits the spec and data
that does not), hypothesis-made hostile chat bodies (random nesting, unicode with lone surrogates, huge and
non-finite numbers, wrong types, nulls, deep nesting, big strings), and malformed raw bodies. Whatever comes in:
no 5xx, no hang, every error in OpenAI's shape, and a request that failed validation leaves the ledger as it was.

The server stores accounts in PostgreSQL (the production store, where text cannot hold U+0000) when it is
reachable, in SQLite otherwise (under CI=1 PostgreSQL must be there). Generation is kept cheap: a 512-token
context, and schemathesis' chat and completion bodies get at most 8 tokens and 2 choices."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import MODEL, POSTGRES_URL, Server, postgres_database, start_server

ADMIN = "fuzz-admin-key"
EMAIL, PASSWORD = "fuzzer@example.com", "a fuzzing password"
TIMEOUT = 60  # seconds: a response slower than this is a hang (a whole generation takes a few)
SETTINGS = settings(
    deadline=None,
    database=None,
    derandomize=True,  # the same cases every run: a failure in CI reproduces at a desk
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def postgres_reachable() -> bool:
    import asyncio

    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(POSTGRES_URL).set(drivername="postgresql").render_as_string(False)

    async def ping() -> None:
        await (await asyncpg.connect(url, timeout=3)).close()

    try:
        asyncio.run(ping())
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    return True


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with ExitStack() as stack:
        store: tuple[str, ...] = ()
        if os.environ.get("CI") or postgres_reachable():
            store = ("--database-url", stack.enter_context(postgres_database()))
        s = stack.enter_context(start_server("--parallel", "4", "--ctx", "512", "--admin-key", ADMIN, *store))
        if not s.api_key:  # a PostgreSQL store made no key file: the default account gets one here
            r = httpx.post(f"{s.base_url}/admin/accounts/default/keys", json={}, headers=admin_auth(), timeout=30)
            s.api_key = r.json()["key"]
        yield s


def admin_auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


class Dashboard:
    """A logged-in dashboard account: its session and CSRF token, and the pre-login CSRF cookie."""

    def __init__(self, server: Server) -> None:
        self.server = server
        body = {"name": "fuzzer", "plan": "unlimited", "credits": "5", "email": EMAIL, "password": PASSWORD}
        r = httpx.post(f"{server.base_url}/admin/accounts", json=body, headers=admin_auth(), timeout=30)
        assert r.status_code == 201, r.text
        self.presession = httpx.get(f"{server.base_url}/auth/session").cookies["ls_csrf"]
        self.session = self.login()

    def login(self) -> tuple[str, str]:
        headers = {**self.before_login(), "Content-Type": "application/json"}
        body = json.dumps({"email": EMAIL, "password": PASSWORD})
        r = httpx.post(f"{self.server.base_url}/auth/login", content=body, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        return r.cookies["ls_session"], r.json()["csrf_token"]

    def before_login(self) -> dict[str, str]:
        return {"Cookie": f"ls_csrf={self.presession}", "X-CSRF-Token": self.presession}

    def logged_in(self, fresh: bool = False) -> dict[str, str]:
        token, csrf = self.login() if fresh else self.session
        return {"Cookie": f"ls_session={token}", "X-CSRF-Token": csrf}


# --- hypothesis: hostile chat bodies ---------------------------------------------------------------------------
class Raw:
    """JSON text written as is: what json.dumps cannot or will not produce (NaN, lone surrogate escapes)."""

    def __init__(self, text: str) -> None:
        self.text = text


def dumps(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


ODD_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "\x00", "\u2028", "\ufeff", "🦙" * 50, "a" * 20_000, "<|im_end|>", "{{ 7*7 }}", "%s%n"]),
    st.builds(lambda s: Raw(json.dumps(s)[:-1] + '\\ud800"'), st.text(max_size=10)),  # lone high surrogate
    st.just(Raw('"\\udfff\\ud800"')),  # reversed pair
)
ODD_NUMBER = st.one_of(
    st.integers(),
    st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 10**30, 10**400]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"), Raw("-0.0"), Raw("1E-400")]),
)
BAD_COUNT = st.one_of(st.floats(), st.sampled_from([Raw("NaN"), Raw("1e400"), "4", True, None, [4], {"n": 4}]))
LEAF = st.one_of(st.none(), st.booleans(), ODD_NUMBER, ODD_TEXT)
JSONISH = st.recursive(
    LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def nested(depth: int) -> Raw:
    return Raw("[" * depth + "]" * depth)


def tool_with(parameters: Any) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool"]), "content": ODD_TEXT},
    optional={"name": ODD_TEXT, "tool_call_id": ODD_TEXT, "extra": JSONISH},
)
FIELDS = {
    "model": st.one_of(st.just(MODEL), ODD_TEXT, JSONISH),
    "messages": st.one_of(st.lists(MESSAGE, min_size=1, max_size=3), JSONISH),
    # Valid counts stay small (a huge one is clipped to the context: see the explicit example), the rest refused.
    "max_tokens": st.one_of(st.integers(1, 6), st.integers(max_value=0), BAD_COUNT),
    "temperature": st.one_of(st.just(0), ODD_NUMBER),
    "top_p": ODD_NUMBER,
    "top_k": ODD_NUMBER,
    "n": st.one_of(st.integers(1, 2), st.integers(max_value=0), st.integers(min_value=17), BAD_COUNT),
    "seed": ODD_NUMBER,
    "stop": st.one_of(ODD_TEXT, st.lists(ODD_TEXT, max_size=5)),
    "logit_bias": st.dictionaries(st.one_of(st.text(max_size=6), st.sampled_from(["²", "-0", "١٢"])), LEAF, max_size=3),
    "stream": st.one_of(st.booleans(), LEAF),
    "stream_options": JSONISH,
    "logprobs": LEAF,
    "top_logprobs": ODD_NUMBER,
    "tools": st.one_of(
        JSONISH, st.builds(lambda p: [{"type": "function", "function": {"name": "f", "parameters": p}}], JSONISH)
    ),
    "tool_choice": JSONISH,
    "response_format": st.one_of(
        JSONISH, st.builds(lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}, JSONISH)
    ),
    "user": ODD_TEXT,
    "echo": LEAF,
    "deep": st.sampled_from([nested(50), nested(5000), Raw("{" + '"a":{' * 3000 + "}" * 3001)]),
}


@st.composite
def chat_bodies(draw: st.DrawFn) -> str:
    """A chat body, valid to start with, with a few fields replaced (or added, or dropped) at random."""
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    body["temperature"] = 0
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=4, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            body.pop(name, None)
        else:
            body[name] = draw(FIELDS[name])
    if draw(st.booleans()) and draw(st.booleans()):
        body = {"null": None, **{k: None for k in body}} if draw(st.booleans()) else body  # null everywhere
    return dumps(body)


def error_shape(r: httpx.Response) -> None:
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/json"), r.headers
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error


class Ledger:
    """The default account's balance and usage records, to show that refused requests leave no trace: a
    request refused before generation costs nothing and adds no record, except a prompt the engine refused,
    which is recorded as `rejected`, at no cost, under its own request id."""

    def __init__(self, server: Server) -> None:
        self.http = server.http()
        self.balance, self.records = self.read()

    def read(self) -> tuple[int, list[dict[str, Any]]]:
        deadline = time.monotonic() + 30
        while (b := self.http.get("/v1/account/balance").json())["open_holds"] and time.monotonic() < deadline:
            time.sleep(0.02)  # settlement runs after the response
        assert b["open_holds"] == 0, b
        return b["balance_micro"], self.http.get("/v1/account/usage").json()["data"]

    def after(self, r: httpx.Response) -> None:
        balance, records = self.read()
        if r.status_code >= 400:
            new = records[: len(records) - len(self.records)]
            assert balance == self.balance, (r.status_code, r.text[:300], balance, self.balance)
            for record in new:
                assert (record["status"], record["cost_micro"]) == ("rejected", 0), record
                assert record["request_id"] == r.headers["x-request-id"], record
        self.balance, self.records = balance, records


def post(server: Server, path: str, content: bytes | str, content_type: str = "application/json") -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.api_key}", "Content-Type": content_type}
    with httpx.Client(timeout=TIMEOUT) as client:  # a fresh connection each time: no stale keep-alive
        return client.post(f"{server.base_url}{path}", content=content, headers=headers)


def test_hostile_chat_bodies_get_4xx_in_shape_and_cost_nothing(server: Server) -> None:
    ledger = Ledger(server)
    seen: dict[int, int] = {}

    @settings(SETTINGS, max_examples=60)
    @example(text=dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10**30}))
    @example(text=dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "seed": Raw("1e400")}))
    @given(text=chat_bodies())
    def run(text: str) -> None:
        r = post(server, "/v1/chat/completions", text)
        error_shape(r)
        if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.endswith("data: [DONE]\n\n") or '"error"' in r.text, r.text[-300:]
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        ledger.after(r)

    run()
    assert seen.get(400, 0) > 15 and seen.get(200, 0) > 5, seen  # both refusals and generations were tried


# --- sizes: counts and lengths around each limit and far past it ------------------------------------------------
def distinct_tools(count: int, properties: int) -> list[dict[str, Any]]:
    return [
        {"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object", "properties": {
            f"p{i}_{j}": {"type": "string"} for j in range(properties)}}}}
        for i in range(count)
    ]  # fmt: skip


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}


AROUND = [0, 1, 2, 45, 46, 127, 128, 129, 999, 1000, 1001, 2047, 2048, 2049, 5000, 40_000]
SIZED: dict[str, Any] = {
    "messages": lambda n: {"messages": [{"role": "user", "content": ""}] * max(n, 1)},
    "parts": lambda n: {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * max(n, 1)}]},
    "tools": lambda n: {"tools": distinct_tools(min(n, 300), 2)},
    "tool calls": lambda n: {
        "messages": [
            {"role": "user", "content": "Hi"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in range(n)
                ],
            },
        ]
    },  # fmt: skip
    "enum values": lambda n: schema_format({"enum": [f"v{i}" for i in range(n)]}),
    "optional properties": lambda n: schema_format(
        {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(min(n, 5000))}}
    ),
    "special tokens": lambda n: {"messages": [{"role": "user", "content": "<|im_start|>x" * n}]},
    "stop strings": lambda n: {"stop": ["x"] * n},
    "logit_bias": lambda n: {"logit_bias": {str(i): 1 for i in range(n)}},
}


@st.composite
def sized_requests(draw: st.DrawFn) -> tuple[str, str]:
    """A chat body with one count (messages, parts, tools, enum values, ...) near its limit or far past it, or a
    completions prompt or /tokenize call of a long special-token run."""
    n = draw(st.sampled_from(AROUND))
    what = draw(st.sampled_from([*sorted(SIZED), "completions prompt", "tokenize prompt"]))
    if what == "completions prompt":
        return "/v1/completions", json.dumps({"model": MODEL, "prompt": "<|im_start|>x" * n, "max_tokens": 1})
    if what == "tokenize prompt":
        return "/tokenize", json.dumps({"model": MODEL, "prompt": "<|im_start|>x" * n})
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **SIZED[what](n)}
    return "/v1/chat/completions", json.dumps(body)


def test_bodies_sized_around_every_limit_are_answered_in_shape(server: Server) -> None:
    """Counts and lengths at, just past and far past each limit: answered (a 200, or a 4xx naming the limit) well
    within the timeout, never a 5xx, refusals cost nothing, and /health answers after each."""
    ledger = Ledger(server)

    @settings(SETTINGS, max_examples=40)
    @given(request=sized_requests())
    def run(request: tuple[str, str]) -> None:
        path, text = request
        r = post(server, path, text)
        error_shape(r)
        ledger.after(r)
        with httpx.Client(timeout=5) as client:
            assert client.get(f"{server.base_url}/health").status_code == 200

    run()


MALFORMED = [
    pytest.param(b'{"model": "x", "messages": [', "application/json", id="truncated-json"),
    pytest.param(b"", "application/json", id="empty"),
    pytest.param(b"[]", "application/json", id="array"),
    pytest.param(b'"a string"', "application/json", id="string"),
    pytest.param(b"null", "application/json", id="null"),
    pytest.param(b"\xff\xfe\x00", "application/json", id="not-utf8"),
    pytest.param(b'{"model": NaN, "messages": Infinity}', "application/json", id="nan-infinity"),
    pytest.param(b'{"model": "a", "model": 5}', "application/json", id="duplicate-keys"),
    pytest.param(json.dumps({"model": MODEL, "messages": []}).encode(), "text/plain", id="text-plain"),
    pytest.param(b"model=x&messages=y", "application/x-www-form-urlencoded", id="form"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "application/json", id="deep-array"),
]


@pytest.mark.parametrize(("content", "content_type"), MALFORMED)
def test_malformed_bodies_are_a_400(server: Server, content: bytes, content_type: str) -> None:
    ledger = Ledger(server)
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize"):
        r = post(server, path, content, content_type)
        error_shape(r)
        assert r.status_code == 400, (path, r.status_code, r.text[:300])
        ledger.after(r)


def test_a_10_mb_prompt_is_a_400_that_costs_nothing(server: Server) -> None:
    ledger = Ledger(server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 10_000_000}], "max_tokens": 1}
    r = post(server, "/v1/chat/completions", json.dumps(body))
    error_shape(r)
    assert r.status_code in (400, 413), r.text[:300]
    ledger.after(r)


# --- schemathesis over the whole spec (last: it creates, changes and revokes things) ---------------------------
def credentials(path: str, server: Server, dashboard: Dashboard) -> dict[str, str]:
    """What the operation's security asks for (the spec's own classification is tested in test_openapi)."""
    if path.startswith("/admin"):
        return admin_auth()
    if path == "/auth/logout":  # it ends the session: each call gets a session of its own
        return dashboard.logged_in(fresh=True)
    if path.startswith("/auth"):
        return dashboard.before_login()
    if path.startswith("/v1/dashboard"):
        return dashboard.logged_in()
    return {"Authorization": f"Bearer {server.api_key}"}


FRAMING = {"content-length", "transfer-encoding", "host", "connection", "expect"}


def prepare(case: schemathesis.Case) -> None:
    """No generated framing headers (a `Content-Length: w` is refused by the HTTP server, as text, before any
    route sees it: no API's contract), and affordable generation: the served model (some of the time, so that
    bodies get past the 404), a few tokens and choices. Everything else stays as generated."""
    for name in [h for h in case.headers or {} if h.lower() in FRAMING]:
        del case.headers[name]
    body = case.body
    if not isinstance(body, dict) or not ({"messages", "prompt"} & set(body)):
        return
    if isinstance(body.get("model"), str) and len(body["model"]) % 4 != 0:
        body["model"] = MODEL
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = max(1, min(body["max_tokens"], 8))
    else:
        body.setdefault("max_tokens", 8)
    if isinstance(body.get("n"), int):
        body["n"] = max(1, min(body["n"], 2))
    body.pop("max_completion_tokens", None)
    body.pop("ignore_eos", None)


def fuzz_operation(
    operation: schemathesis.APIOperation, mode: GenerationMode, server: Server, dashboard: Dashboard, examples: int
) -> None:
    # Negative cases may leave out or spoil the credentials the spec declares; the session ones go in the
    # Cookie header here, so those "rejections" would be misread: the check stays off for cookie routes.
    cookie_auth = operation.path.startswith(("/auth", "/v1/dashboard"))
    checks = CHECKS + ([negative_data_rejection] if mode.is_negative and not cookie_auth else [])

    @settings(SETTINGS, max_examples=examples)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        prepare(case)
        response = case.call(headers=credentials(operation.path, server, dashboard), timeout=TIMEOUT)
        case.validate_response(response, checks=checks)

    run()


def operations(server: Server) -> list[schemathesis.APIOperation]:
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_schemathesis_finds_no_server_error_and_no_lie_in_the_spec(server: Server) -> None:
    dashboard = Dashboard(server)
    ops = operations(server)
    assert len(ops) >= 30  # every route of the API (a route left out of the spec would not be fuzzed)
    for op in ops:
        generative = op.method.upper() == "POST" and op.path in ("/v1/chat/completions", "/v1/completions")
        fuzz_operation(op, GenerationMode.POSITIVE, server, dashboard, 20 if generative else 8)
        if op.path_parameters or op.query or op.body:  # nothing to spoil in a bare GET
            fuzz_operation(op, GenerationMode.NEGATIVE, server, dashboard, 8)
