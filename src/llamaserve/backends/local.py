"""A model served in this process: the GGUF, its vision projector if any, its engine, and its prompts (rendered
and tokenized by `ChatRenderer`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from llamaserve.backends.renderer import ChatPrompt, ChatRenderer
from llamaserve.config import ServeConfig, resolve_model
from llamaserve.engine import ContextConfig, Engine, LlamaError, LlamaModel
from llamaserve.engine.metrics import EngineMetrics
from llamaserve.engine.mtmd import ImageChunk, Projector, RGBImage

__all__ = ["ChatPrompt", "LocalModel"]


class LocalModel(ChatRenderer):
    def __init__(self, config: ServeConfig, on_progress: Callable[[float], None] | None = None) -> None:
        path, file_id = resolve_model(config.model)
        self.path: Path = path
        self.config = config
        llama = LlamaModel(
            str(path),
            ContextConfig(
                n_ctx_seq=config.ctx,
                n_seq_max=config.parallel,
                n_batch=config.batch,
                n_threads=config.threads,
                flash_attn=config.flash_attn,
            ),
            on_progress=on_progress,
        )
        try:
            projector = self._load_projector(config, llama)
        except BaseException:
            llama.close()
            raise
        super().__init__(config.model_id or file_id, llama, config.chat_format, projector)
        self.engine = Engine(
            self.llama, max_waiting=config.max_queue, projector=self.projector, metrics=EngineMetrics(self.id)
        )
        self.max_model_len = self.engine.max_model_len
        # Byte-level BPE and SentencePiece pieces put together give back the prompt, so a prompt of B bytes is
        # at least B / (longest piece) tokens: one beyond this many bytes cannot fit the context whatever its
        # text, and is refused by its size before it is rendered or tokenized (a 10 MB message took 40 s).
        self.max_prompt_bytes = self.max_model_len * self.llama.max_bytes_per_token()

    @staticmethod
    def _load_projector(config: ServeConfig, llama: LlamaModel) -> Projector | None:
        if config.mmproj is None:
            return None
        projector = Projector(config.mmproj, llama.model, n_threads=config.threads)
        if projector.uses_non_causal:
            # Such an image attends to itself whole, so it must fit one batch: find out now, not per request.
            probe = RGBImage(bytes(64 * 64 * 3), 64, 64)
            n = max(c.n_tokens for c in projector.tokenize_parts([probe]) if isinstance(c, ImageChunk))
            if n > config.batch:
                projector.close()
                raise LlamaError(
                    f"the projector {config.mmproj} decodes each image ({n} tokens) in one batch: "
                    f"use --batch {n} or more"
                )
        return projector

    @property
    def vision(self) -> bool:
        """Whether the model takes images: a projector is loaded."""
        return self.projector is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.engine.start(loop)

    def close(self) -> None:
        self.engine.stop()
        if self.projector is not None:
            self.projector.close()  # tokenizes with the model's vocabulary: before the model goes
        self.llama.close()
