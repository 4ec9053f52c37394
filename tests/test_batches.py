"""OpenAI's Files and Batch APIs through the official SDK, on a real server and the embedded model: the lines run
as live requests would, at the batch price, each answered once and charged once."""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MODEL, Server, free_port, postgres_database, start_server, wait_for

ADMIN = "batch-admin-secret"
ASK = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with start_server("--admin-key", ADMIN, "--batch-concurrency", "2") as s:
        yield s


def chat_line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": ASK, "max_tokens": 6, "temperature": 0, **body},
    }


def upload(client: openai.OpenAI, lines: list[dict[str, Any]]) -> str:
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return client.files.create(file=("input.jsonl", io.BytesIO(content)), purpose="batch").id


def run_batch(client: openai.OpenAI, lines: list[dict[str, Any]], **kw: Any) -> Any:
    return client.batches.create(
        input_file_id=upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h", **kw
    )


def wait_ended(client: openai.OpenAI, batch_id: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, f"batch still {batch.status} after {timeout} s"
        time.sleep(0.1)
    return batch


def lines_of(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    """A batch output or error file's lines by custom_id (each custom_id once)."""
    if file_id is None:
        return {}
    lines = [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a custom_id answered twice"
    return by_id


def usage_costs(server: Server, api_key: str | None = None) -> dict[str, dict[str, Any]]:
    with server.http(api_key) as http:
        return {u["request_id"]: u for u in http.get("/v1/account/usage").json()["data"]}


def test_a_batch_runs_to_completion_at_half_price(server: Server) -> None:
    client = server.openai()
    balance_before = client.get("/account/balance", cast_to=httpx.Response).json()["balance_micro"]
    batch = run_batch(client, [chat_line(f"q{i}", seed=i) for i in range(5)], metadata={"job": "colours"})
    assert batch.status == "in_progress" and batch.metadata == {"job": "colours"}
    assert batch.request_counts is not None and batch.request_counts.total == 5
    done = wait_ended(client, batch.id)
    assert done.status == "completed" and done.completed_at and done.error_file_id is None
    assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (5, 0)
    answers = lines_of(client, done.output_file_id)
    assert sorted(answers) == [f"q{i}" for i in range(5)]
    usage = usage_costs(server)
    charged = 0
    for line in answers.values():
        response = line["response"]
        assert response["status_code"] == 200 and line["error"] is None
        assert response["body"]["object"] == "chat.completion" and response["body"]["choices"][0]["message"]
        # Charged once, at half the price (0.05 / 0.10 credits per million tokens), in the usage records.
        record = usage[response["request_id"]]
        tokens = response["body"]["usage"]
        assert (record["prompt_tokens"], record["completion_tokens"]) == (
            tokens["prompt_tokens"],
            tokens["completion_tokens"],
        )
        expected = math.ceil((tokens["prompt_tokens"] * 50_000 + tokens["completion_tokens"] * 100_000) / 1e6)
        assert record["cost_micro"] == expected
        charged += expected
    balance_after = client.get("/account/balance", cast_to=httpx.Response).json()
    assert balance_after["open_holds"] == 0
    assert balance_before - balance_after["balance_micro"] == charged
    assert float(done.model_extra["cost"]) * 1e6 == pytest.approx(charged)  # type: ignore[index]
    # A line answers as the same request sent live does (greedy: the same text).
    live = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, temperature=0, seed=0)  # type: ignore[arg-type]
    assert answers["q0"]["response"]["body"]["choices"][0]["message"]["content"] == live.choices[0].message.content


def test_a_bad_line_fails_alone_with_its_400(server: Server) -> None:
    client = server.openai()
    lines = [
        chat_line("good"),
        chat_line("hot", temperature="hot"),
        chat_line("streams", stream=True),
        {**chat_line("elsewhere"), "url": "/v1/embeddings"},
        chat_line("no-model", model="no-such-model"),
    ]
    done = wait_ended(client, run_batch(client, lines).id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 1, 4)
    assert list(lines_of(client, done.output_file_id)) == ["good"]
    errors = lines_of(client, done.error_file_id)
    assert sorted(errors) == ["elsewhere", "hot", "no-model", "streams"]
    status_and_param = {
        custom_id: (line["response"]["status_code"], line["response"]["body"]["error"]["param"])
        for custom_id, line in errors.items()
    }
    assert status_and_param == {
        "hot": (400, "temperature"),
        "streams": (400, "stream"),
        "elsewhere": (400, "url"),
        "no-model": (404, "model"),
    }


def test_files_are_listed_read_and_deleted(server: Server) -> None:
    client = server.openai()
    file_id = upload(client, [chat_line("a")])
    assert client.files.retrieve(file_id).purpose == "batch"
    assert file_id in [f.id for f in client.files.list()]
    assert json.loads(client.files.content(file_id).text)["custom_id"] == "a"
    assert client.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "no requests"), (b'{"custom_id": "a"}\nnot json\n', "line 2"), (b"[1, 2]\n", "line 1")],
)
def test_a_file_that_is_no_batch_file_is_refused_at_upload(server: Server, content: bytes, message: str) -> None:
    with pytest.raises(openai.BadRequestError, match=message):
        server.openai().files.create(file=("bad.jsonl", io.BytesIO(content)), purpose="batch")


