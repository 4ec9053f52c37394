"""Sampling parameters and the per-sequence llama.cpp sampler chain that applies them."""

from __future__ import annotations

import ctypes
import functools
import random
from dataclasses import dataclass, field

import llama_cpp as C
import numpy as np

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
    # Check only the chosen token against the grammar where that samples the same (see Sampler); False: mask
    # the whole vocabulary every step, the reference that tests and bench/grammar_bench.py compare with.
    grammar_fast: bool = True
    special_text: bool = False  # control tokens appear in the text (tool parsers need Llama 3's <|python_tag|>)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class GrammarError(ValueError):
    """llama.cpp refused a grammar."""


# llama_token_data as numpy lays it out: the candidates of a grammar-checked draw are filled from the logits in C.
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert TOKEN_DATA.itemsize == ctypes.sizeof(C.llama_token_data)


class Sampler:
    """A llama.cpp sampler chain for one sequence: logit bias, penalties, then either greedy argmax or top-k,
    top-p, min-p, temperature and a seeded draw; and the grammar, if there is one.

    Masking the whole vocabulary with the grammar costs ~30 ms a token here (every token's text is matched
    against the grammar). So, as llama.cpp's common_sampler does, the chain picks a token from the unmasked
    logits and the grammar checks only that one; only if it refuses does the grammar mask the whole vocabulary
    and the chain pick again. This changes nothing where the chain ends in greedy argmax (the best token, if
    allowed, is also the best allowed one, ties included: both take the lowest id) or in a plain draw (drawing
    until an allowed token comes is drawing from the allowed ones, renormalized; a refusal draws from exactly
    that). Top-k, top-p and min-p cut the distribution before the draw, and cut over the whole vocabulary they
    keep other tokens than cut over the allowed ones: with those, and with `grammar_fast` off, the grammar sits
    in the chain and masks every step."""

    def __init__(self, model: LlamaModel, params: SamplingParams, seed_offset: int = 0) -> None:
        chain_params = C.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.chain = C.llama_sampler_chain_init(chain_params)
        self._repetition: ctypes.c_void_p | None = None
        self.grammar: ctypes.c_void_p | None = None  # the grammar when it checks chosen tokens, outside the chain
        self.grammar_in_chain = False  # the grammar masks every step, inside the chain
        self.logits: np.ndarray | None = None  # a copy of the last logits, with a grammar (for sample_masked)
        self._candidates: np.ndarray | None = None
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
            truncates = not params.greedy and (params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0)
            self._candidates = np.empty(model.n_vocab, TOKEN_DATA)
            if params.grammar_fast and not truncates:
                self.grammar = _grammar(model, params.grammar)
            else:
                add(_grammar(model, params.grammar))
                self.grammar_in_chain = True
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

    def sample(self, model: LlamaModel, batch_index: int) -> int | None:
        """Pick the next token from the logits at batch_index; the chain (and grammar) record it. None when the
        grammar must mask the whole vocabulary first: `sample_masked` draws it then, from a copy of the logits
        (the next decode overwrites them), on a thread of its own."""
        if self.grammar is None and not self.grammar_in_chain:
            return C.llama_sampler_sample(self.chain, model.ctx, batch_index)
        self.logits = np.ctypeslib.as_array(model.logits(batch_index)).copy()
        if self.grammar is None:
            return None  # the chain's grammar masks every step
        cur = self._fill()
        C.llama_sampler_apply(self.chain, ctypes.byref(cur))
        token = cur.data[cur.selected].id
        if not self._allowed(token):
            return None
        self._accept(token)
        return token

    def sample_masked(self) -> int:
        """The draw `sample` left: the grammar masks every token of the vocabulary (30 to 150 ms a token with a
        large grammar), then the chain draws. ctypes lets go of the GIL meanwhile."""
        cur = self._fill()
        if self.grammar is not None:
            C.llama_sampler_apply(self.grammar, ctypes.byref(cur))
        C.llama_sampler_apply(self.chain, ctypes.byref(cur))
        token = cur.data[cur.selected].id
        self._accept(token)
        return token

    def _accept(self, token: int) -> None:
        if self.grammar is not None:
            C.llama_sampler_accept(self.grammar, token)  # once: it advances the grammar's state
        C.llama_sampler_accept(self.chain, token)

    def _fill(self) -> C.llama_token_data_array:
        """Every token of the vocabulary with its logit (from the copy `sample` made), as the samplers take
        them."""
        data = self._candidates
        assert data is not None and self.logits is not None
        data["id"] = _token_ids(len(data))
        data["logit"] = self.logits
        data["p"] = 0.0
        pointer = data.ctypes.data_as(ctypes.POINTER(C.llama_token_data))
        return C.llama_token_data_array(pointer, len(data), -1, False)

    def _allowed(self, token: int) -> bool:
        """Whether the grammar, in its present state, lets `token` come next."""
        one = C.llama_token_data(token, 1.0, 0.0)
        single = C.llama_token_data_array(ctypes.pointer(one), 1, -1, False)
        C.llama_sampler_apply(self.grammar, ctypes.byref(single))
        return one.logit != float("-inf")

    def free(self) -> None:
        if self.chain:
            C.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar:
            C.llama_sampler_free(self.grammar)
            self.grammar = None


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


@functools.cache
def _token_ids(n_vocab: int) -> np.ndarray:
    return np.arange(n_vocab, dtype=np.int32)
