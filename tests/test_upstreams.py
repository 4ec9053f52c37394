"""The gateway in front of engines it did not write, over TLS and not: a `llamaserve engine` behind HTTPS (a
throwaway CA), llama-cpp-python's own OpenAI server, and scripted upstreams that misbehave as real ones do
(no usage, no [DONE], lines that are not JSON, error bodies that are not OpenAI's). Every failure is an
OpenAI-style error, and what was delivered, no more, is charged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, Server, free_port, send_json, serve_http, start_server, wait_for
from tests.forkserver import fork_server
from tests.test_gateway import WEATHER, metric_samples

# Beside other processes on a 2-core machine; the prompts here are short, and a small KV cache starts sooner.
ENGINE = ("--parallel", "2", "--threads", "1", "--ctx", "1024")
MESSAGES = [{"role": "user", "content": "Name a colour."}]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # strings, numbers and lists of them read the same in TOML


def write_registry(path: Path, models: list[dict[str, Any]]) -> Path:
    """A registry file: each model's keys, and its `backends` (upstream unless a type is given)."""
    lines = []
    for model in models:
        lines.append("[[models]]")
        lines += [f"{k} = {_toml(v)}" for k, v in model.items() if k != "backends"]
        for backend in model["backends"]:
            lines.append("[[models.backends]]")
            lines += [f"{k} = {_toml(v)}" for k, v in {"type": "upstream", **backend}.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def post(server: Server, path: str, **body: Any) -> httpx.Response:
    headers = server.auth if server.api_key else {}
    return httpx.post(f"{server.v1}{path}", json=body, headers=headers, timeout=120, verify=server.verify)


def stream_events(server: Server, model: str, **body: Any) -> tuple[list[dict[str, Any] | str], str]:
    """A streamed chat completion's events (the JSON objects, and "[DONE]") and its request id."""
    events: list[dict[str, Any] | str] = []
    headers = server.auth if server.api_key else {}
    body = {"model": model, "stream": True, **body}
    url = f"{server.v1}/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=120, verify=server.verify) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    return events, r.headers["x-request-id"]


def streamed_text(events: list[dict[str, Any] | str]) -> str:
    return "".join(c["delta"].get("content") or "" for e in events if isinstance(e, dict) for c in e.get("choices", []))


def usage_record(server: Server, request_id: str) -> dict[str, Any]:
    """The request's usage record, once settled; checks that no hold is left open."""
    deadline = time.monotonic() + 15
    while True:
        records = httpx.get(f"{server.v1}/account/usage", headers=server.auth).json()["data"]
        found = [u for u in records if u["request_id"] == request_id]
        balance = httpx.get(f"{server.v1}/account/balance", headers=server.auth).json()
        if found and balance["open_holds"] == 0:
            return found[0]
        assert time.monotonic() < deadline, f"request {request_id} not settled: {found}, {balance}"
        time.sleep(0.05)


# --- TLS ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A throwaway CA and a certificate it signed for localhost (not for 127.0.0.1)."""
    import trustme

    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    files = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    ca.cert_pem.write_to_path(files["ca"])
    cert.private_key_pem.write_to_path(files["key"])
    for blob in cert.cert_chain_pems:
        blob.write_to_path(files["cert"], append=True)
    return {name: str(path) for name, path in files.items()}


@pytest.fixture(scope="module")
def tls_engine(tls: dict[str, str]) -> Iterator[Server]:
    args = ("--ssl-certfile", tls["cert"], "--ssl-keyfile", tls["key"])
    with start_server(*ENGINE, *args, command="engine", ca=tls["ca"]) as engine:
        yield engine


@pytest.fixture(scope="module")
def tls_gateway(tls_engine: Server, tls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = tls_engine.base_url.rsplit(":", 1)[1]
    upstream = {"url": f"https://localhost:{port}/v1", "model": MODEL}
    path = write_registry(
        tmp_path_factory.mktemp("tls-gw") / "llamaserve.toml",
        [
            {"id": "secure", "backends": [{**upstream, "ca_file": tls["ca"]}]},
            {"id": "untrusted", "backends": [upstream]},  # the system's CAs do not know ours
            {"id": "insecure", "backends": [{**upstream, "verify": False}]},
            {
                "id": "wrong-host",
                "backends": [{**upstream, "url": f"https://127.0.0.1:{port}/v1", "ca_file": tls["ca"]}],
            },
        ],
    )
    with start_server("--config", str(path)) as gateway:
        yield gateway


@pytest.mark.parametrize(
    "body",
    [
        {"messages": MESSAGES, "max_tokens": 12, "temperature": 0},
        {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2},
        {"messages": MESSAGES, "max_tokens": 60, "temperature": 0, "tools": [WEATHER], "tool_choice": "required"},
    ],
    ids=["chat", "logprobs", "tools"],
)
def test_a_gateway_answers_over_tls_as_the_engine_does(
    tls_gateway: Server, tls_engine: Server, body: dict[str, Any]
) -> None:
    via = post(tls_gateway, "/chat/completions", model="secure", **body)
    direct = post(tls_engine, "/chat/completions", model=MODEL, **body)
    assert via.status_code == 200 and direct.status_code == 200, (via.text, direct.text)
    [a], [b] = via.json()["choices"], direct.json()["choices"]
    for call in a["message"]["tool_calls"] + b["message"]["tool_calls"]:
        call.pop("id")  # each answer makes its own
    assert a["message"] == b["message"] and a["finish_reason"] == b["finish_reason"]
    assert a.get("logprobs") == b.get("logprobs")
    assert via.json()["usage"]["completion_tokens"] == direct.json()["usage"]["completion_tokens"]


def test_a_stream_over_tls_matches_the_engine(tls_gateway: Server, tls_engine: Server) -> None:
    body = {"messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    via, _ = stream_events(tls_gateway, "secure", stream_options={"include_usage": True}, **body)
    direct, _ = stream_events(tls_engine, MODEL, **body)
    assert streamed_text(via) == streamed_text(direct) and via[-1] == "[DONE]"
    [usage] = [e["usage"] for e in via if isinstance(e, dict) and e.get("usage")]
    assert usage["completion_tokens"] == 10 and "estimated" not in usage


@pytest.mark.parametrize("model", ["untrusted", "wrong-host"])
def test_a_certificate_not_trusted_is_a_502_naming_it(tls_gateway: Server, model: str) -> None:
    """No CA file for a private CA, or a certificate for another host name: refused, as a 502 that says so; the
    gateway stays up and charges nothing."""
    before = httpx.get(f"{tls_gateway.v1}/account/balance", headers=tls_gateway.auth).json()["balance_micro"]
    for stream in (False, True):
        r = post(tls_gateway, "/chat/completions", model=model, messages=MESSAGES, max_tokens=4, stream=stream)
        assert r.status_code == 502, r.text
        error = r.json()["error"]
        assert error["code"] == "bad_gateway" and "certificate" in error["message"], error
    assert httpx.get(f"{tls_gateway.base_url}/health").status_code == 200
    after = httpx.get(f"{tls_gateway.v1}/account/balance", headers=tls_gateway.auth).json()
    assert after["balance_micro"] == before and after["open_holds"] == 0


def test_verify_false_is_explicit_and_logged(tls_gateway: Server) -> None:
    r = post(tls_gateway, "/chat/completions", model="insecure", messages=MESSAGES, max_tokens=2)
    assert r.status_code == 200, r.text
    warnings = [line for line in tls_gateway.log_lines() if line.get("level") == "warning"]
    assert any("not verified" in line.get("message", "") for line in warnings), warnings


def test_a_plain_client_cannot_talk_to_the_tls_engine(tls_engine: Server) -> None:
    with pytest.raises(httpx.ConnectError):  # the system's CAs do not know the test CA
        httpx.get(f"{tls_engine.base_url}/health")


# --- a third-party engine: llama-cpp-python's own server -------------------------------------------------------
GGUF_CONTEXT = 1024


def embedded_gguf() -> str:
    from llamaserve.config import resolve_model

    return str(resolve_model(None)[0])


# `python -m llama_cpp.server`, with llama.cpp's extra CPU buffer types off, as our engine has them: on CPUs with AMX
# their repacked weights crash llama-cpp-python 0.3.36's decode of any prompt longer than a few tokens (SIGSEGV).
LLAMA_CPP_SERVER = """
import runpy
import llama_cpp.llama

default_params = llama_cpp.llama.llama_cpp.llama_model_default_params

def without_extra_buffers():
    params = default_params()
    params.use_extra_bufts = False
    return params

llama_cpp.llama.llama_cpp.llama_model_default_params = without_extra_buffers
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


def llama_cpp_servers(ports: list[int], folder: Path) -> list[subprocess.Popen[bytes]]:
    """llama-cpp-python's OpenAI server on the embedded GGUF, one on each port, started side by side (each is a
    fresh interpreter that spends a second or more importing), once all answer. By default a new request
    interrupts the one running; a server behind a gateway must not do that. One llama.cpp thread for prompts too
    (its default is one a core): threads that outnumber the cores they get spin waiting for each other, and on a
    busy 2-core machine a first short prompt took 1 to 7 s instead of 0.3 to 0.5 s."""
    processes: list[subprocess.Popen[bytes]] = []
    logs = [folder / f"server-{i}.log" for i in range(len(ports))]
    try:
        for port, log in zip(ports, logs, strict=True):
            command = [sys.executable, "-c", LLAMA_CPP_SERVER, "--model", embedded_gguf(), "--host", "127.0.0.1"]
            command += ["--port", str(port), "--interrupt_requests", "false", "--n_threads", "1"]
            command += ["--n_threads_batch", "1", "--n_ctx", str(GGUF_CONTEXT)]
            with log.open("wb") as out:
                processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        for process, port, log in zip(processes, ports, logs, strict=True):
            while True:
                assert process.poll() is None, log.read_text(errors="replace")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "llama_cpp.server did not start in 120 s"
                time.sleep(0.05)
    except BaseException:
        for process in processes:
            process.kill()
            process.wait()
        raise
    return processes


@pytest.fixture(scope="module")
def third_party(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two llama_cpp.server processes (one to be killed) and a gateway in front, whose model names the same GGUF
    as its tokenizer."""
    folder = tmp_path_factory.mktemp("third-party")
    ports = [free_port(), free_port()]
    processes = llama_cpp_servers(ports, folder)
    counted = {"tokenizer": embedded_gguf(), "chat_format": "template", "price_input": 1000, "price_output": 1000}
    backend = {"model": "smol", "health_interval": 0.2}
    path = write_registry(
        folder / "llamaserve.toml",
        [
            {"id": "llama-cpp", **counted, "backends": [{**backend, "url": f"http://127.0.0.1:{ports[0]}/v1"}]},
            {"id": "doomed", "backends": [{**backend, "url": f"http://127.0.0.1:{ports[1]}/v1"}]},
        ],
    )
    try:
        with start_server("--config", str(path)) as gateway:
            yield {"gateway": gateway, "processes": processes, "direct": f"http://127.0.0.1:{ports[0]}/v1"}
    finally:
        for process in processes:
            process.kill()
            process.wait()


def independent_count(text: str) -> int:
    """The text's tokens as llama-cpp-python's high-level API counts them, on the same GGUF."""
    from llama_cpp import Llama

    vocab = Llama(model_path=embedded_gguf(), vocab_only=True, verbose=False)
    return len(vocab.tokenize(text.encode(), add_bos=False, special=False))


def test_third_party_chat_through_the_gateway(third_party: dict[str, Any]) -> None:
    """The same answer as asked directly. (llama-cpp-python reuses the previous prompt's cache, which changes a
    greedy answer's floating point: its first answer to a prompt can differ from the next ones, so the prompt is
    warmed first.)"""
    gateway: Server = third_party["gateway"]
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    direct = lambda: httpx.post(f"{third_party['direct']}/chat/completions", json=body, timeout=120).json()  # noqa: E731
    direct()
    r = post(gateway, "/chat/completions", model="llama-cpp", **body)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["model"] == "llama-cpp"
    assert reply["choices"][0]["message"]["content"] == direct()["choices"][0]["message"]["content"]
    # The server reports usage for a whole reply: that is what is charged.
    record = usage_record(gateway, r.headers["x-request-id"])
    assert record["completion_tokens"] == reply["usage"]["completion_tokens"] and not record["estimated"]


def test_third_party_stream_longer_than_two_probes_is_charged_what_it_produced(third_party: dict[str, Any]) -> None:
    """llama_cpp.server sends no usage in streams, even when asked: the gateway counts the delivered text with the
    model's tokenizer, sends the client the usage it asked for, and charges that count. The probes (every 0.2 s)
    neither disturb the stream nor mark the busy server down."""
    gateway: Server = third_party["gateway"]
    body = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_tokens": 150}
    started = time.monotonic()
    events, request_id = stream_events(gateway, "llama-cpp", stream_options={"include_usage": True}, **body)
    assert time.monotonic() - started > 0.5, "the stream must outlast two probe intervals"
    assert events[-1] == "[DONE]"
    text = streamed_text(events)
    [usage] = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]
    assert usage["completion_tokens"] == independent_count(text) > 20
    assert "estimated" not in usage
    record = usage_record(gateway, request_id)
    assert record["completion_tokens"] == usage["completion_tokens"] and not record["estimated"]
    assert record["status"] == "ok"
    metrics = metric_samples(httpx.get(f"{gateway.base_url}/metrics").text)
    [healthy] = [
        m.value for m in metrics if m.name == "llamaserve_upstream_healthy" and m.labels["model"] == "llama-cpp"
    ]
    assert healthy == 1


def test_third_party_max_tokens_and_stop(third_party: dict[str, Any]) -> None:
    gateway: Server = third_party["gateway"]
    for _ in range(2):  # warm: its answer to a prompt it has just seen is the one it gives again
        free = post(gateway, "/chat/completions", model="llama-cpp", messages=MESSAGES, max_tokens=16, temperature=0)
    text = free.json()["choices"][0]["message"]["content"]
    short = post(gateway, "/chat/completions", model="llama-cpp", messages=MESSAGES, max_tokens=3, temperature=0)
    assert short.json()["usage"]["completion_tokens"] == 3 and short.json()["choices"][0]["finish_reason"] == "length"
    word = text.split()[min(2, len(text.split()) - 1)]
    stopped = post(
        gateway, "/chat/completions", model="llama-cpp", messages=MESSAGES, max_tokens=16, temperature=0, stop=[word]
    )
    assert stopped.json()["choices"][0]["message"]["content"] == text[: text.index(word)]
    assert stopped.json()["choices"][0]["finish_reason"] == "stop"


def test_third_party_4xx_is_kept(third_party: dict[str, Any]) -> None:
    """A prompt longer than the server's context: its 400 reaches the client with its message and code; nothing
    is charged."""
    gateway: Server = third_party["gateway"]
    long = [{"role": "user", "content": "word " * 1500}]
    r = post(gateway, "/chat/completions", model="llama-cpp", messages=long, max_tokens=4)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and "context" in error["message"], error
    assert httpx.get(f"{gateway.v1}/account/balance", headers=gateway.auth).json()["open_holds"] == 0


def test_a_killed_third_party_server_is_a_502(third_party: dict[str, Any]) -> None:
    gateway: Server = third_party["gateway"]
    assert post(gateway, "/chat/completions", model="doomed", messages=MESSAGES, max_tokens=2).status_code == 200
    doomed = third_party["processes"][1]
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    for stream in (False, True):
        r = post(gateway, "/chat/completions", model="doomed", messages=MESSAGES, max_tokens=2, stream=stream)
        assert r.status_code == 502 and r.json()["error"]["code"] == "bad_gateway", r.text
    assert post(gateway, "/chat/completions", model="llama-cpp", messages=MESSAGES, max_tokens=2).status_code == 200


# --- scripted upstreams that misbehave ------------------------------------------------------------------------
def _chunk(content: str | None = None, finish: str | None = None, **delta: Any) -> bytes:
    if content is not None:
        delta["content"] = content
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    event = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "up", "choices": [choice]}
    return f"data: {json.dumps(event)}\n\n".encode()