def test_a_file_whose_lines_cannot_be_told_apart_is_refused_at_creation(server: Server) -> None:
    client = server.openai()
    for lines in ([chat_line("same"), chat_line("same")], [{**chat_line("x"), "custom_id": 7}]):
        with pytest.raises(openai.BadRequestError) as refused:
            run_batch(client, lines)
        assert refused.value.body["param"] == "input_file_id"  # type: ignore[index]


def test_another_account_cannot_see_download_or_cancel(server: Server) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    account = {"name": "batch-other", "plan": "unlimited", "credits": "1"}
    assert httpx.post(f"{server.base_url}/admin/accounts", json=account, headers=admin).status_code == 201
    key = httpx.post(f"{server.base_url}/admin/accounts/batch-other/keys", json={}, headers=admin).json()["key"]
    mine = server.openai()
    batch = run_batch(mine, [chat_line("private")])
    other = server.openai(key)
    for attempt in (
        lambda: other.batches.retrieve(batch.id),
        lambda: other.batches.cancel(batch.id),
        lambda: other.files.retrieve(batch.input_file_id),
        lambda: other.files.content(batch.input_file_id),
        lambda: other.files.delete(batch.input_file_id),
        lambda: other.batches.create(
            input_file_id=batch.input_file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert batch.id not in [b.id for b in other.batches.list()]
    assert wait_ended(mine, batch.id).status == "completed"


def test_cancel_answers_every_line_once(server: Server) -> None:
    client = server.openai()
    batch = run_batch(client, [chat_line(f"c{i}", max_tokens=32) for i in range(12)])
    wait_for_progress = time.monotonic() + 60
    while client.batches.retrieve(batch.id).request_counts.completed == 0:  # type: ignore[union-attr]
        assert time.monotonic() < wait_for_progress
        time.sleep(0.05)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_ended(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    answered, refused = lines_of(client, done.output_file_id), lines_of(client, done.error_file_id)
    assert sorted([*answered, *refused]) == sorted(f"c{i}" for i in range(12))
    assert 1 <= len(answered) < 12
    assert {line["error"]["code"] for line in refused.values()} == {"batch_cancelled"}
    assert client.batches.cancel(batch.id).status == "cancelled"  # an ended batch stays as it is
    assert batch.id in [b.id for b in client.batches.list(limit=100)]


def test_a_batch_past_its_window_expires_with_the_rest_answered_batch_expired() -> None:
    with start_server("--batch-window", "1", "--batch-concurrency", "1") as server:
        client = server.openai()
        batch = run_batch(client, [chat_line(f"e{i}", max_tokens=48) for i in range(20)])
        done = wait_ended(client, batch.id)
        assert done.status == "expired" and done.expired_at
        answered, refused = lines_of(client, done.output_file_id), lines_of(client, done.error_file_id)
        assert sorted([*answered, *refused]) == sorted(f"e{i}" for i in range(20))
        assert refused and {line["error"]["code"] for line in refused.values()} == {"batch_expired"}


def test_when_credits_run_out_the_rest_fail_insufficient_credits() -> None:
    # 20 micro-credits: a line holds about 8 at the batch price (prompt + max_tokens), so the first few run.
    with start_server("--starter-credits", "0.00002", "--batch-concurrency", "1") as server:
        client = server.openai()
        done = wait_ended(client, run_batch(client, [chat_line(f"m{i}", max_tokens=64) for i in range(8)]).id)
        assert done.status == "completed"
        answered, refused = lines_of(client, done.output_file_id), lines_of(client, done.error_file_id)
        assert answered and refused and len(answered) + len(refused) == 8
        assert {line["response"]["body"]["error"]["code"] for line in refused.values()} == {"insufficient_credits"}
        balance = client.get("/account/balance", cast_to=httpx.Response).json()
        assert balance["open_holds"] == 0 and 0 <= balance["balance_micro"] < 20


def test_a_batch_past_the_accounts_queued_tokens_fails_validation() -> None:
    # Each line may use about 60 tokens (its body's bytes / 4 + max_tokens 6): 10 of them fit 1000, 30 do not.
    with start_server("--batch-queued-tokens", "1000", "--batch-concurrency", "1") as server:
        client = server.openai()
        refused = run_batch(client, [chat_line(f"t{i}") for i in range(30)])
        assert refused.status == "failed" and refused.failed_at and refused.errors is not None
        assert [e.code for e in refused.errors.data or []] == ["token_limit_exceeded"]
        assert refused.output_file_id is None and refused.error_file_id is None
        assert wait_ended(client, run_batch(client, [chat_line(f"f{i}") for i in range(10)]).id).status == "completed"


def test_a_models_own_batch_discount_prices_its_lines(tmp_path: Path) -> None:
    from llamaserve.config import resolve_model

    registry = tmp_path / "models.toml"
    registry.write_text(
        f'[[models]]\nid = "{MODEL}"\nprice_input = 2\nprice_output = 4\nbatch_discount = 0.75\n'
        f'[[models.backends]]\ntype = "local"\npath = "{resolve_model(None)[0]}"\n'
    )
    with start_server("--config", str(registry), "--parallel", "2") as server:
        client = server.openai()
        done = wait_ended(client, run_batch(client, [chat_line("cheap")]).id)
        [answer] = lines_of(client, done.output_file_id).values()
        tokens = answer["response"]["body"]["usage"]
        record = usage_costs(server)[answer["response"]["request_id"]]
        # A quarter of 2 and 4 credits per million tokens: 500,000 and 1,000,000 micro-credits per million.
        expected = math.ceil((tokens["prompt_tokens"] * 500_000 + tokens["completion_tokens"] * 1_000_000) / 1e6)
        assert record["cost_micro"] == expected


# --- durable and shared ------------------------------------------------------------------------------------------
def balance(server: Server, api_key: str | None = None) -> dict[str, Any]:
    with server.http(api_key) as http:
        return http.get("/v1/account/balance").json()


def assert_each_line_answered_and_charged_once(
    server: Server, batch: Any, custom_ids: list[str], balance_before: int, api_key: str | None = None
) -> None:
    """Every custom_id in the output once, one usage record for each answer and none other, every hold released
    (those of a killed gateway by the sweep, uncharged) and the balance down by exactly the records' costs."""
    client = server.openai(api_key)
    answered = lines_of(client, batch.output_file_id)
    assert sorted(answered) == sorted(custom_ids) and batch.error_file_id is None
    records = [u for u in usage_costs(server, api_key).values() if u["request_id"].startswith("batch_req_")]
    assert sorted(u["request_id"] for u in records) == sorted(a["response"]["request_id"] for a in answered.values())
    wait_for(lambda: balance(server, api_key)["open_holds"] == 0, "the killed gateway's holds released", 40)
    assert balance_before - balance(server, api_key)["balance_micro"] == sum(u["cost_micro"] for u in records)


def wait_completed_lines(client: openai.OpenAI, batch_id: str, at_least: int) -> None:
    wait_for(
        lambda: client.batches.retrieve(batch_id).request_counts.completed >= at_least,  # type: ignore[union-attr]
        f"{at_least} lines done",
        60,
    )


@pytest.mark.slow
def test_a_gateway_killed_mid_batch_answers_and_charges_every_line_once_after_restart(tmp_path: Path) -> None:
    port, custom_ids = free_port(), [f"k{i}" for i in range(12)]
    with start_server("--batch-concurrency", "2", data_dir=tmp_path, port=port) as server:
        client = server.openai()
        before = balance(server)["balance_micro"]
        batch = run_batch(client, [chat_line(c, max_tokens=24) for c in custom_ids])
        wait_completed_lines(client, batch.id, 2)
        server.process.kill()
        server.process.wait()
    with start_server("--batch-concurrency", "2", data_dir=tmp_path, port=port) as server:
        # The lines the killed gateway was running go back to pending once it has missed its beats (10 s).
        done = wait_ended(server.openai(), batch.id, timeout=90)
        assert done.status == "completed"
        assert_each_line_answered_and_charged_once(server, done, custom_ids, before)


@pytest.mark.slow
def test_two_replicas_on_postgres_share_a_batch_and_finish_it_when_one_is_killed() -> None:
    custom_ids = [f"r{i}" for i in range(16)]
    with postgres_database() as url, start_server("--database-url", url, "--batch-concurrency", "1") as first:
        key = first.api_key
        with start_server("--database-url", url, "--batch-concurrency", "1") as second:
            client = first.openai()
            before = balance(first)["balance_micro"]
            batch = run_batch(client, [chat_line(c, max_tokens=24) for c in custom_ids])
            wait_for(lambda: len(line_owners(url, batch.id)) == 2, "both replicas running lines", 60)
            wait_completed_lines(client, batch.id, 4)
            second.process.kill()
            second.process.wait()
        done = wait_ended(client, batch.id, timeout=90)
        assert done.status == "completed"
        assert_each_line_answered_and_charged_once(first, done, custom_ids, before, key)


def line_owners(url: str, batch_id: str) -> set[str]:
    """The gateways that ran (or run) a batch's lines."""
    import asyncio

    import asyncpg
    from sqlalchemy.engine import make_url

    async def owners() -> set[str]:
        conn = await asyncpg.connect(make_url(url).set(drivername="postgresql").render_as_string(False))
        try:
            rows = await conn.fetch("SELECT DISTINCT owner FROM batch_lines WHERE batch_id = $1", batch_id)
        finally:
            await conn.close()
        return {row["owner"] for row in rows if row["owner"]}

    return asyncio.run(owners())
