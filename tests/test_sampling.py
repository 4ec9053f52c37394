"""Grammar-constrained sampling: the fast path (the grammar checks only the token the chain picked) against the
reference (the grammar masks the whole vocabulary every step), on the real model."""

from __future__ import annotations

import asyncio
import ctypes
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import llama_cpp as C
import numpy as np
import pytest

from llamaserve.chat.grammar import json_object_grammar, json_schema_grammar
from llamaserve.chat.tools import HermesFormat
from llamaserve.engine import Engine, LlamaModel, SamplingParams
from llamaserve.engine.llama import Batch
from llamaserve.engine.sampling import TOKEN_DATA, Sampler

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "age": {"type": "integer"},
    },
    "required": ["name", "age"],
}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}  # fmt: skip
GRAMMARS = {
    "json_object": json_object_grammar(),
    "json_schema": json_schema_grammar(SCHEMA),
    "tool_call": HermesFormat().call_grammar([TOOL], ["tools[0]"]),
}
PROMPT = "Describe a person named Ada as JSON."


def generate(model: LlamaModel, params: list[SamplingParams]) -> list[str]:
    """Each request's text, run one after another on a fresh engine (no batching between them)."""

    async def main() -> list[str]:
        engine = Engine(model)
        engine.start(asyncio.get_running_loop())
        prompt = model.tokenize(PROMPT, add_special=True)
        texts = []
        try:
            for p in params:
                text = ""
                async for out in engine.submit(prompt, p).outputs():
                    assert out.error is None, out.error
                    text += out.text
                texts.append(text)
        finally:
            engine.stop()
        return texts

    return asyncio.run(main())


@pytest.mark.parametrize("grammar", GRAMMARS.values(), ids=GRAMMARS.keys())
def test_greedy_output_is_the_same_with_the_fast_path(embedded_llama: LlamaModel, grammar: str) -> None:
    params = [SamplingParams(max_tokens=32, temperature=0.0, grammar=grammar, grammar_fast=f) for f in (True, False)]
    fast, reference = generate(embedded_llama, params)
    assert fast == reference
    # Enough constrained steps to compare (the exact text depends on the CPU's arithmetic: '{"name": "Ada"}' here).
    assert len(embedded_llama.tokenize(fast, add_special=False)) >= 6, fast


def test_seeded_draws_follow_the_grammar_and_repeat(embedded_llama: LlamaModel) -> None:
    params = [SamplingParams(max_tokens=200, seed=seed, grammar=GRAMMARS["json_schema"]) for seed in (1, 2, 1)]
    first, second, again = generate(embedded_llama, params)
    assert first == again and first != second
    for text in (first, second):
        value = json.loads(text)  # complete (the schema's strings are short): it ended by the grammar's end
        assert set(value) >= {"name", "age"}


def test_a_plain_draw_has_the_masked_distribution(embedded_llama: LlamaModel) -> None:
    """The first token of a JSON reply, drawn 1000 times through the fast path, against the distribution of the
    grammar-masked logits computed here. The model would rather write prose, so most first draws are refused
    and drawn again: the path that must not skew the result. The redraws (the grammar masks the whole
    vocabulary, a few ms each) run on two threads, as the engine runs them on a thread of its own: each draw has
    its own sampler, and the result does not depend on the order they run in."""
    grammar = GRAMMARS["json_object"]
    tokens = embedded_llama.tokenize(PROMPT, add_special=True)
    batch = Batch(64)
    try:
        for pos, token in enumerate(tokens):
            batch.add(token, pos, 0, pos == len(tokens) - 1)
        assert embedded_llama.decode(batch) == 0
        last = len(tokens) - 1  # the batch index whose logits came out
        expected = masked_distribution(embedded_llama, grammar, last)
        refused, counts = 0, Counter()
        with ThreadPoolExecutor(2) as pool:
            for start in range(0, 1000, 50):  # 50 samplers at a time (each holds a copy of the logits)
                seeds = range(start, start + 50)
                samplers = [Sampler(embedded_llama, SamplingParams(seed=seed, grammar=grammar)) for seed in seeds]
                try:
                    firsts = [sampler.sample(embedded_llama, last) for sampler in samplers]
                    refused += firsts.count(None)  # the grammar refused the chain's own draw
                    redraw = [sampler for sampler, first in zip(samplers, firsts, strict=True) if first is None]
                    counts.update(first for first in firsts if first is not None)
                    counts.update(pool.map(Sampler.sample_masked, redraw))
                finally:
                    for sampler in samplers:
                        sampler.free()
    finally:
        batch.free()
    assert refused > 300  # the resampling path ran, often
    assert sum(counts.values()) == 1000
    assert set(counts) <= set(np.flatnonzero(expected))  # never a token the grammar forbids
    top = np.argsort(expected)[::-1][:5]
    for token in top:  # each likely token's frequency within 4 standard errors of its probability
        p = expected[token]
        assert abs(counts[int(token)] / 1000 - p) < 4 * np.sqrt(p * (1 - p) / 1000) + 1e-3, (token, p, counts)


def masked_distribution(model: LlamaModel, grammar: str, index: int) -> np.ndarray:
    """softmax over the logits of a batch index, with the tokens the grammar forbids at its start removed."""
    data = np.empty(model.n_vocab, TOKEN_DATA)
    data["id"] = np.arange(model.n_vocab)
    data["logit"] = np.ctypeslib.as_array(model.logits(index))
    data["p"] = 0
    cur = C.llama_token_data_array(data.ctypes.data_as(ctypes.POINTER(C.llama_token_data)), model.n_vocab, -1, False)
    mask = C.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
    C.llama_sampler_apply(mask, ctypes.byref(cur))
    C.llama_sampler_free(mask)
    logits = np.empty(model.n_vocab, np.float64)
    logits[data["id"]] = data["logit"]
    p = np.exp(logits - logits.max())
    return p / p.sum()


def test_a_costly_grammar_does_not_hold_up_other_sequences(embedded_llama: LlamaModel) -> None:
    """A 1000-value enum makes the grammar mask the whole vocabulary (~100 ms a token); that runs on a thread of
    its own while the sequence sits out the batches. A plain request started beside it is done before the
    grammar one has half its tokens: it used to wait for each of those draws, step by step."""
    enum = {"type": "string", "enum": [f"value-number-{i:04d}-padding" for i in range(1000)]}
    heavy = SamplingParams(max_tokens=24, temperature=0, grammar=json_schema_grammar(enum))
    plain = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    async def main() -> tuple[int, str]:
        engine = Engine(embedded_llama)
        engine.start(asyncio.get_running_loop())
        prompt = embedded_llama.tokenize(PROMPT, add_special=True)
        try:
            constrained, free = engine.submit(prompt, heavy), engine.submit(prompt, plain)
            outputs = []

            async def read_constrained() -> None:
                async for out in constrained.outputs():
                    assert out.error is None, out.error
                    outputs.append(out)

            reading = asyncio.create_task(read_constrained())
            async for _ in free.outputs():
                pass
            drawn_meanwhile = sum(len(out.token_ids) for out in outputs)
            await reading
            return drawn_meanwhile, "".join(out.text for out in outputs)
        finally:
            engine.stop()

    drawn_meanwhile, text = asyncio.run(main())
    assert json.loads(text) in enum["enum"], text  # it still follows its grammar to the end
    assert drawn_meanwhile < 12, drawn_meanwhile
