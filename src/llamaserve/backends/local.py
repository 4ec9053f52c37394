"""A model served in this process: the GGUF, its vision projector if any, its engine, its chat template and
tokenizer.

Messages may hold images (content parts `{"type": "image", "image": RGBImage}`). The Llama 3 renderer places
them itself (Llama 3.2 Vision's `<|image|>` places). For a Jinja template, each image part becomes a sentinel
text, random per request (so no user text can forge an image's place), the template renders, and the rendered
text is cut at the sentinels into text, image, text, ...; the projector (mtmd) then tokenizes the texts and adds
the model's own image delimiters around each image. This is what llama.cpp's server does with mtmd's marker.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaserve.chat import llama3
from llamaserve.chat.template import ChatTemplate, TemplateError
from llamaserve.chat.tools import FORMATS, HermesFormat, ToolFormat, template_tool_messages
from llamaserve.config import ServeConfig, resolve_model
from llamaserve.engine import ContextConfig, Engine, LlamaError, LlamaModel
from llamaserve.engine.metrics import EngineMetrics
from llamaserve.engine.mtmd import Chunk, ImageChunk, Projector, RGBImage


@dataclass(frozen=True)
class ChatPrompt:
    text: str  # images shown as the projector's marker (or, in the Llama 3 format, as <|image|>)
    tokens: list[int]  # a text prompt's tokens; empty when the prompt has images
    chunks: list[Chunk] = field(default_factory=list)  # a prompt with images: token lists and images, in order

    @property
    def engine_input(self) -> list[int] | list[Chunk]:
        return self.chunks if self.chunks else self.tokens

    @property
    def n_tokens(self) -> int:
        """Prompt tokens as usage counts them: text tokens and every image's embedding tokens."""
        if not self.chunks:
            return len(self.tokens)
        return sum(c.n_tokens if isinstance(c, ImageChunk) else len(c) for c in self.chunks)


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
        try:
            self.projector = self._load_projector(config)
        except BaseException:
            self.llama.close()
            raise
        self.engine = Engine(
            self.llama, max_waiting=config.max_queue, projector=self.projector, metrics=EngineMetrics(self.id)
        )
        self.template = ChatTemplate(
            self.llama.chat_template(),
            self.llama.token_text(self.llama.bos),
            self.llama.token_text(self.llama.eos),
        )
        self.max_model_len = self.engine.max_model_len
        # Byte-level BPE and SentencePiece pieces put together give back the prompt, so a prompt of B bytes is
        # at least B / (longest piece) tokens: one beyond this many bytes cannot fit the context whatever its
        # text, and is refused by its size before it is rendered or tokenized (a 10 MB message took 40 s).
        self.max_prompt_bytes = self.max_model_len * self.llama.max_bytes_per_token()
        self.chat_format = config.chat_format
        if self.chat_format == "auto":
            wanted = (llama3.BEGIN_OF_TEXT, llama3.START_HEADER, llama3.END_HEADER, llama3.EOT)
            specials = {t for t in wanted if self._has_token(t)}
            self.chat_format = "llama3" if llama3.is_llama3(self.llama.chat_template(), specials) else "template"
        self.tool_format: ToolFormat = FORMATS["llama3" if self.chat_format == "llama3" else "hermes"]

    def _load_projector(self, config: ServeConfig) -> Projector | None:
        if config.mmproj is None:
            return None
        projector = Projector(config.mmproj, self.llama.model, n_threads=config.threads)
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

    def _has_token(self, text: str) -> bool:
        tokens = self.llama.tokenize(text, add_special=False)
        return len(tokens) == 1 and self.llama.token_text(tokens[0]) == text

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.engine.start(loop)

    def close(self) -> None:
        self.engine.stop()
        if self.projector is not None:
            self.projector.close()  # tokenizes with the model's vocabulary: before the model goes
        self.llama.close()

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | None = None,
    ) -> ChatPrompt:
        """The prompt for `messages` (OpenAI dicts; content a string or a list of text and image parts), offering
        `tools` (OpenAI tool dicts) if given; tool_choice is "auto", "required" or a function's name. Raises
        TemplateError or Llama3FormatError for bad dialogs (and for images, to a model without a projector)."""
        if self.projector is None and any(_images_of(m) for m in messages):
            raise TemplateError(f"model {self.id} does not accept image input")
        if self.chat_format == "llama3":
            return self._render_llama3(messages, add_generation_prompt, tools, tool_choice)
        sentinel = f"<llamaserve-image-{secrets.token_hex(12)}-"  # then the image's index and ">"
        images: list[RGBImage] = []
        flat = [_flatten(m, sentinel, images) for m in messages]
        if self.template.renders_tools:
            flat = template_tool_messages(flat)
        else:
            assert isinstance(self.tool_format, HermesFormat)
            flat = self.tool_format.inline_messages(flat, tools)
            tools = None
        if self.template.typed_content:  # a template that prints only content parts (SmolVLM's)
            flat = [{**m, "content": [{"type": "text", "text": m["content"]}]} if m.get("content") else m for m in flat]
        text = self.template.render(flat, add_generation_prompt, tools)
        if not images:
            return ChatPrompt(text, self._tokenize_rendered(text))
        return self._split_at_images(text, sentinel, images)

    def _render_llama3(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None,
        tool_choice: str | None,
    ) -> ChatPrompt:
        # Meta's format, tokenized piece by piece as its reference does: text that spells a special token stays
        # text, and pieces never merge across message boundaries.
        segments = llama3.render_llama3_segments(messages, tools, add_generation_prompt, tool_choice=tool_choice)

        def tokenize(text: str, special: bool) -> list[int]:
            return self.llama.tokenize(text, add_special=False, parse_special=special)

        text = "".join(s.text for s in segments)
        if not any(s.image is not None for s in segments):
            return ChatPrompt(text, llama3.tokenize_segments(segments, tokenize))
        assert self.projector is not None
        chunks: list[Chunk] = []
        for segment in segments:
            if segment.image is None:
                chunks.append(llama3.tokenize_segments([segment], tokenize))
            else:  # the image where Llama 3.2 Vision has <|image|>, with the projector's delimiters if any
                chunks += self.projector.tokenize_parts([segment.image["image"]])
        return ChatPrompt(text, [], _merge_text(chunks))

    def _split_at_images(self, text: str, sentinel: str, images: list[RGBImage]) -> ChatPrompt:
        """The rendered text cut at the sentinels into text, image, text, ..., tokenized by the projector."""
        assert self.projector is not None
        pieces = re.split(re.escape(sentinel) + r"(\d+)>", text)
        parts: list[str | RGBImage] = [pieces[0]]
        for index, after in zip(pieces[1::2], pieces[2::2], strict=True):
            parts += [images[int(index)], after]
        if len(set(pieces[1::2])) != len(images):
            raise TemplateError("the model's chat template dropped an image of the conversation")
        chunks = self.projector.tokenize_parts(parts)
        if self.llama.adds_bos and not text.startswith(self.template.bos_token):
            chunks.insert(0, [self.llama.bos])
        marker = self.projector.marker
        shown = re.sub(re.escape(sentinel) + r"\d+>", lambda _: marker, text)
        return ChatPrompt(shown, [], _merge_text(chunks))

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


def _images_of(message: Mapping[str, Any]) -> list[Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [p for p in content if isinstance(p, Mapping) and p.get("type") == "image"]


def _flatten(message: dict[str, Any], sentinel: str, images: list[RGBImage]) -> dict[str, Any]:
    """The message with its content as one string, as templates read it: text parts joined by newlines (as
    llama.cpp joins them), each image part a sentinel naming the image's index in `images`."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        if part.get("type") == "image":
            texts.append(f"{sentinel}{len(images)}>")
            images.append(part["image"])
        else:
            texts.append(part["text"])
    return {**message, "content": "\n".join(texts)}


def _merge_text(chunks: list[Chunk]) -> list[Chunk]:
    """Adjacent token lists joined into one, empty ones dropped."""
    out: list[Chunk] = []
    for chunk in chunks:
        if isinstance(chunk, ImageChunk):
            out.append(chunk)
        elif chunk:
            if out and not isinstance(out[-1], ImageChunk):
                out[-1] = out[-1] + chunk
            else:
                out.append(list(chunk))
    return out
