"""A model served in this process: the GGUF, its engine, its chat template and tokenizer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamaserve.chat.template import ChatTemplate
from llamaserve.config import ServeConfig, resolve_model
from llamaserve.engine import ContextConfig, Engine, LlamaModel


class LocalModel:
    def __init__(self, config: ServeConfig, on_progress: Callable[[float], None] | None = None) -> None:
        path, file_id = resolve_model(config.model)
        self.path: Path = path
        self.id = config.model_id or file_id
        self.config = config
        self.llama = LlamaModel(
            str(path),
            ContextConfig(
                n_ctx_seq=config.ctx, n_seq_max=config.parallel, n_batch=config.batch, n_threads=config.threads
            ),
            on_progress=on_progress,
        )
        self.engine = Engine(self.llama, max_waiting=config.max_queue)
        self.template = ChatTemplate(
            self.llama.chat_template(),
            self.llama.token_text(self.llama.bos),
            self.llama.token_text(self.llama.eos),
        )
        self.max_model_len = self.engine.max_model_len

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.engine.start(loop)

    def close(self) -> None:
        self.engine.stop()
        self.llama.close()

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self.template.render(messages, add_generation_prompt=add_generation_prompt)

    def tokenize_chat_prompt(self, prompt: str) -> list[int]:
        """Templates usually write the BOS token themselves; add it only where the model wants one and the
        template did not."""
        add_bos = self.llama.adds_bos and not prompt.startswith(self.template.bos_token)
        tokens = self.llama.tokenize(prompt, add_special=False)
        return [self.llama.bos, *tokens] if add_bos else tokens

    def tokenize_text(self, text: str, add_special: bool = True) -> list[int]:
        return self.llama.tokenize(text, add_special=add_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llama.detokenize(tokens, special=True)
