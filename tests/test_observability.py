"""Observability through a real server: one JSON access-log line per request (streams and refusals included)
with the caller, model, backend, tokens and timings, and never a key or a prompt; Prometheus histograms of
every stage and status counters that match what was served; the Grafana dashboard in docs/ only uses metrics
a server exports."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL, Server, start_server

DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana-llamaserve.json"
# Words no log may contain: they are only in the prompts.
SECRET_WORDS = f"quokka-{uuid.uuid4().hex[:8]}"
MESSAGES = [{"role": "user", "content": f"Say hello to the {SECRET_WORDS}."}]
ACCESS_FIELDS = {
    "time",
    "level",
    "logger",
    "message",
    "request_id",
    "method",
    "path",
    "status",
    "latency_ms",
    "account_id",
    "key_prefix",
    "model",
    "backend",
    "prompt_tokens",
    "completion_tokens",
    "ttft_ms",
    "outcome",
    "error",
}


@pytest.fixture(scope="module")
def observed() -> Iterator[Server]:
    with start_server("--parallel", "2") as server:
        yield server


def key_prefix(key: str) -> str:
    return key.removeprefix("ls-").split("_", 1)[0]


def one_line(server: Server, response: httpx.Response) -> dict[str, Any]:
    request_id = response.headers["x-request-id"]
    lines = server.access_log(request_id)
    assert len(lines) == 1, lines
    assert set(lines[0]) == ACCESS_FIELDS, lines[0]
    return lines[0]


def chat(server: Server, **body: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "ignore_eos": True, **body}
    return httpx.post(f"{server.v1}/chat/completions", json=body, headers=server.auth, timeout=60)


def stream(server: Server, max_tokens: int = 6) -> tuple[httpx.Response, dict[str, Any]]:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage: dict[str, Any] = {}
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, headers=server.auth, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    return r, usage


def metrics(server: Server) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)]."""
    text = httpx.get(f"{server.base_url}/metrics").text
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for got, v in samples.get(name, []) if labels.items() <= got.items())


def test_each_request_is_one_line_with_its_fields(observed: Server) -> None:
    ok = chat(observed)
    assert ok.status_code == 200
    line = one_line(observed, ok)
    usage = ok.json()["usage"]
    assert line["logger"] == "llamaserve.access" and line["level"] == "info"
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/chat/completions", 200)
    assert line["key_prefix"] == key_prefix(observed.api_key) and isinstance(line["account_id"], int)
    assert (line["model"], line["backend"], line["outcome"], line["error"]) == (MODEL, "local", "ok", None)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (usage["prompt_tokens"], 6)
    assert 0 < line["ttft_ms"] < line["latency_ms"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])

    streamed, usage = stream(observed)
    line = one_line(observed, streamed)
    assert (line["status"], line["outcome"], line["backend"]) == (200, "ok", "local")
    assert (line["prompt_tokens"], line["completion_tokens"]) == (usage["prompt_tokens"], 6)
    assert 0 < line["ttft_ms"] < line["latency_ms"]

    bad_key = httpx.post(
        f"{observed.v1}/chat/completions", json={"model": MODEL}, headers={"Authorization": "Bearer ls-nobody_x"}
    )
    line = one_line(observed, bad_key)
    assert (line["status"], line["error"], line["key_prefix"], line["account_id"]) == (
        401,
        "invalid_api_key",
        None,
        None,
    )
    assert line["model"] is None and line["ttft_ms"] is None

    invalid = chat(observed, temperature=-1)
    line = one_line(observed, invalid)
    assert (line["status"], line["error"], line["key_prefix"]) == (400, "invalid_value", key_prefix(observed.api_key))


def test_a_client_that_leaves_mid_stream_is_logged_once_as_cancelled(observed: Server) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{observed.v1}/chat/completions", json=body, headers=observed.auth, timeout=60) as r:
        request_id = r.headers["x-request-id"]
        lines = r.iter_lines()
        for _ in range(6):  # the role chunk, then a few tokens
            next(lines)
    [line] = observed.access_log(request_id)
    assert (line["status"], line["outcome"]) == (200, "cancelled")
    assert 0 < line["completion_tokens"] < 2000 and line["ttft_ms"] > 0


