"""One generated choice: its tokens, where its KV lives, how it samples, and when it ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llamaserve.engine.detokenizer import Detokenizer
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
    def prefilling(self) -> bool:
        return self.slot is not None and len(self.slot.tokens) < self.prompt_len

    def append(self, token: int, model: LlamaModel) -> None:
        """Take a sampled token: detokenize it and decide whether the sequence ends here."""
        self.tokens.append(token)
        self._new_tokens.append(token)
        if model.is_eog(token) and not self.params.ignore_eos:
            self._finish("stop")
            return
        self._new_text += self.detok.feed(model.piece(token))
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
        self._new_text, self._new_tokens = "", []
        return out
