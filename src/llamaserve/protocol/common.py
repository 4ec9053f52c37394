"""Request fields shared by chat and text completions, and how they become engine sampling parameters."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llamaserve.engine import SamplingParams
from llamaserve.protocol.validation import Text

MAX_STOP_SEQUENCES = 4
# ASCII digits only (str.isdigit() also takes '²', which int() refuses), and few of them: a 5,000-digit key is past
# int()'s limit, and no vocabulary has 10^10 tokens.
TOKEN_ID = re.compile(r"-?[0-9]{1,10}")


class StrictModel(BaseModel):
    """Unknown fields are an error that names them, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingFields(StrictModel):
    model: Text
    # Strict: "2" and true are not token counts (lax parsing read them as 2 and 1).
    max_tokens: Annotated[int, Field(ge=1, strict=True)] | None = None
    # The validators below give the messages; json_schema_extra tells the spec the same rules (keywords next to
    # anyOf constrain only the branch they can apply to: maxItems arrays, propertyNames objects).
    stop: Annotated[
        Text | list[Text] | None,
        Field(json_schema_extra={"maxItems": MAX_STOP_SEQUENCES, "items": {"type": "string", "minLength": 1}}),
    ] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=128, strict=True)] = 1
    seed: int | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: Annotated[
        dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None,
        Field(json_schema_extra={"propertyNames": {"pattern": f"^{TOKEN_ID.pattern}$"}}),
    ] = None
    user: Text | None = None
    # Extension (as vLLM and llama.cpp's server have it): keep generating past end-of-sequence tokens.
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if len(v) > MAX_STOP_SEQUENCES:
                raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
            if any(not s for s in v):
                raise ValueError("stop sequences must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            seed=self.seed,
            stop=self.stop_list(),
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# --- response parts shared by chat and text completions --------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens served from the prefix cache.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class LegacyLogprobs(BaseModel):
    """Logprobs in the shape of OpenAI's legacy completions (also chat `echo`'s prompt logprobs)."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first prompt token (nothing before it)")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]
