"""Logprobs in OpenAI's two response shapes: chat (`content[]` items with bytes) and legacy completions
(`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)."""

from __future__ import annotations

from typing import Any

from llamaserve.engine.llama import LlamaModel
from llamaserve.engine.logprobs import TokenLogprob


def _token(model: LlamaModel, token: int) -> tuple[str, bytes]:
    raw = model.piece(token, special=True)
    return raw.decode("utf-8", errors="replace"), raw


def chat_logprobs(model: LlamaModel, logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
    """`choices[].logprobs.content` items."""
    items = []
    for lp in logprobs:
        text, raw = _token(model, lp.token)
        top = []
        for token, value in lp.top:
            alt_text, alt_raw = _token(model, token)
            top.append({"token": alt_text, "logprob": value, "bytes": list(alt_raw)})
        items.append({"token": text, "logprob": lp.logprob, "bytes": list(raw), "top_logprobs": top})
    return items


class LegacyLogprobs:
    """Builds `choices[].logprobs` of /v1/completions, chunk by chunk: text offsets run on across calls."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self.offset = 0

    def __call__(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for lp in logprobs:
            text, _ = _token(self.model, lp.token)
            tokens.append(text)
            values.append(lp.logprob)
            tops.append(None if lp.logprob is None else {_token(self.model, t)[0]: v for t, v in lp.top})
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
