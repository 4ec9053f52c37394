"""POST /v1/completions (OpenAI's legacy text completions)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from llamaserve.protocol.common import LegacyLogprobs, SamplingFields, Usage
from llamaserve.protocol.validation import Text

# Choices in one request: n for each prompt. Each is a sequence in the engine's queue, and the prompts are
# tokenized before any runs; a list of prompts without a bound made one request a flood.
MAX_CHOICES = 128
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for the legacy endpoint
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# The validator below gives the message; json_schema_extra tells the spec (a lone prompt of token ids may be long).
PromptList = Field(min_length=1, json_schema_extra={"maxItems": MAX_CHOICES})
Prompt = Text | Annotated[list[Text], PromptList] | TokenIds | Annotated[list[TokenIds], PromptList]


def prompt_list(prompt: Prompt) -> list[str | list[int]]:
    """A prompt field as a list of prompts, each text or token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(x, int) for x in prompt):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    # 0 scores the prompt (with echo and logprobs: every prompt token's logprob, as eval harnesses ask).
    max_tokens: Annotated[int, Field(ge=0, strict=True)] | None = None
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: Text | None = None

    @field_validator("prompt")
    @classmethod
    def _bounded_choices(cls, v: Prompt, info: ValidationInfo) -> Prompt:
        count, n = len(prompt_list(v)), info.data.get("n", 1)
        if count > MAX_CHOICES:
            raise ValueError(f"at most {MAX_CHOICES} prompts are allowed in one request, got {count}")
        if n * count > MAX_CHOICES:
            raise ValueError(f"n × the number of prompts may be at most {MAX_CHOICES}, got {n} × {count}")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each text or token ids."""
        return prompt_list(self.prompt)


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
