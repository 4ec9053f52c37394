"""Sampling parameters and the per-sequence llama.cpp sampler chain that applies them."""

from __future__ import annotations

import ctypes
import random
from dataclasses import dataclass, field

import llama_cpp as C

from llamaserve.engine.llama import LlamaModel


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over prompt and output (as vLLM and HF apply it)
    presence_penalty: float = 0.0  # over output only (as OpenAI applies it)
    frequency_penalty: float = 0.0  # over output only
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # report each output token's logprob and this many alternatives; None: off
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo); computes the whole prompt
    grammar: str | None = None  # GBNF the output must match (structured output, forced tool calls)
    special_text: bool = False  # control tokens appear in the text (tool parsers need Llama 3's <|python_tag|>)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class GrammarError(ValueError):
    """llama.cpp refused a grammar."""


class Sampler:
    """A llama.cpp sampler chain for one sequence. Applies, in order: logit bias, penalties, the grammar, then
    either greedy argmax or top-k, top-p, min-p, temperature and a seeded draw."""

    def __init__(self, model: LlamaModel, params: SamplingParams, seed_offset: int = 0) -> None:
        chain_params = C.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.chain = C.llama_sampler_chain_init(chain_params)
        self._repetition: ctypes.c_void_p | None = None
        try:
            self._build(model, params, seed_offset)
        except BaseException:
            self.free()  # the samplers added so far belong to the chain
            raise

    def _build(self, model: LlamaModel, params: SamplingParams, seed_offset: int) -> None:
        add = self._add
        if params.logit_bias:
            biases = (C.llama_logit_bias * len(params.logit_bias))(
                *(C.llama_logit_bias(token, bias) for token, bias in params.logit_bias.items())
            )
            # -100 means "never": make it a hard ban, as OpenAI documents, not a large penalty.
            for b in biases:
                if b.bias <= -100:
                    b.bias = float("-inf")
            add(C.llama_sampler_init_logit_bias(model.n_vocab, len(biases), biases))
        window = model.n_ctx_seq
        if params.presence_penalty or params.frequency_penalty:
            add(
                C.llama_sampler_init_penalties(
                    model.n_vocab, window, 1.0, params.frequency_penalty, params.presence_penalty
                )
            )
        if params.repetition_penalty != 1.0:
            self._repetition = C.llama_sampler_init_penalties(
                model.n_vocab, window, params.repetition_penalty, 0.0, 0.0
            )
            add(self._repetition)
        if params.grammar is not None:
            add(_grammar(model, params.grammar))
        if params.greedy:
            add(C.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(C.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(C.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(C.llama_sampler_init_min_p(params.min_p, 1))
        add(C.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else random.getrandbits(31)
        add(C.llama_sampler_init_dist((seed + seed_offset) & 0xFFFFFFFF))

    def _add(self, sampler: ctypes.c_void_p) -> None:
        C.llama_sampler_chain_add(self.chain, sampler)

    def accept_prompt(self, tokens: list[int]) -> None:
        """Prompt tokens count for the repetition penalty only (presence/frequency look at the output)."""
        if self._repetition is not None:
            for token in tokens:
                C.llama_sampler_accept(self._repetition, token)

    def sample(self, model: LlamaModel, batch_index: int) -> int:
        """Pick the next token from the logits at batch_index; the chain records it for its penalties."""
        return C.llama_sampler_sample(self.chain, model.ctx, batch_index)

    def free(self) -> None:
        if self.chain:
            C.llama_sampler_free(self.chain)
            self.chain = None


def _grammar(model: LlamaModel, text: str) -> ctypes.c_void_p:
    """llama.cpp's grammar sampler for GBNF `text` (rule `root`); GrammarError if it cannot be made."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: the API refuses those, but not every caller is the API
        raise GrammarError(f"the grammar is not valid Unicode ({e.reason} at character {e.start})") from e
    grammar = C.llama_sampler_init_grammar(model.vocab, data, b"root")
    if not grammar:
        raise GrammarError("llama.cpp could not parse the grammar")
    return grammar
