"""The engine under the API: continuous batching, cancellation, the queue bound, and the prefix cache."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest

from llamaserve.engine import Engine, LlamaModel, SamplingParams
from llamaserve.engine.scheduler import RECOMPUTE
from tests.conftest import MODEL, Server, start_server

SYSTEM = (
    "You are the support assistant of Northwind Outfitters, a company that sells hiking boots, tents, sleeping "
    "bags, stoves and rain gear in twelve countries. Always answer politely and briefly. Our return window is "
    "sixty days from delivery for unused items and thirty days for used items with a receipt. Shipping is free "
    "above fifty euros; below that it costs five euros within the European Union and fifteen euros elsewhere. "
    "Repairs of boots and tents are free for two years. Warranty claims need the order number, a photo of the "
    "damage, and the date of purchase. Never promise delivery dates; give the usual range of three to seven "
    "working days. Do not discuss competitors. If a customer is angry, apologise once and offer a human agent. "
    "Sizes run small for the Alpine boot line; suggest half a size up. Gift cards never expire and cannot be "
    "exchanged for cash. Stores open from nine to six on weekdays and from ten to four on Saturdays."
)


def chat(server: Server, messages: list[dict[str, str]], **kw: object) -> dict:
    r = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": MODEL, "messages": messages, **kw},
        timeout=120,
        headers=server.auth,
    )
    assert r.status_code == 200, r.text
    return r.json()


async def stream_text(client: openai.AsyncOpenAI, content: str, max_tokens: int) -> tuple[str, int, str]:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, usage, finish = "", 0, ""
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage.completion_tokens
    return text, usage, finish


def test_sixteen_concurrent_streams_share_batches() -> None:
    # A server of its own: its stats count these streams only. A stream takes under 60 tokens of context, and 512
    # a slot keeps the 16 slots' KV cache small (serve's 4096 a slot costs a start ~1 s more, to allocate and clear).
    with start_server("--parallel", "16", "--ctx", "512") as server:
        client = server.async_openai()

        async def run() -> list[tuple[str, int, str]]:
            return await asyncio.gather(
                *(stream_text(client, f"Tell me fact {i} about rivers.", 16) for i in range(16))
            )

        results = asyncio.run(run())
        stats = server.wait_idle()
    assert [r[1:] for r in results] == [(16, "length")] * 16
    assert all(r[0] for r in results)
    # Continuous batching really happened: one llama_decode advanced (nearly) all 16 streams at once.
    assert stats["max_batch_generating"] >= 12, stats
    assert stats["generated_tokens"] == 16 * 16


def test_client_disconnect_frees_its_slot() -> None:
    with start_server("--parallel", "2") as server:
        for _ in range(2):  # two streams that would run for 4000 tokens, dropped after a few chunks
            with httpx.stream(
                "POST",
                f"{server.v1}/chat/completions",
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "Count forever."}],
                    "max_tokens": 4000,
                    "stream": True,
                    "ignore_eos": True,
                },
                timeout=60,
                headers=server.auth,
            ) as r:
                lines = r.iter_lines()
                for _ in range(5):
                    next(lines)
        stats = server.wait_idle(timeout=10)
        assert stats["generated_tokens"] < 1000, stats
        # Both slots are free again: two new requests run side by side.
        client = server.async_openai()

        async def two() -> list[tuple[str, int, str]]:
            return await asyncio.gather(*(stream_text(client, f"Hi {i}", 16) for i in range(2)))

        assert [r[1] for r in asyncio.run(two())] == [16, 16]
        assert server.wait_idle()["max_batch_generating"] == 2


def test_non_streaming_disconnect_cancels_generation() -> None:
    with start_server("--parallel", "1") as server:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Go"}], "max_tokens": 4000, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.v1}/chat/completions", json=body, timeout=1.0, headers=server.auth)
        stats = server.wait_idle(timeout=10)
        assert stats["generated_tokens"] < 1000, stats


def test_a_queued_request_starts_as_soon_as_a_slot_frees() -> None:
    """One slot, two requests at once: the second starts in the step after the first ends, not after the engine's
    0.5 s wait for new work (it waited so whenever the last running sequence finished with others queued)."""
    with start_server("--parallel", "1") as server:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Go"}], "max_tokens": 8, "ignore_eos": True}

        async def two() -> list[float]:
            async with httpx.AsyncClient(timeout=120, headers=server.auth) as c:
                await c.post(f"{server.v1}/chat/completions", json=body)  # warm
                started = time.monotonic()

                async def one() -> float:
                    assert (await c.post(f"{server.v1}/chat/completions", json=body)).status_code == 200
                    return time.monotonic() - started

                return sorted(await asyncio.gather(one(), one()))

        first, second = asyncio.run(two())
        assert second - first < 2 * first + 0.2, (first, second)  # the same work again, not that and a wait


def test_queue_bound_gives_503() -> None:
    with start_server("--parallel", "1", "--max-queue", "1") as server:
        # The first request runs for 30 tokens: the three sent with it arrive well within that.
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Go"}], "max_tokens": 30, "ignore_eos": True}

        async def burst() -> list[int]:
            async with httpx.AsyncClient(timeout=120, headers=server.auth) as c:
                rs = await asyncio.gather(*(c.post(f"{server.v1}/chat/completions", json=body) for _ in range(4)))
            return sorted(r.status_code for r in rs)

        codes = asyncio.run(burst())
        assert codes[:2] == [200, 200] and set(codes[2:]) == {503}, codes
        small = {**body, "max_tokens": 2}
        r = httpx.post(f"{server.v1}/chat/completions", json=small, headers=server.auth, timeout=120)
        assert r.status_code == 200
        assert refusals_once_full_write_nothing(server, body) == [503, 503]


def refusals_once_full_write_nothing(server: Server, body: dict[str, Any]) -> list[int]:
    """With the slot and the queue taken, requests are refused before any credit hold: no usage row, no ledger
    write for them (under overload a 503 costs the database nothing)."""

    def settled_records() -> int:
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.v1}/account/balance", headers=server.auth).json()["open_holds"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return len(httpx.get(f"{server.v1}/account/usage", headers=server.auth).json()["data"])

    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=120, headers=server.auth) as c:
            url = f"{server.v1}/chat/completions"
            before = settled_records()
            # The first runs for 120 tokens once the second waits: time enough for two refusals, one by one, also
            # on a loaded machine (with 30, the first once ended before them under the whole suite's load).
            long = [asyncio.create_task(c.post(url, json={**body, "max_tokens": 120})) for _ in range(2)]
            while (stats := server.engine_stats())["running"] + stats["waiting"] < 2:
                await asyncio.sleep(0.05)
            refused = [(await c.post(url, json=body)).status_code for _ in range(2)]
            assert [(await t).status_code for t in long] == [200, 200]
        assert settled_records() == before + 2  # the two that ran, nothing for the refused
        return refused

    return asyncio.run(run())


def test_second_chat_turn_reuses_the_first() -> None:
    first = [{"role": "user", "content": "Name three colours."}]
    with start_server() as warm, start_server() as cold:
        reply = chat(warm, first, max_tokens=24, temperature=0)["choices"][0]["message"]["content"]
        second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "And three animals?"}]
        cached = chat(warm, second, max_tokens=24, temperature=0.7, seed=7)
        fresh = chat(cold, second, max_tokens=24, temperature=0.7, seed=7)
    details = cached["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] > 0
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert cached["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"]


def test_shared_system_prompt_is_reused() -> None:
    def ask(question: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]

    with start_server() as warm, start_server() as cold:
        chat(warm, ask("Can I return used boots?"), max_tokens=8)
        cached = chat(warm, ask("Do gift cards expire?"), max_tokens=24, temperature=0.7, seed=3)
        fresh = chat(cold, ask("Do gift cards expire?"), max_tokens=24, temperature=0.7, seed=3)
    assert cached["usage"]["prompt_tokens_details"]["cached_tokens"] >= 150
    assert cached["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"]


def test_burst_sharing_a_system_prompt_prefills_it_once() -> None:
    with start_server("--parallel", "8") as server:
        client = server.async_openai()

        async def burst() -> list:
            return await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}?"}],
                        max_tokens=4,
                    )
                    for i in range(8)
                )
            )

        responses = asyncio.run(burst())
        stats = server.wait_idle()
    prompt_len = responses[0].usage.prompt_tokens
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in responses]
    assert sum(1 for c in cached if c >= 150) >= 7, cached
    # Computed once for the shared part, plus each request's own few tokens: far below 8 full prefills.
    assert stats["prompt_tokens_computed"] < prompt_len + 8 * 20, (stats, prompt_len)


def test_n_choices_prefill_the_prompt_once() -> None:
    with start_server() as server:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}]
        r = chat(server, messages, n=4, max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
        stats = server.wait_idle()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    prompt_len = r["usage"]["prompt_tokens"]
    assert r["usage"]["completion_tokens"] == 4 * 6
    # The prompt once, then its last RECOMPUTE tokens (for each choice's own logits) per extra choice.
    assert stats["prompt_tokens_computed"] == prompt_len + 3 * RECOMPUTE, (stats, prompt_len)


def test_engine_keeps_serving_after_long_idle_wait(server: Server) -> None:
    time.sleep(0.6)  # the engine thread blocks on its inbox when idle; a new request must wake it
    assert chat(server, [{"role": "user", "content": "Hi"}], max_tokens=2)["usage"]["completion_tokens"] == 2


def test_same_request_same_output_after_other_traffic(server: Server) -> None:
    """Each slot keeps its KV in a stream of its own, so other requests' cached prefixes do not change how a
    sequence's cells are laid out, and an identical request gives identical output. The other traffic: 24 short
    requests over the 16 slots, whose prompts stay cached (a slot keeps only a prompt's KV as cache, so longer
    replies would leave the cache as these do)."""
    question = [{"role": "user", "content": "Describe a lighthouse at night."}]
    first = chat(server, question, max_tokens=32, temperature=0.8, seed=11)

    async def churn() -> None:
        async with httpx.AsyncClient(timeout=120, headers=server.auth) as c:
            bodies = [
                {"model": MODEL, "messages": [{"role": "user", "content": f"Topic {i}: bees"}], "max_tokens": 4}
                for i in range(24)
            ]
            await asyncio.gather(*(c.post(f"{server.v1}/chat/completions", json=b) for b in bodies))

    asyncio.run(churn())
    again = chat(server, question, max_tokens=32, temperature=0.8, seed=11)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]


def test_repeated_seeded_request_hits_the_cache_and_samples_the_same() -> None:
    """A repeat of a request reuses its prompt's KV but recomputes the last two tokens as a batch: computed
    alone, the last token's logits round differently (llama.cpp's matrix-vector path) and a seeded sample
    drifted (seen: 'The colour most closely...' then 'The colour in question...')."""
    body = {"max_tokens": 8, "temperature": 0.9, "seed": 7, "top_k": 20, "min_p": 0.05}
    with start_server("--parallel", "2") as server:
        first = chat(server, [{"role": "user", "content": "Name a colour."}], **body)
        again = chat(server, [{"role": "user", "content": "Name a colour."}], **body)
    usage = again["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 2
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]


def test_a_free_slot_goes_to_the_tenant_running_the_fewest(embedded_llama: LlamaModel) -> None:
    """Two slots, both busy; then account A queues four requests and account B one. First come, first served
    would start A's first two when the slots free up; fair admission starts A's first, then B's, then A's
    second."""

    async def run() -> dict[str, float]:
        engine = Engine(embedded_llama)
        engine.start(asyncio.get_running_loop())
        try:
            # The busy two run for 16 steps: A's and B's requests are queued long before they end.
            params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
            prompt = embedded_llama.tokenize("Count slowly:", add_special=True)
            busy = [engine.submit(prompt, params, tenant="busy") for _ in range(2)]
            while engine.stats.running < 2:
                await asyncio.sleep(0.01)
            short = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
            queued = {
                name: engine.submit(embedded_llama.tokenize(f"{name}: name a colour", add_special=True), short,
                                    tenant=name[0])
                for name in ("A1", "A2", "A3", "A4", "B1")
            }  # fmt: skip
            for handle in [*busy, *queued.values()]:
                async for _ in handle.outputs():
                    pass
            return {name: handle.first_token_at or 0.0 for name, handle in queued.items()}
        finally:
            engine.stop()

    started = asyncio.run(run())
    assert started["A1"] <= started["B1"] < started["A2"] <= started["A3"], started


@pytest.mark.parametrize("flash_attn", [False, True])
def test_a_split_prompt_gives_the_same_logits_unless_flash_attention_is_on(flash_attn: bool) -> None:
    """The default's guarantee that a cached prefix answers as a fresh run does (determinism.md), and what
    `--flash-attn` costs: with it, the last prompt token's logits depend on where the prompt was split."""
    import numpy as np

    from llamaserve.config import resolve_model
    from llamaserve.engine import ContextConfig
    from llamaserve.engine.llama import Batch

    path, _ = resolve_model(None)
    config = ContextConfig(n_ctx_seq=512, n_seq_max=1, n_batch=256, n_threads=2, flash_attn=flash_attn)
    model = LlamaModel(str(path), config)
    tokens = model.tokenize(SYSTEM * 2, add_special=True)[:400]
    batch = Batch(256)

    def last_logits(cut: int) -> np.ndarray:
        """The prompt decoded in chunks of at most 256 tokens, one ending at `cut`."""
        model.kv_clear()
        for part in (range(0, cut), range(cut, len(tokens))):
            for start in range(part.start, part.stop, 256):
                batch.clear()
                for pos in range(start, min(start + 256, part.stop)):
                    batch.add(tokens[pos], pos, 0, pos == len(tokens) - 1)
                assert model.decode(batch) == 0
        return np.ctypeslib.as_array(model.logits(batch.size - 1)).copy()

    try:
        whole = last_logits(0)
        gaps = [float(np.abs(whole - last_logits(cut)).max()) for cut in (100, 300, len(tokens) - 1)]
    finally:
        batch.free()
        model.close()
    assert (max(gaps) > 0.1) if flash_attn else gaps == [0, 0, 0], gaps


