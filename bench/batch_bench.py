"""What a running batch costs live traffic: live streaming clients on one `llamaserve serve`, first alone, then
while a batch of LINES requests runs on the same engine. Prints the live clients' time to first token and
tokens/s with and without the batch (the ratio is the batch's cost), the batch's own tokens/s with no live
traffic, and how many of its lines ended while the live clients ran.

    .venv/bin/python bench/batch_bench.py                     # 1 and 4 live clients, a 500-line batch
    .venv/bin/python bench/batch_bench.py --clients 1 --lines 100 --batch-concurrency 4

The rule measured: a gateway runs at most --batch-concurrency lines at once (default: half of --parallel), so live
requests keep the other slots, and the engine gives batch lines a step only when no live request has run or
waited for 50 ms: live traffic pays at most the step in flight when it arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_bench import percentile, process  # noqa: E402
from vs_llama_server import eog_tokens  # noqa: E402

from llamaserve.config import resolve_model  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
NO_END = {str(t): -100 for t in eog_tokens(resolve_model(None)[0])}  # no request ends before its max_tokens
QUESTIONS = ["Name a colour.", "Say hello.", "Count to five.", "Name a fruit.", "What is rain?"]


async def live_request(client: httpx.AsyncClient, i: int, tokens: int) -> tuple[float, int, float]:
    """One streamed chat: (time to first token, tokens, seconds)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": NO_END,  # every request generates `tokens`
    }
    started = time.perf_counter()
    first, count = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - started
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
    return first or 0.0, count, time.perf_counter() - started


async def live(base: str, key: str, clients: int, requests: int, tokens: int) -> dict[str, float]:
    """`clients` streaming clients, `requests` each, back to back."""
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:

        async def one_client(c: int) -> list[tuple[float, int, float]]:
            return [await live_request(client, c * requests + i, tokens) for i in range(requests)]

        started = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(one_client(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - started
    ttfts = [r[0] * 1000 for r in results]
    return {
        "ttft_p50": percentile(ttfts, 0.5),
        "ttft_p99": percentile(ttfts, 0.99),
        "tok_s": sum(r[1] for r in results) / wall,
    }


def start_batch(base: str, key: str, lines: int, tokens: int) -> tuple[openai.OpenAI, str]:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    content = "".join(
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}],
                    "max_tokens": tokens,
                    "logit_bias": NO_END,
                },
            }
        )
        + "\n"
        for i in range(lines)
    ).encode()
    file = client.files.create(file=("batch.jsonl", io.BytesIO(content)), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    return client, batch.id


def batch_tokens(client: openai.OpenAI, batch_id: str) -> tuple[int, int]:
    """(lines done, completion tokens of those answered) so far, from the usage records."""
    batch = client.batches.retrieve(batch_id)
    usage = client.get("/account/usage?limit=10000", cast_to=httpx.Response).json()["data"]
    tokens = sum(u["completion_tokens"] for u in usage if u["request_id"].startswith("batch_req_"))
    counts = batch.request_counts
    return (counts.completed + counts.failed if counts else 0), tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,4", help="comma-separated live concurrencies")
    p.add_argument("--requests", type=int, default=8, help="live requests per client in each measurement")
    p.add_argument("--tokens", type=int, default=32, help="output tokens of every request, live and batch")
    p.add_argument("--lines", type=int, default=500, help="requests in the batch")
    p.add_argument("--parallel", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-concurrency", type=int, default=None, help="default: the server's (half of --parallel)")
    p.add_argument("--batch-seconds", type=float, default=5.0, help="how long the batch runs alone, measured")
    args = p.parse_args()
    options = ["--parallel", str(args.parallel), "--threads", str(args.threads)]
    if args.batch_concurrency is not None:
        options += ["--batch-concurrency", str(args.batch_concurrency)]
    rows = []
    with tempfile.TemporaryDirectory() as data, process("serve", "--data-dir", data, *options) as base:
        key = (Path(data) / "default.key").read_text().strip()
        asyncio.run(live(base, key, 1, 2, args.tokens))  # warm-up
        for clients in (int(c) for c in args.clients.split(",")):
            alone = asyncio.run(live(base, key, clients, args.requests, args.tokens))
            client, batch_id = start_batch(base, key, args.lines, args.tokens)
            time.sleep(2)  # the batch under way
            _, tokens_before = batch_tokens(client, batch_id)
            time.sleep(args.batch_seconds)
            _, tokens_after = batch_tokens(client, batch_id)
            batch_alone = (tokens_after - tokens_before) / args.batch_seconds
            done_before, _ = batch_tokens(client, batch_id)
            shared = asyncio.run(live(base, key, clients, args.requests, args.tokens))
            done_after, _ = batch_tokens(client, batch_id)
            client.batches.cancel(batch_id)
            while client.batches.retrieve(batch_id).status != "cancelled":
                time.sleep(0.2)
            rows.append((clients, alone, shared, batch_alone, done_after - done_before))
    print(f"batch of {args.lines} lines, {args.tokens} tokens a request, --parallel {args.parallel}")
    print(
        "| live clients | TTFT p50 alone / with batch (ratio) | TTFT p99 alone / with | live tok/s alone / with "
        "| batch tok/s, no live traffic | batch lines ended during the live run |"
    )
    print("|---|---|---|---|---|---|")
    for clients, alone, shared, batch_rate, lines_done in rows:
        print(
            f"| {clients} | {alone['ttft_p50']:.0f} / {shared['ttft_p50']:.0f} ms "
            f"({shared['ttft_p50'] / alone['ttft_p50']:.2f}×) | {alone['ttft_p99']:.0f} / {shared['ttft_p99']:.0f} ms "
            f"| {alone['tok_s']:.1f} / {shared['tok_s']:.1f} | {batch_rate:.1f} | {lines_done} |"
        )


if __name__ == "__main__":
    main()
