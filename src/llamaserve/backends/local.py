"""A model served in this process: the GGUF, its engine, its chat template and tokenizer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaserve.chat import llama3
from llamaserve.chat.template import ChatTemplate
from llamaserve.chat.tools import FORMATS, HermesFormat, ToolFormat, template_tool_messages
from llamaserve.config import ServeConfig, resolve_model
from llamaserve.engine import ContextConfig, Engine, LlamaModel


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    tokens: list[int]


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
        self.chat_format = config.chat_format
        if self.chat_format == "auto":
            wanted = (llama3.BEGIN_OF_TEXT, llama3.START_HEADER, llama3.END_HEADER, llama3.EOT)
            specials = {t for t in wanted if self._has_token(t)}
            self.chat_format = "llama3" if llama3.is_llama3(self.llama.chat_template(), specials) else "template"
        self.tool_format: ToolFormat = FORMATS["llama3" if self.chat_format == "llama3" else "hermes"]

    def _has_token(self, text: str) -> bool:
        tokens = self.llama.tokenize(text, add_special=False)
        return len(tokens) == 1 and self.llama.token_text(tokens[0]) == text

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.engine.start(loop)

    def close(self) -> None:
        self.engine.stop()
        self.llama.close()

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | None = None,
    ) -> ChatPrompt:
        """The prompt for `messages` (OpenAI dicts), offering `tools` (OpenAI tool dicts) if given; tool_choice is
        "auto", "required" or a function's name. Raises TemplateError or Llama3FormatError for bad dialogs."""
        if self.chat_format == "llama3":
            # Meta's format, tokenized piece by piece as its reference does: text that spells a special token
            # stays text, and pieces never merge across message boundaries.
            segments = llama3.render_llama3_segments(messages, tools, add_generation_prompt, tool_choice=tool_choice)
            tokens = llama3.tokenize_segments(
                segments, lambda text, special: self.llama.tokenize(text, add_special=False, parse_special=special)
            )
            return ChatPrompt("".join(s.text for s in segments), tokens)
        if self.template.renders_tools:
            text = self.template.render(template_tool_messages(messages), add_generation_prompt, tools)
        else:
            assert isinstance(self.tool_format, HermesFormat)
            text = self.template.render(self.tool_format.inline_messages(messages, tools), add_generation_prompt)
        return ChatPrompt(text, self._tokenize_rendered(text))

    def _tokenize_rendered(self, prompt: str) -> list[int]:
        """Templates usually write the BOS token themselves; add it only where the model wants one and the
        template did not."""
        add_bos = self.llama.adds_bos and not prompt.startswith(self.template.bos_token)
        tokens = self.llama.tokenize(prompt, add_special=False)
        return [self.llama.bos, *tokens] if add_bos else tokens

    def tokenize_text(self, text: str, add_special: bool = True) -> list[int]:
        return self.llama.tokenize(text, add_special=add_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llama.detokenize(tokens, special=True)
