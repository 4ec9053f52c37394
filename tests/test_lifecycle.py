"""Graceful operations through real servers: SIGTERM drains (503 for newcomers, in-flight requests finish, every
hold settled), readiness versus liveness, body size and body time limits, and the per-account concurrency cap."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, Server, free_port, start_server, wait_for

MESSAGES = [{"role": "user", "content": "Count from one to one hundred."}]


def stream_in_thread(server: Server, max_tokens: int, out: dict[str, Any], key: str | None = None) -> threading.Thread:
    """A streaming chat request in a thread; `out` gets its text, finish reason, usage, and `first` is set once
    the first chunk arrived (and `error_event` an error event, if one came)."""
    first = threading.Event()
    out["first"] = first

    def run() -> None:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        body["stream_options"] = {"include_usage": True}
        text, headers = "", {"Authorization": f"Bearer {key or server.api_key}"}
        try:
            with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, headers=headers, timeout=60) as r:
                out["status"] = r.status_code
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    first.set()
                    if "error" in chunk:
                        out["error_event"] = chunk["error"]
                    for choice in chunk.get("choices") or []:
                        text += choice["delta"].get("content") or ""
                        out["finish"] = choice.get("finish_reason") or out.get("finish")
                    out["usage"] = chunk.get("usage") or out.get("usage")
        except httpx.HTTPError as e:
            out["error"] = repr(e)
        finally:
            out["text"] = text
            first.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def balance(server: Server) -> dict[str, Any]:
    return httpx.get(f"{server.v1}/account/balance", headers=server.auth).json()


def chat(server: Server, **body: Any) -> httpx.Response:
    payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **body}
    return httpx.post(f"{server.v1}/chat/completions", json=payload, headers=server.auth, timeout=60)


def error_code(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return str(error["code"])


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return tmp_path


def test_sigterm_drains_then_stops_with_every_hold_settled(data_dir: Path) -> None:
    port = free_port()
    with start_server("--drain-timeout", "60", data_dir=data_dir, port=port) as server:
        assert chat(server).status_code == 200  # warm
        out: dict[str, Any] = {}
        thread = stream_in_thread(server, 120, out)  # still running after the checks below
        assert out["first"].wait(60)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the signal is handled on the server's next loop turn
        refused = chat(server)
        assert error_code(refused, 503) == "shutting_down" and refused.headers["retry-after"]
        [logged] = server.access_log(refused.headers["x-request-id"])  # refused before any route: logged too
        assert (logged["status"], logged["error"]) == (503, "shutting_down")
        ready = httpx.get(f"{server.base_url}/ready")
        assert ready.status_code == 503 and ready.json()["checks"]["accepting"] is False
        assert httpx.get(f"{server.base_url}/health").status_code == 200  # alive, only not taking work
        thread.join(60)
        assert out["status"] == 200 and out["finish"] == "length" and out["usage"]["completion_tokens"] == 120, out
        server.process.wait(30)  # stops on its own once the stream ended
    with start_server(data_dir=data_dir) as server:
        assert balance(server)["open_holds"] == 0


def test_drain_timeout_ends_long_requests_and_settles_them(data_dir: Path) -> None:
    with start_server("--drain-timeout", "1", data_dir=data_dir) as server:
        before = balance(server)["balance_micro"]
        out: dict[str, Any] = {}
        thread = stream_in_thread(server, 2000, out)
        with ThreadPoolExecutor(1) as pool:
            unstreamed = pool.submit(chat, server, max_tokens=2000, ignore_eos=True)
            assert out["first"].wait(60)
            wait_for(lambda: unstreamed.done() or server.engine_stats()["running"] == 2, "both generating")
            assert not unstreamed.done(), unstreamed.result().text
            sent = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            thread.join(60)
            assert error_code(unstreamed.result(), 503) == "shutting_down"
        assert not thread.is_alive() and out.get("finish") != "length"  # cut short, not run to its end
        assert out["error_event"]["code"] == "shutting_down" and "error" not in out  # ended, not broken off
        server.process.wait(30)
        assert time.monotonic() - sent < 5  # the drain's 1 s, not uvicorn's own 5 s wait on top
        assert not [line for line in server.log_lines() if line["level"] == "error"]  # ended, not cancelled
    with start_server(data_dir=data_dir) as server:
        after = balance(server)
        assert after["open_holds"] == 0 and after["balance_micro"] < before  # charged for what it delivered


def test_ready_reports_each_dependency() -> None:
    with start_server() as server:
        r = httpx.get(f"{server.base_url}/ready")
        assert r.status_code == 200, r.text
        assert r.json()["checks"] == {"accepting": True, "engine": True, "database": True}


def test_ready_is_503_while_an_upstream_is_down(tmp_path: Path) -> None:
    config = tmp_path / "llamaserve.toml"
    dead = f"http://127.0.0.1:{free_port()}/v1"
    config.write_text(f'[[models]]\nid = "far"\n[[models.backends]]\ntype = "upstream"\nurl = "{dead}"\nmodel = "x"\n')
    with start_server("--config", str(config)) as server:
        deadline = time.monotonic() + 10
        while (r := httpx.get(f"{server.base_url}/ready")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)  # the first health probe has to run
        assert r.status_code == 503 and r.json()["checks"]["upstream:far"] is False


@pytest.fixture(scope="module")
def limited() -> Iterator[Server]:
    limits = ("--max-body-mb", "1", "--body-timeout", "1", "--max-concurrent-per-account", "2")
    with start_server(*limits) as server:
        yield server


def test_oversized_body_is_413(limited: Server) -> None:
    big = "x" * (1024 * 1024 + 10)
    r = chat(limited, messages=[{"role": "user", "content": big}])
    assert error_code(r, 413) == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield json.dumps({"model": MODEL, "messages": [{"role": "user", "content": big}]}).encode()

    r = httpx.post(f"{limited.v1}/chat/completions", content=chunks(), headers=limited.auth, timeout=30)
    assert error_code(r, 413) == "request_too_large"
    [logged] = limited.access_log(r.headers["x-request-id"])
    assert (logged["status"], logged["error"], logged["path"]) == (413, "request_too_large", "/v1/chat/completions")
    assert not [line for line in limited.log_lines() if line["level"] == "error"]  # no second answer attempted
    assert chat(limited).status_code == 200  # the server is fine


def test_slow_body_is_408(limited: Server) -> None:
    host, port = limited.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {limited.api_key}\r\n"
            'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model":'
        )
        s.sendall(head.encode())
        started = time.monotonic()
        reply = ""
        while chunk := s.recv(65536).decode():  # until the server closes: headers and body may come apart
            reply += chunk
        assert reply.startswith("HTTP/1.1 408"), reply
        assert '"code":"timeout"' in reply.replace(" ", "") and time.monotonic() - started < 5


def test_concurrent_requests_per_account_are_capped(limited: Server) -> None:
    outs: list[dict[str, Any]] = [{}, {}]
    threads = [stream_in_thread(limited, 64, out) for out in outs]
    for out in outs:
        assert out["first"].wait(60)
    third = chat(limited)
    assert error_code(third, 429) == "too_many_concurrent_requests"
    for thread in threads:
        thread.join(60)
    assert all(out["status"] == 200 for out in outs)
    # The slots free when the server has closed the streams, a moment after their last bytes reached us.
    deadline = time.monotonic() + 5
    while (r := chat(limited)).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.status_code == 200, r.text


def test_cors_is_off_unless_an_origin_is_configured() -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with start_server() as server:
        r = httpx.options(f"{server.v1}/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    with start_server("--cors-origin", "https://app.example") as server:
        r = httpx.options(f"{server.v1}/chat/completions", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(f"{server.v1}/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
