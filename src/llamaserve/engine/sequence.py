"""One generated choice: its tokens, where its KV lives, how it samples, and when it ends."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from llamaserve.engine.detokenizer import Detokenizer
from llamaserve.engine.logprobs import TokenLogprob
from llamaserve.engine.prompt import ImageSpan, Prompt
from llamaserve.engine.sampling import Sampler, SamplingParams

if TYPE_CHECKING:
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
    """What one engine step produced for one choice: all the frontend learns of it (the engine thread and the
    event loop share no object but these, passed by value)."""

    choice: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # of the tokens whose text this output carries (if asked)
    prompt_logprobs: list[TokenLogprob] | None = None  # once, with the first output (if asked)
    cached_tokens: int = 0  # prompt tokens the prefix cache served this choice
    sampled_at: float | None = None  # perf_counter when the last of token_ids was sampled


@dataclass
class Request:
    """A request as the engine thread knows it: an id (the frontend maps it to its handle), whose it is, when it
    came, and its choices' sequences."""

    id: int
    tenant: str  # an account: free slots go first to the tenant running the fewest
    submitted: float  # perf_counter
    sequences: list[Sequence] = field(default_factory=list)
    background: bool = False  # a batch line: it runs only while no live request does (scheduler.LIVE_GRACE)

    @property
    def finished(self) -> bool:
        return all(seq.finish_reason is not None for seq in self.sequences)


class Sequence:
    def __init__(self, request: Request, choice: int, prompt: Prompt, params: SamplingParams, max_new: int) -> None:
        self.request = request
        self.choice = choice
        self.prompt_len = len(prompt.tokens)  # in positions
        self.tokens = list(prompt.tokens)  # prompt (images as placeholders), then every sampled token
        self.images = prompt.images
        self.encodings: dict[int, Future[np.ndarray]] = {}  # image start -> its embeddings, being computed
        self.params = params
        self.max_new = max_new  # max_tokens, clipped to the context
        self.detok = Detokenizer(params.stop)
        self.slot: Slot | None = None
        self.sampler: Sampler | None = None
        self.masking: Future[int] | None = None  # its next token, being drawn under the grammar's full mask
        self.cached_tokens = 0
        self.last_token_at = 0.0  # perf_counter when its last token was sampled (inter-token latency)
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
        """Tokens to feed as text: the rest of the prompt up to its next image, or the last sampled token. 0
        while an image is due (image_due)."""
        assert self.slot is not None
        done = len(self.slot.tokens)
        if not self.images:
            return len(self.tokens) - done
        image = self._next_image(done)
        return (image.start if image is not None else len(self.tokens)) - done

    def image_due(self) -> ImageSpan | None:
        """The image the prefill has reached, if it has reached one."""
        assert self.slot is not None
        image = self._next_image(len(self.slot.tokens))
        return image if image is not None and image.start == len(self.slot.tokens) else None

    def _next_image(self, done: int) -> ImageSpan | None:
        """The first image not wholly in the KV cache (images enter it whole, never in part)."""
        for image in self.images:
            if image.end > done:
                return image
        return None

    def image_boundary(self, pos: int) -> int:
        """pos, or the start of the image pos falls inside: a reused prefix never ends mid-image."""
        for image in self.images:
            if image.start < pos < image.end:
                return image.start
        return pos

    def tokens_before(self, pos: int) -> int:
        """Tokens (text, and image embeddings) at positions before pos, where pos is an image boundary."""
        return pos + sum(i.chunk.n_tokens - i.chunk.n_pos for i in self.images if i.end <= pos)

    @property
    def text_prompt(self) -> list[int]:
        """The prompt's vocabulary tokens (no image placeholders)."""
        return self.prompt if not self.images else [t for t in self.prompt if t >= 0]

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

    def end_unsampled(self) -> None:
        """max_tokens 0: the prompt is scored (its logprobs computed), and nothing generated."""
        self._finish("length")

    def take_output(self) -> Output | None:
        """The text and tokens produced since the last call, if any (and the finish reason once)."""
        if not self._new_tokens and self.finish_reason is None:
            return None
        out = Output(self.choice, self._new_text, self._new_tokens, self.finish_reason)
        out.cached_tokens, out.sampled_at = self.cached_tokens, self.last_token_at or None
        if self.params.logprobs is not None:
            out.logprobs, self._new_logprobs = self._new_logprobs, []
        if self.prompt_logprobs is not None and self.n_generated == len(self._new_tokens):
            out.prompt_logprobs = self.prompt_logprobs  # the first output of this choice
        self._new_text, self._new_tokens = "", []
        return out
