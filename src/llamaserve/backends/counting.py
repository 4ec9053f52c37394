"""Token counts for an upstream model whose engine reports none (llama-cpp-python's server streams no usage; a
stream broken midway never gets to it).

With the model's own vocabulary (the registry's `tokenizer`, a GGUF) the counts are exact: the prompt is
rendered as that model renders it (its chat template, or Meta's Llama 3 format) and tokenized; the completion is
the delivered text (tool-call names and arguments included), tokenized. Without one they are estimated at 4 bytes
of text a token (plus a template's few tokens a message), and marked as estimates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from llamaserve.backends.renderer import ChatRenderer
from llamaserve.chat.llama3 import Llama3FormatError
from llamaserve.chat.template import TemplateError
from llamaserve.engine import LlamaModel

PER_MESSAGE_OVERHEAD = 8  # tokens a chat template adds around each message (role headers, end markers)
IMAGE_TOKEN_BOUND = 6404  # tokens an image may take: Llama 3.2 Vision's 4 tiles × 1601
BYTES_PER_TOKEN = 4


@dataclass(frozen=True)
class Count:
    tokens: int
    estimated: bool


class TokenCounter:
    """Counts one upstream model's tokens: exactly with `renderer` (its vocabulary), else by estimate."""

    def __init__(self, renderer: ChatRenderer | None = None) -> None:
        self.renderer = renderer

    @classmethod
    def load(cls, model_id: str, tokenizer: str | None, chat_format: str) -> TokenCounter:
        """Raises LlamaError when the tokenizer's GGUF does not load."""
        if tokenizer is None:
            return cls()
        return cls(ChatRenderer(model_id, LlamaModel(tokenizer, None), chat_format))

    def prompt(self, payload: dict[str, Any]) -> Count:
        """The prompt's tokens of a chat (`messages`) or completions (`prompt`) request body."""
        if self.renderer is not None:
            exact = self._exact_prompt(payload)
            if exact is not None:
                return Count(exact, False)
        text, other = prompt_size(payload)
        return Count(math.ceil(text / BYTES_PER_TOKEN) + other, True)

    def completion(self, texts: list[str]) -> Count:
        """The tokens of each choice's delivered text (content, or tool-call names and arguments)."""
        if self.renderer is not None:
            tokenize = self.renderer.llama.tokenize  # delivered text is text: no special tokens parsed in it
            return Count(sum(len(tokenize(t, add_special=False, parse_special=False)) for t in texts if t), False)
        return Count(sum(math.ceil(len(t.encode()) / BYTES_PER_TOKEN) for t in texts), True)

    def _exact_prompt(self, payload: dict[str, Any]) -> int | None:
        """None where the vocabulary alone cannot count it (images)."""
        assert self.renderer is not None
        if "messages" not in payload:
            return sum(len(self._prompt_tokens(p)) for p in _prompts(payload.get("prompt")))
        messages = [_message(m) for m in payload["messages"]]
        if any(m is None for m in messages):
            return None
        choice = payload.get("tool_choice")
        if isinstance(choice, dict):
            choice = (choice.get("function") or {}).get("name")
        tools = payload.get("tools") if choice != "none" else None
        try:
            rendered = self.renderer.render_chat(messages, True, tools or None, choice if tools else None)
        except (TemplateError, Llama3FormatError):
            return None
        return len(rendered.tokens)

    def _prompt_tokens(self, prompt: str | list[int]) -> list[int]:
        assert self.renderer is not None
        return list(prompt) if isinstance(prompt, list) else self.renderer.tokenize_text(prompt)

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.llama.close()


def _prompts(prompt: Any) -> list[str | list[int]]:
    """A completions prompt's forms (a string, strings, token ids, lists of token ids) as a list of prompts."""
    if prompt is None:
        return [""]
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    return list(prompt)


def _message(message: dict[str, Any]) -> dict[str, Any] | None:
    """An OpenAI message as the renderers take it; None for one with an image."""
    content = message.get("content")
    if isinstance(content, list):
        if any(part.get("type") != "text" for part in content):
            return None
        content = [{"type": "text", "text": part.get("text") or ""} for part in content]
    out = {"role": message["role"], "content": content if content is not None else ""}
    for key in ("name", "tool_calls", "tool_call_id"):
        if message.get(key) is not None:
            out[key] = message[key]
    return out


def prompt_size(payload: dict[str, Any]) -> tuple[int, int]:
    """(bytes of text, tokens of the rest: each message's template overhead, images) of a prompt."""
    messages = payload.get("messages")
    if messages is None:
        return len(json.dumps(payload.get("prompt") or "", ensure_ascii=False).encode()), PER_MESSAGE_OVERHEAD * 2
    text, other = json_bytes(payload.get("tools")), 0
    for message in messages:
        other += PER_MESSAGE_OVERHEAD
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
        for part in parts:
            if part.get("type") == "image_url":
                other += IMAGE_TOKEN_BOUND
            else:
                text += len((part.get("text") or "").encode())
        text += json_bytes(message.get("tool_calls"))
    return text, other


def json_bytes(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode()) if value else 0
