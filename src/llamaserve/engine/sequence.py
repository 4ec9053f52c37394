"""One generated choice: its tokens, where its KV lives, how it samples, and when it ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llamaserve.engine.detokenizer import Detokenizer
from llamaserve.engine.logprobs import TokenLogprob
from llamaserve.engine.sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from llamaserve.engine.engine import RequestHandle
    from llamaserve.engine.llama import LlamaModel


@dataclass
class Slot:
    """A llama.cpp sequence id. `tokens` are the tokens whose KV the cache holds for it, at positions
    0..len-1; they stay after the sequence ends, as the prefix cache."""

    id: int
    tokens: list[int] = field(default_factory=list)
    seq: Sequence | None = None


@dataclass
class Output:
    """What one engine step produced for one choice."""

    choice: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # of the tokens whose text this output carries (if asked)
    prompt_logprobs: list[TokenLogprob] | None = None  # once, with the first output (if asked)


class Sequence:
    def __init__(
        self, handle: RequestHandle, choice: int, prompt: list[int], params: SamplingParams, max_new: int
    ) -> None:
        self.handle = handle
        self.choice = choice
        self.prompt_len = len(prompt)
        self.tokens = list(prompt)  # prompt, then every sampled token
        self.params = params
        self.max_new = max_new  # max_tokens, clipped to the context
        self.detok = Detokenizer(params.stop)
        self.slot: Slot | None = None
        self.sampler: Sampler | None = None
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        self._new_tokens: list[int] = []
        self._new_text = ""
        self._new_logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob] | None = [] if self.needs_prompt_logprobs else None

    @property
    def prompt(self) -> list[int]:
        return self.tokens[: self.prompt_len]

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def pending(self) -> int:
        """Tokens not yet in the KV cache: the rest of the prompt, or the last sampled token."""
        assert self.slot is not None
        return len(self.tokens) - len(self.slot.tokens)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Echo with logprobs: the first choice computes every prompt token (no prefix reuse); the others share
        its prompt and its numbers."""
        return self.params.prompt_logprobs is not None and self.choice == 0

    @property
    def prefilling(self) -> bool:
        return self.slot is not None and len(self.slot.tokens) < self.prompt_len

    def append(self, token: int, model: LlamaModel, logprob: TokenLogprob | None = None) -> None:
        """Take a sampled token: detokenize it and decide whether the sequence ends here."""
        self.tokens.append(token)
        self._new_tokens.append(token)
        if model.is_eog(token) and not self.params.ignore_eos:
            self._finish("stop")  # the end token carries no text, so no logprob either
            return
        if logprob is not None:
            self._new_logprobs.append(logprob)
        self._new_text += self.detok.feed(model.piece(token, self.params.special_text))
        if self.detok.stopped:
            self.finish_reason = "stop"
        elif self.n_generated >= self.max_new:
            self._finish("length")

    def _finish(self, reason: str) -> None:
        self._new_text += self.detok.flush()
        self.finish_reason = reason

    def take_output(self) -> Output | None:
        """The text and tokens produced since the last call, if any (and the finish reason once)."""
        if not self._new_tokens and self.finish_reason is None:
            return None
        out = Output(self.choice, self._new_text, self._new_tokens, self.finish_reason)
        if self.params.logprobs is not None:
            out.logprobs, self._new_logprobs = self._new_logprobs, []
        if self.prompt_logprobs is not None and self.n_generated == len(self._new_tokens):
            out.prompt_logprobs = self.prompt_logprobs  # the first output of this choice
        self._new_text, self._new_tokens = "", []
        return out
