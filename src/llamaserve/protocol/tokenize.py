"""POST /tokenize and POST /detokenize, as vLLM has them."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from llamaserve.protocol.chat import MAX_MESSAGES, ChatMessage, ToolList
from llamaserve.protocol.common import StrictModel
from llamaserve.protocol.validation import Text


class TokenizeRequest(StrictModel):
    model: Text | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    tools: ToolList | None = None  # rendered into the prompt as a chat completion with these tools would be
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


MAX_DETOKENIZE_TOKENS = 1 << 20  # past any context a model here has


class DetokenizeRequest(StrictModel):
    model: Text | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_DETOKENIZE_TOKENS)]


class DetokenizeResponse(BaseModel):
    prompt: str
