"""The gateway in front of upstream engines: two `llamaserve engine` processes behind `llamaserve serve
--config`, and fake upstreams that hang or fail. Same answers as direct, load spread, failover before the
first byte, 502/504 in OpenAI's shape, and credits from the upstream's usage."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.conftest import MODEL, Server, free_port, send_json, serve_http, start_server, wait_for

GATEWAY_MODEL = "smol-gateway"
ALIAS = "smol-alias"
# Two engines side by side get one llama.cpp thread each, so their threads never outnumber the 2 cores of a test
# machine: llama.cpp's threads spin while they wait for each other, and 4 on 2 cores stalled a burst past 60 s.
ENGINE = ("--parallel", "2", "--threads", "1")
# This module's prompts are short: a smaller KV cache than the default 4096 tokens a slot starts sooner.
SMALL_ENGINE = (*ENGINE, "--ctx", "1024")
MESSAGES = [{"role": "user", "content": "Name a colour."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def registry(path: Path, models: list[dict[str, Any]]) -> Path:
    lines = []
    for m in models:
        lines += [
            "[[models]]",
            f'id = "{m["id"]}"',
            f"aliases = {json.dumps(m.get('aliases', []))}",
            "price_input = 1000",
            "price_output = 1000",
            f"timeout = {m.get('timeout', 60)}",
        ]
        for url in m["upstreams"]:
            lines += ["[[models.backends]]", 'type = "upstream"', f'url = "{url}"', f'model = "{MODEL}"']
            if "health_interval" in m:
                lines.append(f"health_interval = {m['health_interval']}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def engines() -> Iterator[list[Server]]:
    with start_server(*SMALL_ENGINE, command="engine") as a, start_server(*SMALL_ENGINE, command="engine") as b:
        yield [a, b]


@pytest.fixture(scope="module")
def gateway(engines: list[Server], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    path = registry(
        tmp_path_factory.mktemp("gw") / "llamaserve.toml",
        [{"id": GATEWAY_MODEL, "aliases": [ALIAS], "upstreams": [e.v1 for e in engines]}],
    )
    with start_server("--config", str(path)) as server:
        yield server


def post(server: Server, path: str, key: str | None = None, **body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or server.api_key}"} if (key or server.api_key) else {}
    return httpx.post(f"{server.v1}{path}", json=body, headers=headers, timeout=120)


def burst(gateway: Server, n: int) -> list[int]:
    """Statuses of n concurrent chat requests through the gateway."""

    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=120, headers=gateway.auth) as c:
            body = {"model": GATEWAY_MODEL, "messages": MESSAGES, "max_tokens": 8, "ignore_eos": True}
            rs = await asyncio.gather(*(c.post(f"{gateway.v1}/chat/completions", json=body) for _ in range(n)))
        return [r.status_code for r in rs]

    return asyncio.run(run())


def same_request(gateway: Server, engine: Server, path: str, **body: Any) -> tuple[dict, dict]:
    via = post(gateway, path, model=GATEWAY_MODEL, **body)
    direct = post(engine, path, model=MODEL, **body)
    assert via.status_code == 200 and direct.status_code == 200, (via.text, direct.text)
    return via.json(), direct.json()


def test_models_list_aliases_and_capabilities(gateway: Server) -> None:
    r = httpx.get(f"{gateway.v1}/models", headers=gateway.auth).json()
    [card] = r["data"]
    assert card["id"] == GATEWAY_MODEL and card["aliases"] == [ALIAS]
    assert set(card["capabilities"]) == {"tools", "json", "logprobs"}
    assert post(gateway, "/chat/completions", model=ALIAS, messages=MESSAGES, max_tokens=2).json()["model"] == (
        GATEWAY_MODEL
    )


def test_segmind_form_names_the_model_in_the_path(gateway: Server, engines: list[Server]) -> None:
    """POST /v1/<alias> with the chat body and no `model`, as Segmind's docs call it: the same answer as the
    OpenAI form, through the gateway and straight from an engine."""
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]}
    body |= {"max_tokens": 8, "temperature": 0}
    by_path = httpx.post(f"{gateway.v1}/{ALIAS}", json=body, headers=gateway.auth, timeout=120)
    assert by_path.status_code == 200, by_path.text
    openai_form = post(gateway, "/chat/completions", model=GATEWAY_MODEL, **body).json()
    assert by_path.json()["choices"][0]["message"] == openai_form["choices"][0]["message"]
    for count in ("prompt_tokens", "completion_tokens"):
        assert by_path.json()["usage"][count] == openai_form["usage"][count]
    direct = httpx.post(f"{engines[0].v1}/{MODEL}", json=body, timeout=120)
    assert direct.json()["choices"][0]["message"] == openai_form["choices"][0]["message"]

    for path, extra, status, kind in [
        ("no-such-model", {}, 404, "not_found_error"),  # no such model: no such path
        (ALIAS, {"model": "another"}, 400, "invalid_request_error"),
        (ALIAS, {"max_tokens": 0}, 400, "invalid_request_error"),
    ]:
        r = httpx.post(f"{gateway.v1}/{path}", json={**body, **extra}, headers=gateway.auth, timeout=60)
        assert r.status_code == status and r.json()["error"]["type"] == kind, r.text
    assert httpx.post(f"{gateway.v1}/{ALIAS}", json=body, timeout=60).status_code == 401
    assert httpx.get(f"{gateway.v1}/{ALIAS}", headers=gateway.auth).status_code == 405  # the path exists: POST


def test_tokenize_and_detokenize_are_asked_of_the_upstream(gateway: Server, engines: list[Server]) -> None:
    """Only the upstream knows its model's tokenizer: the gateway forwards /tokenize and /detokenize (vLLM's, at
    its root) for an upstream model, under the key's checks."""
    for body in ({"messages": MESSAGES}, {"prompt": "Name a colour."}):
        via = httpx.post(f"{gateway.base_url}/tokenize", json={**body, "model": ALIAS}, headers=gateway.auth)
        direct = httpx.post(f"{engines[0].base_url}/tokenize", json={**body, "model": MODEL})
        assert via.status_code == 200 and via.json() == direct.json(), via.text
    tokens = {"tokens": via.json()["tokens"]}
    back = httpx.post(f"{gateway.base_url}/detokenize", json={**tokens, "model": GATEWAY_MODEL}, headers=gateway.auth)
    assert back.status_code == 200 and back.json()["prompt"] == "Name a colour.", back.text
    assert httpx.post(f"{gateway.base_url}/tokenize", json={**body, "model": ALIAS}).status_code == 401
    bad = httpx.post(f"{gateway.base_url}/detokenize", json={"model": ALIAS, "tokens": [10**9]}, headers=gateway.auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens", bad.text  # the upstream's 400


@pytest.mark.parametrize(
    "body",
    [
        {"messages": MESSAGES, "max_tokens": 12, "temperature": 0},
        {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2},
        {"messages": MESSAGES, "max_tokens": 30, "temperature": 0, "response_format": {"type": "json_object"}},
        {"messages": MESSAGES, "max_tokens": 60, "temperature": 0, "tools": [WEATHER], "tool_choice": "required"},
        {"messages": MESSAGES, "max_tokens": 8, "temperature": 0.9, "seed": 7, "top_k": 20, "min_p": 0.05},
    ],
    ids=["greedy", "logprobs", "json", "tools", "seeded-extensions"],
)
def test_same_answers_as_direct(gateway: Server, engines: list[Server], body: dict[str, Any]) -> None:
    via, direct = same_request(gateway, engines[0], "/chat/completions", **body)
    assert via["model"] == GATEWAY_MODEL
    for a, b in zip(via["choices"], direct["choices"], strict=True):
        assert a["message"]["content"] == b["message"]["content"]
        assert [c["function"] for c in a["message"]["tool_calls"]] == [
            c["function"] for c in b["message"]["tool_calls"]
        ]
        assert a["finish_reason"] == b["finish_reason"]
        if body.get("logprobs"):
            assert [t["token"] for t in a["logprobs"]["content"]] == [t["token"] for t in b["logprobs"]["content"]]
    assert via["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"]


def test_completions_with_echo_through_the_gateway(gateway: Server, engines: list[Server]) -> None:
    via, direct = same_request(
        gateway, engines[0], "/completions", prompt="The sky is", max_tokens=5, temperature=0, echo=True, logprobs=1
    )
    assert via["choices"][0]["text"] == direct["choices"][0]["text"]
    assert via["choices"][0]["logprobs"]["tokens"] == direct["choices"][0]["logprobs"]["tokens"]


def stream_text(server: Server, model: str, **body: Any) -> tuple[str, dict[str, Any] | None, list[dict]]:
    text, usage, chunks = "", None, []
    headers = server.auth if server.api_key else {}
    with httpx.stream(
        "POST",
        f"{server.v1}/chat/completions",
        json={"model": model, "stream": True, **body},
        headers=headers,
        timeout=120,
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                chunks.append(chunk)
                usage = chunk.get("usage") or usage
                for c in chunk["choices"]:
                    text += c["delta"].get("content") or ""
    return text, usage, chunks


def test_streaming_matches_and_usage_only_when_asked(gateway: Server, engines: list[Server]) -> None:
    body = {"messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    via, usage, chunks = stream_text(gateway, GATEWAY_MODEL, **body)
    direct, _, _ = stream_text(engines[0], MODEL, **body)
    assert via == direct
    assert usage is None and all(c["model"] == GATEWAY_MODEL for c in chunks)  # the client did not ask for usage
    _, usage, _ = stream_text(gateway, GATEWAY_MODEL, stream_options={"include_usage": True}, **body)
    assert usage is not None and usage["completion_tokens"] == 10


def test_requests_spread_over_both_engines(gateway: Server, engines: list[Server]) -> None:
    before = [e.engine_stats()["sequences_finished"] for e in engines]
    assert burst(gateway, 8) == [200] * 8
    served = [e.engine_stats()["sequences_finished"] - b for e, b in zip(engines, before, strict=True)]
    assert sum(served) == 8 and min(served) >= 2, served


def test_metrics_show_each_upstream(gateway: Server, engines: list[Server]) -> None:
    assert post(gateway, "/chat/completions", model=GATEWAY_MODEL, messages=MESSAGES, max_tokens=2).status_code == 200
    text = httpx.get(f"{gateway.base_url}/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in metric_samples(text)}
    for engine in engines:
        labels = (("backend", engine.v1), ("model", GATEWAY_MODEL))
        assert samples[("llamaserve_upstream_healthy", labels)] == 1
        assert samples[("llamaserve_upstream_in_flight", labels)] == 0
    served = [v for (name, labels), v in samples.items() if name == "llamaserve_upstream_requests_total"]
    assert served and sum(served) >= 1
    assert "# TYPE llamaserve_upstream_first_byte_seconds summary" in text


def metric_samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def test_gateway_logs_the_upstream_that_served(gateway: Server, engines: list[Server]) -> None:
    r = post(gateway, "/chat/completions", model=GATEWAY_MODEL, messages=MESSAGES, max_tokens=3, ignore_eos=True)
    assert r.status_code == 200
    [line] = gateway.access_log(r.headers["x-request-id"])
    assert line["backend"] in {e.v1 for e in engines} and line["model"] == GATEWAY_MODEL
    assert (line["status"], line["outcome"], line["completion_tokens"]) == (200, "ok", 3)
    assert line["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    # The engine that served it logged the request under the same id, with no account (the gateway accounts).
    served = next(e for e in engines if e.v1 == line["backend"])
    [engine_line] = served.access_log(r.headers["x-request-id"])
    assert engine_line["path"] == "/v1/chat/completions" and engine_line["key_prefix"] is None
    assert engine_line["completion_tokens"] == 3
    # An engine takes only ids of our own shape; the gateway makes its own whatever the client sends.
    forged = {"Authorization": gateway.auth["Authorization"], "X-Request-Id": "req_" + "0" * 32}
    r = httpx.get(f"{gateway.v1}/models", headers=forged)
    assert r.status_code == 200 and r.headers["x-request-id"] != forged["X-Request-Id"]
    r = httpx.get(f"{served.v1}/models", headers={"X-Request-Id": "made up"})
    assert r.headers["x-request-id"].startswith("req_") and r.headers["x-request-id"] != "made up"
    with httpx.stream(
        "POST",
        f"{gateway.v1}/chat/completions",
        json={"model": GATEWAY_MODEL, "messages": MESSAGES, "max_tokens": 4, "ignore_eos": True, "stream": True},
        headers=gateway.auth,
        timeout=60,
    ) as streamed:
        body = streamed.read()
    assert b"[DONE]" in body
    [line] = gateway.access_log(streamed.headers["x-request-id"])
    assert line["backend"] in {e.v1 for e in engines} and line["completion_tokens"] == 4
    assert 0 < line["ttft_ms"] <= line["latency_ms"]


def test_dashboard_upstream_panels_read_exported_metrics(gateway: Server) -> None:
    """The upstream half of test_observability's dashboard check: names the dashboard reads that only a
    gateway in front of upstream engines exports."""
    from tests.test_observability import dashboard_metrics

    assert post(gateway, "/chat/completions", model=GATEWAY_MODEL, messages=MESSAGES, max_tokens=2).status_code == 200
    exported = {s.name for s in metric_samples(httpx.get(f"{gateway.base_url}/metrics").text)}
    wanted = {n for n in dashboard_metrics() if n.startswith("llamaserve_upstream_")}
    assert wanted and not wanted - exported, wanted - exported


def test_credits_follow_upstream_usage(gateway: Server) -> None:
    def settled_balance() -> int:
        deadline = time.monotonic() + 10
        while (b := httpx.get(f"{gateway.v1}/account/balance", headers=gateway.auth).json())["open_holds"]:
            assert time.monotonic() < deadline, b
            time.sleep(0.05)
        return int(b["balance_micro"])

    before = settled_balance()  # earlier tests' settlements may still be running
    r = post(gateway, "/chat/completions", model=GATEWAY_MODEL, messages=MESSAGES, max_tokens=7, temperature=0).json()
    spent = before - settled_balance()
    assert spent == (r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]) * 1000


# --- failures ----------------------------------------------------------------------------------------------------
class _Failing(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        send_json(self, 500, {"error": {"message": "out of memory", "type": "server_error"}})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def failing_upstream() -> Iterator[str]:
    with serve_http(_Failing) as url:
        yield f"{url}/v1"


class _NoUsage(BaseHTTPRequestHandler):
    """An engine that answers without `usage`."""

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        choice = {"index": 0, "message": {"role": "assistant", "content": "Crimson red."}, "finish_reason": "stop"}
        send_json(self, 200, {"id": "x", "object": "chat.completion", "choices": [choice]})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def usage_less_upstream() -> Iterator[str]:
    with serve_http(_NoUsage) as url:
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def silent_upstream() -> Iterator[str]:
    """Accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:  # closed at teardown
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    stop.set()
    for s in held:
        s.close()
    listener.close()


class _Counting(BaseHTTPRequestHandler):
    """An instant upstream that records which completions were asked of it."""

    requests: list[str] = []  # their X-Request-Id: the gateway's request id, as a UUID

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).requests.append(self.headers.get("X-Request-Id", ""))
        message = {"role": "assistant", "content": "Red."}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
        send_json(self, 200, {"id": "x", "object": "chat.completion", "choices": [choice], "usage": usage})

    def do_GET(self) -> None:  # noqa: N802
        send_json(self, 200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def counting_upstream() -> Iterator[str]:
    with serve_http(_Counting) as url:
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def faulty_gateway(
    failing_upstream: str,
    silent_upstream: str,
    usage_less_upstream: str,
    counting_upstream: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    """A gateway in front of the fake upstreams (and an admin key, to make accounts)."""
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    path = registry(
        tmp_path_factory.mktemp("faulty") / "llamaserve.toml",
        [
            {"id": "fails", "upstreams": [failing_upstream]},
            {"id": "hangs", "upstreams": [silent_upstream], "timeout": 1},
            {"id": "dead", "upstreams": [dead]},
            {"id": "no-usage", "upstreams": [usage_less_upstream]},
            {"id": "counted", "upstreams": [counting_upstream]},
        ],
    )
    with start_server("--config", str(path), "--admin-key", "admin") as server:
        yield server


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [("fails", 502, "bad_gateway"), ("dead", 502, "bad_gateway"), ("hangs", 504, "upstream_timeout")],
)
def test_upstream_failures(faulty_gateway: Server, model: str, status: int, code: str) -> None:
    balance = lambda: httpx.get(f"{faulty_gateway.v1}/account/balance", headers=faulty_gateway.auth).json()  # noqa: E731
    before = balance()["balance_micro"]
    started = time.monotonic()

    def ask(stream: bool) -> httpx.Response:
        return post(faulty_gateway, "/chat/completions", model=model, messages=MESSAGES, max_tokens=5, stream=stream)

    with ThreadPoolExecutor(2) as pool:  # side by side: the two 504s wait out the model's timeout together
        replies = list(pool.map(ask, (False, True)))
    for r in replies:
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while balance()["open_holds"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = balance()
    assert after["open_holds"] == 0 and after["balance_micro"] == before  # nothing charged


def test_an_upstream_without_usage_is_charged_by_estimate(faulty_gateway: Server) -> None:
    """4 bytes of text a token for both counts (plus 8 tokens a message), not the prompt's bound that was held."""
    r = post(faulty_gateway, "/chat/completions", model="no-usage", messages=MESSAGES, max_tokens=50)
    assert r.status_code == 200, r.text
    request_id = r.headers["x-request-id"]
    deadline = time.monotonic() + 10
    while not (records := [u for u in account_usage(faulty_gateway) if u["request_id"] == request_id]):
        assert time.monotonic() < deadline, "the request was never settled"
        time.sleep(0.05)
    [record] = records
    assert record["prompt_tokens"] == math.ceil(len(MESSAGES[0]["content"].encode()) / 4) + 8 and record["estimated"]
    usage = r.json()["usage"]  # the client is told, too
    assert usage["estimated"] is True and usage["completion_tokens"] == record["completion_tokens"]
    assert record["completion_tokens"] == math.ceil(len(b"Crimson red.") / 4)
    assert record["cost_micro"] == (record["prompt_tokens"] + record["completion_tokens"]) * 1000


def account_usage(server: Server) -> list[dict[str, Any]]:
    return httpx.get(f"{server.v1}/account/usage", headers=server.auth).json()["data"]


def test_a_refused_hold_stops_the_upstream_call(faulty_gateway: Server) -> None:
    """The upstream call starts while the credits are held: a 402 cancels it, gives its slot back, charges
    nothing; the account's next requests wait for their hold and never reach the upstream."""
    gw = faulty_gateway
    admin = {"Authorization": "Bearer admin"}
    r = httpx.post(f"{gw.base_url}/admin/accounts", json={"name": "poor", "credits": "0.0001"}, headers=admin)
    assert r.status_code == 201, r.text
    key = httpx.post(f"{gw.base_url}/admin/accounts/poor/keys", json={}, headers=admin).json()["key"]
    refused = post(gw, "/chat/completions", key=key, model="counted", messages=MESSAGES, max_tokens=5)
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "insufficient_credits"
    for stream in (False, True):
        again = post(gw, "/chat/completions", key=key, model="counted", messages=MESSAGES, stream=stream)
        assert again.status_code == 402, again.text
    account = httpx.get(f"{gw.v1}/account/balance", headers={"Authorization": f"Bearer {key}"}).json()
    assert account["open_holds"] == 0 and account["balance_micro"] == 100
    in_flight = [
        s.value
        for s in metric_samples(httpx.get(f"{gw.base_url}/metrics").text)
        if s.name == "llamaserve_upstream_in_flight" and s.labels["model"] == "counted"
    ]
    assert in_flight == [0]
    served = post(gw, "/chat/completions", model="counted", messages=MESSAGES, max_tokens=5)
    assert served.status_code == 200
    # The refused call may have reached the upstream before it was cancelled, and may land there a moment after
    # the client had its 402 (so the upstream's count is not read then): the requests that waited for their hold
    # never reached it, the next one did, once.
    reached = list(_Counting.requests)
    assert set(reached) <= {upstream_id(refused), upstream_id(served)}, reached
    assert reached.count(upstream_id(refused)) <= 1 and reached.count(upstream_id(served)) == 1, reached


def upstream_id(r: httpx.Response) -> str:
    """The id a gateway's request carries upstream: its own, as a UUID."""
    return str(uuid.UUID(r.headers["x-request-id"].removeprefix("req_")))


def probe_verdict(gateway: Server, engine: Server) -> float:
    """The gateway's health check's verdict on an engine of GATEWAY_MODEL: 1 in, 0 out."""
    labels = {"backend": engine.v1, "model": GATEWAY_MODEL}
    samples = metric_samples(httpx.get(f"{gateway.base_url}/metrics").text)
    [value] = [s.value for s in samples if s.name == "llamaserve_upstream_healthy" and s.labels == labels]
    return value


def wait_for_verdict(gateway: Server, engine: Server, verdict: float) -> None:
    wait_for(lambda: probe_verdict(gateway, engine) == verdict, f"the health check finding {engine.v1} {verdict}")


def test_dead_engine_is_taken_out_and_probed_back_in(engines: list[Server], tmp_path: Path) -> None:
    """SIGKILL one engine: requests keep succeeding and, once the health check has seen it, go to the live one
    only; start it again on its port: the probe brings it back and traffic returns to it. (The live one is the
    module's second engine; the probes run every 0.2 s.)"""
    port_a = free_port()
    b = engines[1]
    with start_server(*SMALL_ENGINE, command="engine", port=port_a) as a:
        upstreams = [a.v1, b.v1]
        path = registry(
            tmp_path / "llamaserve.toml", [{"id": GATEWAY_MODEL, "upstreams": upstreams, "health_interval": 0.2}]
        )
        with start_server("--config", str(path)) as gw:
            os.kill(a.process.pid, signal.SIGKILL)
            a.process.wait()
            wait_for_verdict(gw, a, 0)  # a health probe has found it dead
            before = b.wait_idle()["sequences_finished"]
            for _ in range(4):
                assert (
                    post(gw, "/chat/completions", model=GATEWAY_MODEL, messages=MESSAGES, max_tokens=2).status_code
                    == 200
                )
            assert b.engine_stats()["sequences_finished"] - before == 4
            with start_server(*SMALL_ENGINE, command="engine", port=port_a) as revived:
                wait_for_verdict(gw, revived, 1)  # probed back in
                assert burst(gw, 6) == [200] * 6
                assert revived.engine_stats()["sequences_finished"] >= 2


def test_killed_engine_fails_over(engines: list[Server], tmp_path: Path) -> None:
    b = engines[1]  # the live one: the module's second engine
    with start_server(*SMALL_ENGINE, command="engine") as a:
        path = registry(tmp_path / "llamaserve.toml", [{"id": GATEWAY_MODEL, "upstreams": [a.v1, b.v1]}])
        with start_server("--config", str(path)) as gw:
            assert (
                post(gw, "/chat/completions", model=GATEWAY_MODEL, messages=MESSAGES, max_tokens=2).status_code == 200
            )
            os.kill(a.process.pid, signal.SIGKILL)
            a.process.wait()
            statuses = [
                post(gw, "/chat/completions", model=GATEWAY_MODEL, messages=MESSAGES, max_tokens=2).status_code
                for _ in range(6)
            ]
            assert statuses == [200] * 6  # the dead engine's requests were retried on the live one