def test_a_background_request_waits_while_a_live_one_runs(embedded_llama: LlamaModel) -> None:
    """A batch line (background) already generating yields every step to a live request that arrives: it makes
    no progress until the live one has finished, then goes on where it stopped."""

    async def run() -> tuple[list[float], float, float]:
        engine = Engine(embedded_llama)
        engine.start(asyncio.get_running_loop())
        try:
            params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
            prompt = embedded_llama.tokenize("Count slowly:", add_special=True)
            background = engine.submit(prompt, params, tenant="a", background=True)
            stamps: list[float] = []

            async def read_background() -> None:
                async for out in background.outputs():
                    stamps.extend([time.perf_counter()] * len(out.token_ids))

            reading = asyncio.ensure_future(read_background())
            while len(stamps) < 4:
                await asyncio.sleep(0.005)
            live = engine.submit(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), tenant="a")
            live_started = time.perf_counter()
            async for _ in live.outputs():
                pass
            live_ended = time.perf_counter()
            await reading
            return stamps, live_started, live_ended
        finally:
            engine.stop()

    stamps, live_started, live_ended = asyncio.run(run())
    assert len(stamps) == 24
    # At most the step in flight when the live request came; none while it ran.
    during = [t for t in stamps if live_started < t <= live_ended]
    assert len(during) <= 1, (len(during), live_started, live_ended)
