"""A prompt as the engine runs it: token ids at positions 0..n-1, images among them.

A prompt with images arrives as chunks in order (token lists and mtmd ImageChunks). The engine keeps one flat
list per sequence, as for text, so that the scheduler's position arithmetic and the prefix cache work unchanged:
an image's positions hold a placeholder id derived from its content hash. Placeholders are negative, never a
vocabulary token, and equal only for equal images, so a cached prefix is reused across an image only when the
same image sits at the same place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from llamaserve.engine.mtmd import Chunk, ImageChunk


def image_placeholder(chunk_id: str) -> int:
    """The id an image's positions hold in a token history: negative, 56 bits of its content hash."""
    return -1 - int.from_bytes(hashlib.sha256(chunk_id.encode()).digest()[:7], "big")


@dataclass(frozen=True)
class ImageSpan:
    """An image in a prompt: its chunk, and the positions [start, end) it takes."""

    chunk: ImageChunk
    start: int

    @property
    def end(self) -> int:
        # n_pos, not n_tokens: M-RoPE models (Qwen2-VL) lay n_tokens embeddings over fewer positions.
        return self.start + self.chunk.n_pos


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]  # one id per position; an image's positions hold its placeholder
    images: tuple[ImageSpan, ...] = ()  # in position order
    n_tokens: int = 0  # what usage counts and the KV cache holds: text tokens plus each image's embeddings

    @classmethod
    def of(cls, prompt: Sequence[int] | Sequence[Chunk]) -> Prompt:
        """From token ids, or from chunks (token lists and images, in order)."""
        if not prompt or isinstance(prompt[0], int):
            tokens = list(prompt)  # type: ignore[arg-type]
            return cls(tokens, (), len(tokens))
        tokens = []
        images = []
        n_tokens = 0
        for chunk in prompt:
            if isinstance(chunk, ImageChunk):
                images.append(ImageSpan(chunk, len(tokens)))
                tokens += [image_placeholder(chunk.id)] * chunk.n_pos
                n_tokens += chunk.n_tokens
            else:
                tokens += chunk
                n_tokens += len(chunk)
        return cls(tokens, tuple(images), n_tokens)
