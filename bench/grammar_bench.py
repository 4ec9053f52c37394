"""Grammar-constrained decoding speed: JSON-mode generation with the fast path (the grammar checks only the token
the chain picked; llama.cpp's common_sampler does the same) against the reference (the grammar masks the whole
vocabulary every step, as before), in one process on one engine, interleaved so both see the same machine.
Prints output tokens/s of each and their ratio, and plain generation (no grammar) as the ceiling.

    .venv/bin/python bench/grammar_bench.py --rounds 3 --tokens 96
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import replace

from llamaserve.chat.grammar import json_object_grammar
from llamaserve.config import resolve_model
from llamaserve.engine import ContextConfig, Engine, LlamaModel, SamplingParams

PROMPTS = [
    "Describe a person named Ada as JSON.",
    "Give me a JSON object describing a red car.",
    "List three fruits with their colours, as JSON.",
    "A JSON object for a book: title, author, year.",
]


async def run(engine: Engine, model: LlamaModel, params: SamplingParams) -> tuple[int, float]:
    """Every prompt, one request at a time: (tokens generated, seconds)."""
    tokens, started = 0, time.perf_counter()
    for prompt in PROMPTS:
        handle = engine.submit(model.tokenize(prompt, add_special=True), params)
        async for out in handle.outputs():
            assert out.error is None, out.error
            tokens += len(out.token_ids)
    return tokens, time.perf_counter() - started


async def main(args: argparse.Namespace) -> None:
    path, _ = resolve_model(None)
    model = LlamaModel(str(path), ContextConfig(n_ctx_seq=1024, n_seq_max=1, n_batch=128, n_threads=args.threads))
    engine = Engine(model)
    engine.start(asyncio.get_running_loop())
    base = SamplingParams(max_tokens=args.tokens, temperature=args.temperature, seed=1)
    json_mode = replace(base, grammar=json_object_grammar())
    modes = {"plain": base, "reference": replace(json_mode, grammar_fast=False), "fast": json_mode}
    totals = {name: [0, 0.0] for name in modes}
    try:
        for r in range(args.rounds):
            for name, params in modes.items():
                tokens, seconds = await run(engine, model, params)
                totals[name][0] += tokens
                totals[name][1] += seconds
                print(f"round {r + 1} {name:9s} {tokens:5d} tokens {seconds:7.2f} s {tokens / seconds:7.1f} tok/s")
    finally:
        engine.stop()
        model.close()
    rate = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
    print(f"\nJSON mode, temperature {args.temperature}, {args.threads} threads, one request at a time:")
    for name in modes:
        print(f"  {name:9s} {rate[name]:7.1f} tok/s")
    fast = rate["fast"]
    print(f"  fast / reference: {fast / rate['reference']:.2f}x; fast / plain: {fast / rate['plain']:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=96, help="max_tokens of each request")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
