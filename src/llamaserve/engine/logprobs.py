"""Log-probabilities from the model's raw distribution: log-softmax of the logits, before any sampling filter
(bias, penalties, grammar, top-k/p, temperature), as OpenAI and vLLM report them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llamaserve.engine.llama import LlamaModel


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float | None  # None for a prompt's first token: nothing predicts it
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens at this position, best first


def token_logprob(model: LlamaModel, batch_index: int, token: int, n_top: int) -> TokenLogprob:
    """The logprob of `token` under the logits at `batch_index`, with the n_top most likely alternatives."""
    return logprob_of(np.ctypeslib.as_array(model.logits(batch_index)), token, n_top)


def logprob_of(logits: np.ndarray, token: int, n_top: int) -> TokenLogprob:
    """The logprob of `token` under `logits`, with the n_top most likely alternatives."""
    peak = float(logits.max())
    log_z = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
    top: tuple[tuple[int, float], ...] = ()
    if n_top > 0:
        best = np.argpartition(logits, -n_top)[-n_top:]
        best = best[np.argsort(-logits[best], kind="stable")]
        top = tuple((int(t), float(logits[t]) - log_z) for t in best)
    return TokenLogprob(token, float(logits[token]) - log_z, top)
