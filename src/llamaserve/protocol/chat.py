"""POST /v1/chat/completions: request and response shapes (OpenAI's, as the seed documents show them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, field_validator

from llamaserve.protocol.common import LegacyLogprobs, SamplingFields, StrictModel, Usage
from llamaserve.protocol.validation import JSONSchema, StoredText, Text, json_size_at_most, unsupported

# Accepted and ignored: such a field is never serialized, so it reaches no upstream engine either.
IGNORED = Field(default=None, exclude=True)


class CacheControl(StrictModel):
    """A prompt-caching hint (Anthropic's, sent through LiteLLM and others): accepted and ignored, since the
    prefix cache here needs none."""

    type: Literal["ephemeral"]
    ttl: Annotated[str, Field(max_length=16)] | None = None


class TextPart(StrictModel):
    type: Literal["text"]
    text: Text
    cache_control: CacheControl | None = IGNORED


class ImageURL(StrictModel):
    url: Text
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(StrictModel):
    type: Literal["image_url"]
    image_url: ImageURL
    cache_control: CacheControl | None = IGNORED


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]

# Counts a request may hold: each item costs rendering and tokenizing whatever its size (40,000 empty messages
# stalled the server for 18 s). OpenAI allows 128 tools; the others leave room for any real conversation.
DEFAULT_CHAT_MAX_TOKENS = 512  # as the seed documents: what an upstream is sent when a request gives none
MAX_MESSAGES = 2048
MAX_PARTS = 256  # content parts of one message
MAX_TOOLS = 128
MAX_TOOL_CALLS = 128  # tool calls of one message
# All tools together, as JSON: each distinct schema is checked against the meta-schema (~4 ms a KiB), rendered
# into the prompt and perhaps compiled into a grammar. 128 tools of 2 KiB each fit.
MAX_TOOLS_BYTES = 256 * 1024


class FunctionCall(StrictModel):
    name: Text
    arguments: Text


class ToolCall(StrictModel):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    # "developer" is OpenAI's newer name for the system role: read as "system" (see _developer_is_system).
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)] | None = None
    name: Text | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOL_CALLS)] | None = None
    tool_call_id: Text | None = None
    # What an SDK's response message carries when sent back as history (`message.model_dump()`): accepted and
    # ignored; a legacy function call or audio that would have to be honoured is refused.
    refusal: Text | None = IGNORED
    annotations: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOL_CALLS)] | None = IGNORED
    audio: unsupported("audio in messages: this server has no audio") = None  # type: ignore[valid-type]
    function_call: unsupported("a legacy function_call in messages: send tool_calls") = None  # type: ignore[valid-type]

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, role: str) -> str:
        """One name for the system role from here on: templates, formats and upstream engines know "system"."""
        return "system" if role == "developer" else role

    def text(self) -> str:
        """The message's text: a string as is, text parts joined by newlines."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(p, ImagePart) for p in self.content)


class JSONSchemaFormat(StrictModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
    description: Text | None = None
    schema_: JSONSchema | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDefinition(StrictModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")]
    description: Text | None = None
    parameters: JSONSchema | None = None
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictModel):
    name: Text


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionName


ToolList = Annotated[
    list[Tool], Field(max_length=MAX_TOOLS), BeforeValidator(json_size_at_most(MAX_TOOLS_BYTES, "the tools"))
]


# OpenAI's metadata bounds: 16 pairs, keys of 64 characters, values of 512.
Metadata = Annotated[
    dict[Annotated[StoredText, Field(max_length=64)], Annotated[StoredText, Field(max_length=512)]],
    Field(max_length=16),
]


class IgnoredFields(StrictModel):
    """OpenAI request fields that would not change the output here: accepted (within OpenAI's own bounds), and
    not forwarded to upstream engines. docs/api.md: "Request fields"."""

    store: bool | None = IGNORED
    metadata: Metadata | None = IGNORED
    service_tier: Annotated[str, Field(max_length=32)] | None = IGNORED
    prompt_cache_key: Annotated[Text, Field(max_length=1024)] | None = IGNORED
    safety_identifier: Annotated[Text, Field(max_length=256)] | None = IGNORED
    verbosity: Literal["low", "medium", "high"] | None = IGNORED


class ChatCompletionRequest(SamplingFields, IgnoredFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    tools: ToolList | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, strict=True)] | None = None
    modalities: Annotated[list[Literal["text"]], Field(max_length=2)] | None = None  # text is what we write
    # OpenAI fields that would change the output, and that no model here honours:
    reasoning_effort: unsupported("reasoning_effort: the models here do not reason in hidden steps") = None  # type: ignore[valid-type]
    audio: unsupported("audio output: this server writes text only") = None  # type: ignore[valid-type]
    functions: unsupported("the legacy functions: send tools") = None  # type: ignore[valid-type]
    function_call: unsupported("the legacy function_call: send tool_choice") = None  # type: ignore[valid-type]
    web_search_options: unsupported("web search: no model here searches the web") = None  # type: ignore[valid-type]


class PathChatRequest(ChatCompletionRequest):
    """Segmind's form (`POST /v1/llama-v3p1-405b-instruct`): the path names the model, so the body needs none; a
    `model` in the body must name the same."""

    model: Text | None = None  # type: ignore[assignment]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = []


FINISH_REASON = "stop, length or tool_calls (an upstream engine may name others); null while a stream goes on"


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None = Field(description=FINISH_REASON)
    logprobs: ChatLogprobs | None = None


class EchoedPrompt(BaseModel):
    """The rendered prompt, with `echo` (Together's extension)."""

    text: str
    logprobs: LegacyLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt: list[EchoedPrompt] | None = Field(default=None, description="Only with echo.")


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed tool call: the first delta of a call has its id, type and name, later ones argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = Field(default=None, description=FINISH_REASON)
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion; the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(
        default=None, description="With stream_options.include_usage: null on every chunk but the last."
    )
    prompt: list[EchoedPrompt] | None = Field(default=None, description="Only with echo, in a chunk of its own.")
