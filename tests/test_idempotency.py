"""`Idempotency-Key`: a retried request is served and billed once, on any replica; a client that left mid-way
gets the whole answer on its retry."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, Server, postgres_database, start_server, wait_for

ADMIN = "idempotency-admin"
ASK = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about rivers."}], "max_tokens": 24}


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with start_server("--admin-key", ADMIN) as s:
        yield s


def post(server: Server, key: str | bytes | None, body: dict[str, Any], api_key: str | None = None) -> httpx.Response:
    headers: dict[str, str | bytes] = {"Authorization": f"Bearer {api_key or server.api_key}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return httpx.post(f"{server.v1}/chat/completions", json=body, headers=headers, timeout=120)


def books(server: Server, api_key: str | None = None) -> tuple[int, list[dict[str, Any]]]:
    """The balance once nothing is held, and the usage records."""
    with server.http(api_key) as http:
        wait_for(lambda: http.get("/v1/account/balance").json()["open_holds"] == 0, "holds settled", 30)
        return http.get("/v1/account/balance").json()["balance_micro"], http.get("/v1/account/usage").json()["data"]


def assert_retry_is_served_once(first_server: Server, retry_server: Server, key: str) -> None:
    before, records = books(first_server)
    first = post(first_server, key, ASK)
    retry = post(retry_server, key, ASK)
    assert first.status_code == retry.status_code == 200
    assert retry.json() == first.json() and retry.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    after, records_after = books(first_server)
    assert len(records_after) == len(records) + 1
    assert before - after == records_after[0]["cost_micro"] > 0


def test_a_retry_gets_the_first_answer_and_is_not_charged(server: Server) -> None:
    assert_retry_is_served_once(server, server, "retry-1")


def test_the_same_body_in_another_layout_is_the_same_request(server: Server) -> None:
    first = post(server, "layout", ASK)
    headers = {"Authorization": f"Bearer {server.api_key}", "Idempotency-Key": "layout"}
    relaid = json.dumps(dict(reversed(list(ASK.items()))), indent=2)
    retry = httpx.post(
        f"{server.v1}/chat/completions", content=relaid, headers=headers | {"Content-Type": "application/json"}
    )
    assert retry.json() == first.json() and retry.headers["idempotent-replayed"] == "true"


def test_the_same_key_with_another_body_is_a_400_naming_the_header(server: Server) -> None:
    assert post(server, "reused", ASK).status_code == 200
    r = post(server, "reused", {**ASK, "max_tokens": 5})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "Idempotency-Key" and r.json()["error"]["code"] == "idempotency_key_reused"


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "ключ".encode()])
def test_a_key_that_is_not_1_to_255_printable_ascii_is_a_400(server: Server, key: str | bytes) -> None:
    r = post(server, key, ASK)
    assert r.status_code == 400 and r.json()["error"]["param"] == "Idempotency-Key"


def test_a_refused_request_keeps_nothing_so_a_corrected_retry_runs(server: Server) -> None:
    refused = post(server, "corrected", {**ASK, "temperature": 9})
    assert refused.status_code == 400
    assert post(server, "corrected", ASK).status_code == 200


def test_another_accounts_same_key_is_its_own(server: Server) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    account = {"name": "idem-other", "plan": "unlimited", "credits": "1"}
    assert httpx.post(f"{server.base_url}/admin/accounts", json=account, headers=admin).status_code == 201
    other = httpx.post(f"{server.base_url}/admin/accounts/idem-other/keys", json={}, headers=admin).json()["key"]
    mine = post(server, "shared-name", ASK)
    theirs = post(server, "shared-name", {**ASK, "max_tokens": 3}, api_key=other)  # another body: no 400
    assert theirs.status_code == 200 and "idempotent-replayed" not in theirs.headers
    assert theirs.json()["id"] != mine.json()["id"]


def test_twenty_at_once_with_one_key_run_once_and_answer_alike(server: Server) -> None:
    before, records = books(server)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: post(server, "twenty", ASK), range(20)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum("idempotent-replayed" in a.headers for a in answers) == 19
    after, records_after = books(server)
    assert len(records_after) == len(records) + 1 and before - after == records_after[0]["cost_micro"]


def test_a_stream_is_replayed_as_the_same_stream(server: Server) -> None:
    body = {**ASK, "stream": True, "stream_options": {"include_usage": True}}
    first = post(server, "stream", body)
    retry = post(server, "stream", body)
    assert first.status_code == retry.status_code == 200
    assert retry.text == first.text and retry.headers["idempotent-replayed"] == "true"
    assert retry.headers["content-type"].startswith("text/event-stream")
    assert '"usage"' in retry.text and retry.text.rstrip().endswith("data: [DONE]")


def test_a_client_that_left_mid_stream_gets_the_whole_answer_on_its_retry(server: Server) -> None:
    body = {
        **ASK,
        "max_tokens": 64,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {"2": -100},
    }
    before, records = books(server)
    headers = {"Authorization": f"Bearer {server.api_key}", "Idempotency-Key": "left"}
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, headers=headers, timeout=60) as r:
        for line in r.iter_lines():
            if '"content"' in line:
                break  # the first token: the client leaves
    retry = post(server, "left", body)
    assert retry.status_code == 200 and retry.headers["idempotent-replayed"] == "true"
    usage = [json.loads(line[6:]) for line in retry.text.splitlines() if line.startswith("data: {")][-1]["usage"]
    assert usage["completion_tokens"] == 64  # the whole generation ran, though its client left after one token
    after, records_after = books(server)
    assert len(records_after) == len(records) + 1
    assert records_after[0]["completion_tokens"] == 64 and before - after == records_after[0]["cost_micro"]


def test_a_retry_on_another_replica_is_served_from_the_first() -> None:
    with postgres_database() as url, start_server("--database-url", url) as first:
        with start_server("--database-url", url) as second:
            second.api_key = first.api_key
            assert_retry_is_served_once(first, second, "replica")


def test_a_retried_upload_and_batch_creation_make_one_file_and_one_batch(server: Server) -> None:
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {**ASK, "max_tokens": 2}}
    headers = {"Authorization": f"Bearer {server.api_key}", "Idempotency-Key": "upload"}
    files = {"file": ("in.jsonl", json.dumps(line).encode())}
    uploads = [
        httpx.post(f"{server.v1}/files", files=files, data={"purpose": "batch"}, headers=headers) for _ in range(2)
    ]
    assert uploads[0].json() == uploads[1].json() and uploads[1].headers["idempotent-replayed"] == "true"
    other = {"file": ("in.jsonl", json.dumps({**line, "custom_id": "b"}).encode())}
    reused = httpx.post(f"{server.v1}/files", files=other, data={"purpose": "batch"}, headers=headers)
    assert reused.status_code == 400 and reused.json()["error"]["param"] == "Idempotency-Key"
    body = {"input_file_id": uploads[0].json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    headers["Idempotency-Key"] = "batch"
    batches = [httpx.post(f"{server.v1}/batches", json=body, headers=headers) for _ in range(2)]
    assert batches[0].json()["id"] == batches[1].json()["id"]
    with server.http() as http:
        listed = [b["id"] for b in http.get("/v1/batches").json()["data"]]
    assert listed.count(batches[0].json()["id"]) == 1 and len(listed) == 1
