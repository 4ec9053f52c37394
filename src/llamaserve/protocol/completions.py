"""POST /v1/completions (OpenAI's legacy text completions)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from llamaserve.protocol.common import LegacyLogprobs, SamplingFields, Usage
from llamaserve.protocol.validation import Text

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: (
        Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    )
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: Text | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = Field(description="stop or length; null while a stream goes on")
    logprobs: LegacyLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One `data:` event of a streamed completion; the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(
        default=None, description="With stream_options.include_usage: null on every chunk but the last."
    )