CALL = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city"'}}
MORE = {"index": 0, "function": {"arguments": ': "Paris"}'}}
STREAMS = {
    # Two tokens, then a line that is not JSON.
    "garbage": [_chunk("Crimson"), _chunk(" red"), b"data: {not json\n\n"],
    # Finished, but no [DONE] before the connection closes; keep-alive comments and `data:` without a space.
    "no-done": [b": keep-alive\n\n", _chunk("Crimson"), _chunk(" red.", "stop").replace(b"data: ", b"data:")],
    # Ends before any choice finished.
    "cut": [_chunk("Crimson"), _chunk(" red")],
    # An engine's error event mid-stream.
    "error-event": [_chunk("Crimson"), b'data: {"error": {"message": "CUDA out of memory", "code": 500}}\n\n'],
    # A tool call streamed without usage: its arguments count.
    "tool-call": [
        _chunk(tool_calls=[CALL]),
        _chunk(tool_calls=[MORE]),
        _chunk(finish="tool_calls"),
        b"data: [DONE]\n\n",
    ],
}


class _Misbehaving(BaseHTTPRequestHandler):
    """POST /<name>/v1/chat/completions: the scripted behaviour `name`."""

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        name = self.path.split("/")[1]
        if name in STREAMS:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for event in STREAMS[name]:
                self.wfile.write(event)
                self.wfile.flush()
        elif name == "html-503":
            self.send_text(503, "text/html", b"<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>")
        elif name == "detail-429":
            send_json(self, 429, {"detail": "Rate limit reached for this organisation, slow down"})
        elif name == "not-json":
            self.send_text(200, "text/plain", b"Hello from a proxy")

    def send_text(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        send_json(self, 200, {"object": "list", "data": []})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def misbehaving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    names = [*STREAMS, "html-503", "detail-429", "not-json"]
    with serve_http(_Misbehaving) as url:
        models = [
            {"id": n, "price_input": 1000, "price_output": 1000, "backends": [{"url": f"{url}/{n}/v1", "model": "up"}]}
            for n in names
        ]
        path = write_registry(tmp_path_factory.mktemp("misbehaving") / "llamaserve.toml", models)
        with start_server("--config", str(path)) as gateway:
            yield gateway


def raw_stream(server: Server, model: str) -> tuple[list[dict[str, Any] | str], str]:
    return stream_events(server, model, messages=MESSAGES, stream_options={"include_usage": True})


@pytest.mark.parametrize("model", ["garbage", "cut", "error-event"])
def test_a_broken_stream_ends_with_an_error_event_and_charges_what_was_delivered(
    misbehaving: Server, model: str
) -> None:
    events, request_id = raw_stream(misbehaving, model)
    assert streamed_text(events) == "Crimson" + ("" if model == "error-event" else " red")
    assert "[DONE]" not in events
    error = events[-1]["error"]  # type: ignore[index]
    assert error["code"] == "bad_gateway" and error["message"].startswith("the model's upstream engine broke")
    record = usage_record(misbehaving, request_id)
    delivered = streamed_text(events).encode()
    assert record["status"] == "error" and record["estimated"]
    assert record["completion_tokens"] == -(-len(delivered) // 4)  # 4 bytes a token, rounded up: no tokenizer
    assert record["cost_micro"] == (record["prompt_tokens"] + record["completion_tokens"]) * 1000


def test_a_finished_stream_without_done_is_complete(misbehaving: Server) -> None:
    events, request_id = raw_stream(misbehaving, "no-done")
    assert streamed_text(events) == "Crimson red." and events[-1] == "[DONE]"
    [usage] = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]  # the gateway's own
    assert usage["estimated"] is True and usage["completion_tokens"] == 3  # 12 bytes
    assert all(e["model"] == "no-done" for e in events if isinstance(e, dict))
    record = usage_record(misbehaving, request_id)
    assert record["status"] == "ok" and record["completion_tokens"] == 3 and record["estimated"]


def test_tool_call_arguments_are_charged(misbehaving: Server) -> None:
    events, request_id = raw_stream(misbehaving, "tool-call")
    assert events[-1] == "[DONE]"
    record = usage_record(misbehaving, request_id)
    arguments = '{"city": "Paris"}'
    assert record["completion_tokens"] == -(-len(("get_weather" + arguments).encode()) // 4)


def test_error_bodies_that_are_not_openai_shaped(misbehaving: Server) -> None:
    r = post(misbehaving, "/chat/completions", model="html-503", messages=MESSAGES)
    assert r.status_code == 502, r.text
    assert "503 Service Temporarily Unavailable" in r.json()["error"]["message"]
    r = post(misbehaving, "/chat/completions", model="detail-429", messages=MESSAGES)
    assert (
        r.status_code == 429 and r.json()["error"]["message"] == "Rate limit reached for this organisation, slow down"
    )
    r = post(misbehaving, "/chat/completions", model="not-json", messages=MESSAGES)
    assert r.status_code == 502 and r.json()["error"]["code"] == "bad_gateway", r.text
    balance = httpx.get(f"{misbehaving.v1}/account/balance", headers=misbehaving.auth).json()
    assert balance["open_holds"] == 0


# --- Segmind's path form: an unknown model -------------------------------------------------------------------------
def test_a_chat_body_to_an_unknown_model_path_is_model_not_found(misbehaving: Server) -> None:
    body = {"messages": MESSAGES}
    r = httpx.post(f"{misbehaving.v1}/llama-v3p1-405b-instruct", json=body, headers=misbehaving.auth)
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and "no-done" in error["message"]
    assert httpx.post(f"{misbehaving.v1}/llama-v3p1-405b-instruct", json=body).status_code == 401  # key first
    for other in ({"prompt": "hi"}, None):  # no chat body: no such route
        r = httpx.post(f"{misbehaving.v1}/llama-v3p1-405b-instruct", json=other, headers=misbehaving.auth)
        assert r.status_code == 404 and r.json()["error"]["code"] is None, r.text
    assert httpx.post(f"{misbehaving.v1}/models", json=body, headers=misbehaving.auth).status_code == 405


# --- the registry at start -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("backend", "model", "message"),
    [
        ({"ca_flie": "ca.pem"}, {}, "unknown key 'ca_flie'"),
        ({"url": "https://x/v1", "ca_file": "missing.pem"}, {}, "ca_file: no such file"),
        ({"ca_file": "registry.toml"}, {}, "ca_file and verify apply to https:// upstreams only"),
        ({}, {"tokenizer": "registry.toml"}, "tokenizer: "),  # not a GGUF
    ],
)
def test_a_bad_registry_stops_the_start_saying_where(
    tmp_path: Path, backend: dict[str, Any], model: dict[str, Any], message: str
) -> None:
    """`llamaserve serve` as a process of its own, forked from the tests' fork server (tests/forkserver.py) as the
    test servers are: the same command line as `python -m llamaserve.cli`, without the second of imports a fresh
    interpreter spends before it reads the registry."""
    path = tmp_path / "registry.toml"
    write_registry(
        path, [{"id": "m", **model, "backends": [{"url": "http://127.0.0.1:9/v1", "model": "m", **backend}]}]
    )
    log = tmp_path / "cli.log"  # its stdout and stderr
    process = fork_server().start(["serve", "--config", str(path), "--data-dir", str(tmp_path)], dict(os.environ), log)
    try:
        returncode = process.wait(timeout=60)
    finally:
        if process.poll() is None:  # it started serving instead
            process.kill()
            process.wait()
    output = " ".join(log.read_text(errors="replace").split())
    assert returncode == 2 and message in output and "models[0]" in output, output


# --- endpoint paths and probes ---------------------------------------------------------------------------------
class _Recording(BaseHTTPRequestHandler):
    """Answers every POST with a fixed completion and records what it was sent; GET /<name>/... answers at once
    except under /slow-once/ (its first probe outlasts the probe timeout) and /always-slow/."""

    seen: list[tuple[str, str, dict[str, Any]]] = []
    slow_once_done = False

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        type(self).seen.append(("POST", self.path, body))
        choice = {"index": 0, "message": {"role": "assistant", "content": "Red."}, "finish_reason": "stop"}
        usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
        send_json(self, 200, {"id": "x", "object": "chat.completion", "choices": [choice], "usage": usage})

    def do_GET(self) -> None:  # noqa: N802
        type(self).seen.append(("GET", self.path, {}))
        first_slow = self.path.startswith("/slow-once/") and not type(self).slow_once_done
        if first_slow or self.path.startswith("/always-slow/"):
            type(self).slow_once_done = True
            time.sleep(2.5)  # past the probe's 2 s
        try:
            send_json(self, 200, {"object": "list", "data": []})
        except OSError:  # the prober gave up and closed
            pass

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def recording_upstream() -> Iterator[str]:
    with serve_http(_Recording) as url:
        yield url


@pytest.fixture(scope="module", autouse=True)
def recording_gateway(recording_upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A gateway in front of the recording upstream, one for the module's tests of what goes upstream. Autouse:
    it starts before the module's first test, so that the ~6 s its probes need to take out an upstream that
    never answers in time (three timed-out probes, and a probe waits 2 s at least) go by while the other tests
    run, not in test_endpoint_paths_model_field_and_probes."""
    url = recording_upstream
    models = [
        {
            "id": "segmind",
            "backends": [
                {
                    "url": f"{url}/segmind/v1",
                    "model": "llama-v3p1-405b-instruct",
                    "chat_path": "llama-v3p1-405b-instruct",
                    "send_model": False,
                    "health_path": "",
                }
            ],
        },
        {
            "id": "pinged",
            "backends": [{"url": f"{url}/pinged/v1", "model": "m", "health_path": "ping", "health_interval": 0.2}],
        },
        {"id": "slow-once", "backends": [{"url": f"{url}/slow-once/v1", "model": "m", "health_interval": 0.1}]},
        {"id": "always-slow", "backends": [{"url": f"{url}/always-slow/v1", "model": "m", "health_interval": 0.1}]},
        {
            "id": "limited",
            "price_input": 1000,
            "price_output": 1000,
            "backends": [{"url": f"{url}/limited/v1", "model": "m", "health_path": ""}],
        },
        {"id": "clean", "backends": [{"url": f"{url}/clean/v1", "model": "m", "health_path": ""}]},
    ]
    path = write_registry(tmp_path_factory.mktemp("recording") / "llamaserve.toml", models)
    with start_server("--config", str(path)) as gateway:
        yield gateway


def test_endpoint_paths_model_field_and_probes(recording_gateway: Server) -> None:
    """Segmind's path form upstream (its model in the path, none in the body), probes off, a probe path of one's
    own, and a busy upstream whose probe times out once stays in while one that never answers in time goes out."""
    gateway = recording_gateway
    r = post(gateway, "/chat/completions", model="segmind", messages=MESSAGES, max_tokens=5, top_k=3)
    assert r.status_code == 200 and r.json()["model"] == "segmind", r.text
    [(_, path, body)] = [s for s in _Recording.seen if s[0] == "POST" and s[1].startswith("/segmind/")]
    assert path == "/segmind/v1/llama-v3p1-405b-instruct" and "model" not in body
    assert body["messages"] == MESSAGES and body["max_tokens"] == 5 and body["top_k"] == 3

    def healthy(model: str) -> float:
        samples = metric_samples(httpx.get(f"{gateway.base_url}/metrics").text)
        [value] = [s.value for s in samples if s.name == "llamaserve_upstream_healthy" and s.labels["model"] == model]
        return value

    # Out after three timed-out probes (2 s each) from the gateway's start.
    wait_for(lambda: healthy("always-slow") == 0, "always-slow taken out")
    assert healthy("slow-once") == 1 and healthy("segmind") == 1
    gets = [s[1] for s in _Recording.seen if s[0] == "GET"]
    assert not any(p.startswith("/segmind/") for p in gets)  # probes off
    assert "/pinged/v1/ping" in gets and not any(p.startswith("/pinged/v1/models") for p in gets)
    assert post(gateway, "/chat/completions", model="always-slow", messages=MESSAGES).status_code == 200


class _ForwardProxy(BaseHTTPRequestHandler):
    """A plain HTTP forward proxy (absolute-URI requests) that records what it carried."""

    carried: list[str] = []

    def do_POST(self) -> None:  # noqa: N802
        type(self).carried.append(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "proxy-connection", "connection")}
        reply = httpx.post(self.path, content=body, headers=headers, timeout=60, trust_env=False)
        self.send_response(reply.status_code)
        self.send_header("Content-Type", reply.headers.get("content-type", "application/json"))
        self.send_header("Content-Length", str(len(reply.content)))
        self.end_headers()
        self.wfile.write(reply.content)

    do_GET = do_POST

    def log_message(self, *args: Any) -> None:
        pass


def test_http_proxy_and_no_proxy_are_honoured(recording_upstream: str, tmp_path: Path) -> None:
    """HTTP_PROXY carries the hop to an upstream, except to the hosts NO_PROXY names."""
    upstream = recording_upstream
    with serve_http(_ForwardProxy) as proxy:
        port = upstream.rsplit(":", 1)[1]
        models = [
            {"id": "proxied", "backends": [{"url": f"{upstream}/proxied/v1", "model": "m", "health_path": ""}]},
            {
                "id": "direct",
                "backends": [{"url": f"http://localhost:{port}/direct/v1", "model": "m", "health_path": ""}],
            },
        ]
        env = {"HTTP_PROXY": proxy, "NO_PROXY": "localhost"}
        with start_server("--config", str(write_registry(tmp_path / "r.toml", models)), env=env) as gateway:
            for model in ("proxied", "direct"):
                r = post(gateway, "/chat/completions", model=model, messages=MESSAGES)
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Red.", r.text
    assert _ForwardProxy.carried == [f"{upstream}/proxied/v1/chat/completions"]
    assert any(s[1] == "/direct/v1/chat/completions" for s in _Recording.seen)


def test_the_upstream_is_sent_the_limit_the_hold_was_sized_for(recording_gateway: Server) -> None:
    """One completion limit goes upstream, the one the hold was sized for: the default written in when none is
    given, max_completion_tokens as max_tokens (it wins over max_tokens, as on a local model)."""
    gateway = recording_gateway
    for limits, sent in [({}, 512), ({"max_completion_tokens": 7}, 7), ({"max_tokens": 9}, 9)] + [
        ({"max_tokens": 9, "max_completion_tokens": 7}, 7)
    ]:
        r = post(gateway, "/chat/completions", model="limited", messages=MESSAGES, **limits)
        assert r.status_code == 200, r.text
        body = [s[2] for s in _Recording.seen if s[1].startswith("/limited/")][-1]
        assert body["max_tokens"] == sent and "max_completion_tokens" not in body, (limits, body)
    # 100,000 tokens at 1,000 credits a million is 100 credits: more than the 10 the account has.
    r = post(gateway, "/chat/completions", model="limited", messages=MESSAGES, max_completion_tokens=100_000)
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_credits", r.text


def test_fields_accepted_and_ignored_are_not_sent_upstream(recording_gateway: Server) -> None:
    """An engine written by others may refuse OpenAI fields it does not know: what we accept and ignore stays
    here, a `developer` message goes as `system`, stream_options goes only with a stream."""
    history = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": "Hello.", "refusal": None, "annotations": [], "audio": None,
         "function_call": None},
        {"role": "user", "content": "Name a colour."},
    ]  # fmt: skip
    extra = {
        "store": True,
        "metadata": {"a": "b"},
        "service_tier": "auto",
        "verbosity": "low",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
        "stream_options": {"include_usage": True},
    }
    r = post(recording_gateway, "/chat/completions", model="clean", messages=history, **extra)
    assert r.status_code == 200, r.text
    body = [s[2] for s in _Recording.seen if s[1].startswith("/clean/")][-1]
    assert not set(extra) & set(body), body
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ]