def test_logs_hold_no_key_and_no_prompt(observed: Server) -> None:
    assert chat(observed).status_code == 200
    refused = httpx.post(
        f"{observed.v1}/chat/completions",
        json={"model": MODEL, "messages": MESSAGES},
        headers={"Authorization": "Bearer ls-wrongprefx_s3cr3t-never-logged"},
    )
    one_line(observed, refused)
    text = observed.log_text()
    banner_free = text.replace(observed.api_key, "")  # the first-start banner shows the key once, by design
    assert text.count(observed.api_key) == 1
    assert observed.api_key.split("_", 1)[1] not in banner_free
    assert "s3cr3t-never-logged" not in text and SECRET_WORDS not in text
    logged = "\n".join(line for line in text.splitlines() if line.startswith("{"))  # the banner aside
    assert "llamaserve.access" in logged and "bearer" not in logged.lower()


def test_metrics_count_what_was_served(observed: Server) -> None:
    before = metrics(observed)
    route = {"route": "/v1/chat/completions"}
    assert chat(observed).status_code == 200
    stream(observed)
    assert chat(observed, temperature=-1).status_code == 400
    refused = httpx.post(f"{observed.v1}/chat/completions", json={}, headers={"Authorization": "Bearer ls-x_y"})
    assert refused.status_code == 401
    observed.access_log(refused.headers["x-request-id"])  # counted when its response has ended
    after = metrics(observed)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("llamaserve_http_responses_total", **route, method="POST", status="200") == 2
    assert delta("llamaserve_http_responses_total", **route, status="400") == 1
    assert delta("llamaserve_http_responses_total", **route, status="401") == 1
    assert delta("llamaserve_http_errors_total", status="401", code="invalid_api_key") == 1
    assert delta("llamaserve_http_errors_total", status="400", code="invalid_value") == 1
    assert delta("llamaserve_http_request_duration_seconds_count", **route) == 4
    local = {"model": MODEL, "backend": "local"}
    assert delta("llamaserve_time_to_first_token_seconds_count", **local) == 2
    assert delta("llamaserve_request_completion_tokens_sum", **local) == 12
    assert delta("llamaserve_generations_total", **local, outcome="ok") == 2
    engine = {"model": MODEL}
    assert delta("llamaserve_engine_queue_wait_seconds_count", **engine) == 2
    assert delta("llamaserve_engine_time_to_first_token_seconds_count", **engine) == 2
    assert delta("llamaserve_engine_inter_token_latency_seconds_count", **engine) == 10  # 5 gaps in each of 2
    assert delta("llamaserve_engine_batch_sequences_count", **engine) >= 6
    assert delta("llamaserve_engine_batch_tokens_sum", **engine) >= 12
    assert delta("llamaserve_engine_generated_tokens_total", **engine) == 12  # the engine's own counters stay
    assert value(after, "llamaserve_engine_kv_cells_capacity", **engine) > value(
        after, "llamaserve_engine_kv_cells_used"
    )
    assert value(after, "llamaserve_engine_kv_cells_used", **engine) > 0
    assert value(after, "llamaserve_holds_open") == 0 and value(after, "llamaserve_engine_running") == 0


def dashboard_metrics() -> set[str]:
    """The metric names the dashboard's PromQL expressions read."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    return {name for expr in exprs for name in re.findall(r"\b(?:llamaserve|process)_[a-z0-9_]+", expr)}


def exported(server: Server) -> set[str]:
    return set(metrics(server))


def test_the_dashboard_reads_only_exported_metrics(observed: Server) -> None:
    """Together with test_gateway's check of the upstream panels: every name the dashboard uses on a local
    model's metrics is one a real server exports after serving requests."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39 and dashboard["title"]
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in dashboard["templating"]["list"])
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    assert chat(observed).status_code == 200
    local = {n for n in dashboard_metrics() if not n.startswith("llamaserve_upstream_")}
    missing = local - exported(observed)
    assert not missing, missing


def test_log_format_text_and_level(tmp_path: Path) -> None:
    with start_server("--parallel", "1", "--log-format", "text", "--log-level", "warning") as quiet:
        r = chat(quiet)
        assert r.status_code == 200
        time.sleep(0.5)
        assert "llamaserve.access" not in quiet.log_text()  # info lines are below the level
    with start_server("--parallel", "1", "--log-format", "text") as text:
        r = chat(text)
        deadline = time.monotonic() + 10
        while r.headers["x-request-id"] not in text.log_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        [line] = [ln for ln in text.log_text().splitlines() if r.headers["x-request-id"] in ln]
        assert " INFO llamaserve.access request " in line and ' path="/v1/chat/completions" status=200 ' in line
