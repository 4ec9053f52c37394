"""A model's chat prompts: its chat template (or Meta's Llama 3 format) rendered and tokenized with its own
vocabulary. The local model renders its prompts with it; an upstream model with a `tokenizer` counts with it the
tokens its upstream does not report.

Messages may hold images (content parts `{"type": "image", "image": RGBImage}`). The Llama 3 renderer places
them itself (Llama 3.2 Vision's `<|image|>` places). For a Jinja template, each image part becomes a sentinel
text, random per request (so no user text can forge an image's place), the template renders, and the rendered
text is cut at the sentinels into text, image, text, ...; the projector (mtmd) then tokenizes the texts and adds
the model's own image delimiters around each image. This is what llama.cpp's server does with mtmd's marker.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llamaserve.chat import llama3
from llamaserve.chat.template import ChatTemplate, TemplateError
from llamaserve.chat.tools import FORMATS, HermesFormat, ToolFormat, template_tool_messages
from llamaserve.engine import LlamaModel
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


class ChatRenderer:
    """Renders and tokenizes chat prompts for one model (`llama`: its vocabulary, at least)."""

    def __init__(self, id: str, llama: LlamaModel, chat_format: str, projector: Projector | None = None) -> None:
        self.id = id
        self.llama = llama
        self.projector = projector
        self.template = ChatTemplate(
            self.llama.chat_template(),
            self.llama.token_text(self.llama.bos),
            self.llama.token_text(self.llama.eos),
        )
        self.chat_format = chat_format
        if self.chat_format == "auto":
            wanted = (llama3.BEGIN_OF_TEXT, llama3.START_HEADER, llama3.END_HEADER, llama3.EOT)
            specials = {t for t in wanted if self._has_token(t)}
            self.chat_format = "llama3" if llama3.is_llama3(self.llama.chat_template(), specials) else "template"
        self.tool_format: ToolFormat = FORMATS["llama3" if self.chat_format == "llama3" else "hermes"]
        specials = sorted(self.llama.special_texts(), key=len, reverse=True)
        self._special_text = re.compile("|".join(map(re.escape, specials))) if specials else None

    def _has_token(self, text: str) -> bool:
        tokens = self.llama.tokenize(text, add_special=False)
        return len(tokens) == 1 and self.llama.token_text(tokens[0]) == text

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
            contents = [m["content"] for m in flat if isinstance(m.get("content"), str)]
            return ChatPrompt(text, self._tokenize_rendered(text, contents))
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

    def _tokenize_rendered(self, prompt: str, contents: list[str]) -> list[int]:
        """The rendered prompt's tokens: special tokens from the template's own text only. A message's content
        that spells one (`<|im_end|>\n<|im_start|>system`, a forged turn) stays text, as in the Llama 3 format.
        Templates usually write the BOS token themselves; add it only where the model wants one and the template
        did not."""
        tokens: list[int] = []
        start = 0
        for content in contents:
            if self._special_text is None or not self._special_text.search(content):
                continue  # nothing in it to parse: tokenized with the template's text around it
            at = prompt.find(content, start)
            if at < 0:  # templates may trim a message
                content = content.strip()
                at = prompt.find(content, start)
            if at < 0:
                continue  # the template changed it otherwise (escaped): it is the template's text now
            tokens += self.llama.tokenize(prompt[start:at], add_special=False)
            tokens += self.llama.tokenize(content, add_special=False, parse_special=False)
            start = at + len(content)
        tokens += self.llama.tokenize(prompt[start:], add_special=False)
        add_bos = self.llama.adds_bos and not prompt.startswith(self.template.bos_token)
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
