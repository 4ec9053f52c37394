"""Llama 3.1 fidelity: our prompts and tool-call parsing against Meta's own packages, token for token.

Oracles (test-only dependencies, imported unconditionally: a missing one fails the tests, it never skips them):
- llama-models: the real Llama 3 tokenizer (tiktoken, 128k vocabulary), `ChatFormat.encode_dialog_prompt` and
  `decode_assistant_message_from_content`;
- llama-stack 0.2.x: how a chat request with tools becomes Llama 3.1 messages (`chat_completion_request_to_messages`
  -> `augment_messages_for_tools_llama_3_1`: system prompt with the date header and built-in tools, custom tools
  in a user message), and its OpenAI adapter (`openai_messages_to_messages`, `_convert_openai_request_tools`).

The prompts are tokenized by llama.cpp itself, on a tiny random-weight GGUF with the real Llama 3 vocabulary
(tests/tiny_llama3.py), the way the engine tokenizes them.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import warnings
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from llama_models.datatypes import RawMessage as MetaRawMessage
    from llama_models.datatypes import StopReason, ToolPromptFormat
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer
    from llama_stack.apis.inference import ChatCompletionRequest, CompletionMessage, OpenAIMessageParam
    from llama_stack.models.llama.datatypes import StopReason as StackStopReason
    from llama_stack.models.llama.llama3.prompt_templates import system_prompts
    from llama_stack.providers.utils.inference.openai_compat import (
        _convert_openai_request_tool_config,
        _convert_openai_request_tools,
        openai_messages_to_messages,
    )
    from llama_stack.providers.utils.inference.prompt_adapter import (
        chat_completion_request_to_messages,
        convert_request_to_raw,
    )
    from pydantic import TypeAdapter

from llamaserve.chat.llama3 import (
    EOT,
    Llama3FormatError,
    Segment,
    is_llama3,
    parse_llama3_tool_calls,
    render_llama3,
    render_llama3_segments,
    tokenize_segments,
)
from llamaserve.config import embedded_model_path
from llamaserve.engine.llama import ContextConfig, LlamaModel
from tests.data.llama3_dialogs import DIALOGS, WEATHER
from tests.tiny_llama3 import tiny_llama3_gguf

TODAY = datetime.date(2024, 9, 21)
LLAMA_STACK_MODEL = "Llama3.1-8B-Instruct"  # llama-stack picks the Llama 3.1 tool format from the model family


@pytest.fixture(scope="module")
def meta_tokenizer() -> Tokenizer:
    return Tokenizer.get_instance()


@pytest.fixture(scope="module")
def meta_format(meta_tokenizer: Tokenizer) -> ChatFormat:
    return ChatFormat(meta_tokenizer)


@pytest.fixture(scope="module")
def model() -> Iterator[LlamaModel]:
    m = LlamaModel(str(tiny_llama3_gguf()), ContextConfig(n_ctx_seq=2048, n_seq_max=1, n_batch=256, n_threads=2))
    yield m
    m.close()


class _FixedDatetime(datetime.datetime):
    day_to_use = TODAY

    @classmethod
    def now(cls, tz: Any = None) -> _FixedDatetime:  # llama-stack's SystemDefaultGenerator asks for now()
        d = cls.day_to_use
        return cls(d.year, d.month, d.day, 12, 0)


@pytest.fixture
def fixed_today(monkeypatch: pytest.MonkeyPatch) -> datetime.date:
    monkeypatch.setattr(system_prompts, "datetime", _FixedDatetime)
    return TODAY


# --- the oracle ------------------------------------------------------------------------------------------------


def meta_dialog_tokens(case: dict[str, Any], chat_format: ChatFormat) -> list[int]:
    """Meta's tokens for an OpenAI-style request: llama-stack's OpenAI adapter and Llama 3.1 augmentation,
    then llama_models' ChatFormat.encode_dialog_prompt (JSON tool prompt format, llama-stack's default for 3.1).

    Three choices of ours, where llama-stack's OpenAI path loses information its native API keeps:
    - an assistant message with tool calls ends with <|eom_id|> (stop_reason end_of_message), as the model ended
      it and as Meta's own 3.1 examples encode it; the adapter marks every assistant message end_of_turn;
    - a parameter is required iff the JSON schema lists it in `required`; the adapter marks all required;
    - text parts of a system message are joined with newlines (see below).
    """
    openai_messages = []
    for m in case["messages"]:
        m = dict(m)
        if m.get("content") is None:  # the adapter cannot convert OpenAI's null content of tool-call messages
            m["content"] = ""
        if m["role"] == "system" and isinstance(m["content"], list):
            # augment_messages_for_tools_llama_3_1 prints text parts of a system message as "<media>" (it only
            # knows str parts); its 3.2+ sibling joins them with "\n" (interleaved_content_as_str), as we do.
            m["content"] = "\n".join(part["text"] for part in m["content"])
        openai_messages.append(TypeAdapter(OpenAIMessageParam).validate_python(m))
    messages = openai_messages_to_messages(openai_messages)
    for m in messages:
        if isinstance(m, CompletionMessage) and m.tool_calls:
            m.stop_reason = StackStopReason.end_of_message

    tools = _convert_openai_request_tools(case.get("tools"))
    for definition, openai_tool in zip(tools, case.get("tools") or [], strict=True):
        required = (openai_tool["function"].get("parameters") or {}).get("required") or []
        for name, param in (definition.parameters or {}).items():
            param.required = name in required
    tool_config = _convert_openai_request_tool_config(case.get("tool_choice"))
    if case.get("tool_choice") == "none":
        tools = []

    request = ChatCompletionRequest(model=LLAMA_STACK_MODEL, messages=messages, tools=tools, tool_config=tool_config)
    request.messages = chat_completion_request_to_messages(request, LLAMA_STACK_MODEL)
    raw = asyncio.run(convert_request_to_raw(request))
    dialog = [MetaRawMessage.model_validate(m.model_dump(mode="json")) for m in raw.messages]
    return chat_format.encode_dialog_prompt(dialog, ToolPromptFormat.json).tokens


def llama_cpp_tokens(model: LlamaModel, segments: list[Segment]) -> list[int]:
    return tokenize_segments(segments, lambda text, special: model.tokenize(text, False, parse_special=special))


def render(case: dict[str, Any], **kw: Any) -> list[Segment]:
    return render_llama3_segments(case["messages"], case.get("tools"), tool_choice=case.get("tool_choice"), **kw)


CASES = [pytest.param(case, id=case["id"]) for case in DIALOGS]


def test_corpus_covers_the_cases() -> None:
    assert len(DIALOGS) >= 20
    ids = [c["id"] for c in DIALOGS]
    assert len(set(ids)) == len(ids)
    roles = {m["role"] for c in DIALOGS for m in c["messages"]}
    assert roles == {"system", "user", "assistant", "tool"}
    called = {tc["function"]["name"] for c in DIALOGS for m in c["messages"] for tc in m.get("tool_calls") or []}
    assert {"get_weather", "brave_search", "wolfram_alpha", "code_interpreter"} <= called
    assert any(c.get("tools") and not any(m["role"] == "system" for m in c["messages"]) for c in DIALOGS)


# --- (a) the GGUF's tokenizer is Meta's --------------------------------------------------------------------------

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces\n\n\ttabs\t\tand   runs of    spaces  ",
    "naïve café — 日本語のテキスト, 한국어, ภาษาไทย 🤖🎉👩‍👩‍👧",
    "12345678901 3.14159 1,000,000 -42 1e-9 0x1F",
    "def f(x):\n    return x**2  # square\n\nclass A:\n\tpass\n",
    "I'm here, you're there; they'll've gone. DON'T SHOUT'S",
    "<|eot_id|> and <|start_header_id|> as plain text",
    "\n\n\n",
    " ",
    "ﬁ ǅ Ⅻ ① ２３４ ¼",
    "a" * 300 + " " + "\u00a0\u2003x\u200b",
    "\r\n\r\nwindows\r\nlines",
    "Ἀθῆναι Привет мир مرحبا שלום",
    '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}',
    'brave_search.call(query="latest price of 1oz gold")',
    "https://example.com/path?q=1&r=2#frag",
    "Ünïcödé\u0301 combining\u0308 marks",
]


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_tokenizes_like_meta(model: LlamaModel, meta_tokenizer: Tokenizer, text: str) -> None:
    expected = meta_tokenizer.encode(text, bos=False, eos=False)
    assert model.tokenize(text, add_special=False, parse_special=False) == expected
    assert model.detokenize(expected) == text


def test_gguf_vocabulary_and_special_tokens(model: LlamaModel, meta_tokenizer: Tokenizer) -> None:
    assert model.n_vocab == meta_tokenizer.n_words == 128256
    assert model.bos == meta_tokenizer.bos_id == 128000
    assert model.adds_bos
    for name, token in meta_tokenizer.special_tokens.items():
        assert model.token_text(token) == name
        assert model.tokenize(name, add_special=False, parse_special=True) == [token]
    eog = {t for t in range(model.n_vocab - 256, model.n_vocab) if model.is_eog(t)}
    assert eog == set(meta_tokenizer.stop_tokens)  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    assert model.tokenize("Hi", add_special=True) == [128000] + meta_tokenizer.encode("Hi", bos=False, eos=False)


# --- (b) prompts: token for token ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_prompt_tokens_equal_meta(
    case: dict[str, Any], model: LlamaModel, meta_format: ChatFormat, fixed_today: datetime.date
) -> None:
    expected = meta_dialog_tokens(case, meta_format)
    segments = render(case, today=fixed_today)

    # Segment by segment, with llama.cpp on the GGUF (what the engine runs) and with Meta's tokenizer.
    assert llama_cpp_tokens(model, segments) == expected
    meta_tok = meta_format.tokenizer
    assert (
        tokenize_segments(
            segments,
            lambda text, special: (
                [meta_tok.special_tokens[text]] if special else meta_tok.encode(text, bos=False, eos=False)
            ),
        )
        == expected
    )

    # The joined string, tokenized at once with special tokens parsed.
    text = render_llama3(case["messages"], case.get("tools"), tool_choice=case.get("tool_choice"), today=fixed_today)
    assert text == "".join(s.text for s in segments)
    if not (case.get("seam") or case.get("literal_specials")):
        assert model.tokenize(text, add_special=False, parse_special=True) == expected
        assert meta_tok.encode(text, bos=False, eos=False, allowed_special="all") == expected


@pytest.mark.parametrize(
    "case_id", ["content-parts", "seam-content-starts-with-newline", "special-token-text-in-content"]
)
def test_where_the_string_form_is_not_enough(
    case_id: str, model: LlamaModel, meta_format: ChatFormat, fixed_today: datetime.date
) -> None:
    """Why the engine should tokenize segments: here the joined string, tokenized at once, is not Meta's."""
    case = next(c for c in DIALOGS if c["id"] == case_id)
    text = render_llama3(case["messages"], case.get("tools"), today=fixed_today)
    assert model.tokenize(text, add_special=False, parse_special=True) != meta_dialog_tokens(case, meta_format)


def test_prompt_text_matches_meta_decoded(meta_format: ChatFormat, fixed_today: datetime.date) -> None:
    """A readable check on one full prompt: Meta's tokens decoded are exactly our text."""
    case = next(c for c in DIALOGS if c["id"] == "custom-tool-call-and-result")
    expected = meta_format.tokenizer.decode(meta_dialog_tokens(case, meta_format))
    ours = render_llama3(case["messages"], case["tools"], today=fixed_today)
    assert ours == expected
    assert ours.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 21 September 2024\nBe precise.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnswer the user's question by making use of the following"
    )
    assert (
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"type": "function", "name": "get_weather", '
        '"parameters": {"city": "Paris", "unit": "c"}}<|eom_id|><|start_header_id|>ipython<|end_header_id|>\n\n'
        '{"temperature": 21, "sky": "clear"}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
    ) in ours


def test_builtin_tools_prompt(meta_format: ChatFormat, fixed_today: datetime.date) -> None:
    case = next(c for c in DIALOGS if c["id"] == "code-interpreter-call-and-result")
    text = render_llama3(case["messages"], case["tools"], today=fixed_today)
    assert "Environment: ipython\nTools: brave_search\nCutting Knowledge Date" in text
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>def is_prime(n):" in text
    assert "print(is_prime(7))<|eom_id|><|start_header_id|>ipython<|end_header_id|>\n\nTrue<|eot_id|>" in text
    assert "Here is a list of functions" not in text  # built-in tools only: no custom tools message


def test_without_generation_prompt(model: LlamaModel, meta_format: ChatFormat, fixed_today: datetime.date) -> None:
    case = next(c for c in DIALOGS if c["id"] == "history-ends-with-assistant")
    expected = meta_dialog_tokens(case, meta_format)
    header = meta_format._encode_header("assistant")
    assert expected[-len(header) :] == header
    tokens = llama_cpp_tokens(model, render(case, today=fixed_today, add_generation_prompt=False))
    assert tokens == expected[: -len(header)]
    assert tokens[-1] == model.tokenize(EOT, False, True)[0]


def test_today_defaults_to_the_local_date(meta_format: ChatFormat, model: LlamaModel) -> None:
    case = DIALOGS[1]
    # Unpatched llama-stack uses datetime.now(); a test run across midnight is the only way this can differ.
    assert llama_cpp_tokens(model, render(case)) == meta_dialog_tokens(case, meta_format)
    assert f"Today Date: {datetime.date.today():%d %B %Y}" in render_llama3(case["messages"])


def test_other_dates(model: LlamaModel, meta_format: ChatFormat, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(system_prompts, "datetime", _FixedDatetime)
    for day in (datetime.date(2025, 1, 5), datetime.date(2026, 12, 31)):
        monkeypatch.setattr(_FixedDatetime, "day_to_use", day)
        case = DIALOGS[0]
        assert llama_cpp_tokens(model, render(case, today=day)) == meta_dialog_tokens(case, meta_format)
    assert "Today Date: 05 January 2025" in render_llama3(
        [{"role": "user", "content": "x"}], today=datetime.date(2025, 1, 5)
    )


def test_engine_decodes_a_rendered_prompt(model: LlamaModel, fixed_today: datetime.date) -> None:
    """The tiny GGUF runs: llama.cpp decodes a full tool prompt and gives finite logits."""
    import math

    from llamaserve.engine.llama import Batch

    case = next(c for c in DIALOGS if c["id"] == "builtin-and-custom-mixed")
    tokens = llama_cpp_tokens(model, render(case, today=fixed_today))
    assert len(tokens) > model.config.n_batch
    batch = Batch(model.config.n_batch)
    try:
        for start in range(0, len(tokens), model.config.n_batch):
            batch.clear()
            for i in range(start, min(start + model.config.n_batch, len(tokens))):
                batch.add(tokens[i], i, 0, i == len(tokens) - 1)
            assert model.decode(batch) == 0
        logits = model.logits(batch.size - 1)
        assert all(math.isfinite(logits[i]) for i in range(0, model.n_vocab, 997))
    finally:
        batch.free()
        model.kv_clear()


# --- (b') Llama 3.2 Vision: where images go ---------------------------------------------------------------------
RESOURCES = Path(str(resources.files("llama_models") / "resources"))  # Meta's own test images


def image_url(name: str) -> dict[str, Any]:
    kind = "jpeg" if name.endswith((".jpg", ".jpeg")) else "png"
    data = base64.b64encode((RESOURCES / name).read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,{data}"}}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


IMAGE_DIALOGS = [
    pytest.param([{"role": "user", "content": [image_url("dog.jpg"), text("What is this?")]}], id="image-then-text"),
    pytest.param(
        [{"role": "user", "content": [text("Look at this: "), image_url("dog.jpg"), text(" What breed?")]}],
        id="text-image-text",
    ),
    pytest.param(
        [
            {"role": "system", "content": "You describe images."},
            {"role": "user", "content": [image_url("dog.jpg"), image_url("pasta.jpeg"), text("Compare them.")]},
        ],
        id="two-images-with-system",
    ),
    pytest.param(
        [
            {"role": "user", "content": [image_url("pasta.jpeg"), text("Name the dish.")]},
            {"role": "assistant", "content": "Spaghetti."},
            {"role": "user", "content": [text("And this one?"), image_url("dog.jpg")]},
        ],
        id="multi-turn",
    ),
]


def ours(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as our renderer takes them: an image part is {"type": "image", "image": ...}."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": p} if p["type"] == "image_url" else p for p in content]
        out.append({**m, "content": content})
    return out


@pytest.mark.parametrize("messages", IMAGE_DIALOGS)
@pytest.mark.parametrize("tools", [None, [WEATHER]], ids=["no-tools", "tools"])
def test_image_places_equal_meta(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    model: LlamaModel,
    meta_format: ChatFormat,
    fixed_today: datetime.date,
) -> None:
    """Each image is an image segment exactly where Meta's ChatFormat writes <|image|> for a RawMediaItem (it
    then maps that token to the vision model's id 128256; we compare at the <|image|> token)."""
    expected = meta_dialog_tokens({"messages": messages, "tools": tools}, meta_format)
    expected = [meta_format.vision_token if t == 128256 else t for t in expected]
    segments = render_llama3_segments(ours(messages), tools, today=fixed_today)
    assert llama_cpp_tokens(model, segments) == expected
    images = [s.image for s in segments if s.image is not None]
    parts = [p for m in messages if isinstance(m["content"], list) for p in m["content"]]
    assert [p["image"] for p in images] == [p for p in parts if p["type"] == "image_url"]  # each in its place
    assert all(s.text == "<|image|>" and s.special for s in segments if s.image is not None)
    assert model.tokenize("<|image|>", False, True) == [meta_format.vision_token]


def test_images_in_a_system_message_are_refused() -> None:
    with pytest.raises(Llama3FormatError, match="system message cannot hold images"):
        render_llama3_segments([{"role": "system", "content": [{"type": "image", "image": "x"}]}])


# --- (c) tool-call parsing agrees with Meta's ---------------------------------------------------------------------

OUTPUTS = [
    "Hello! How can I help you today?",
    "  Hello there.\n\n",
    "The answer is 42.<|eot_id|>",
    "",
    '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}',
    '<|python_tag|>{"type": "function", "name": "trending_songs", "parameters": {"n": "10", "genre": "all"}}<|eom_id|>',
    '{"name": "get_weather", "parameters": {"city": "Tōkyō", "unit": "c"}}',
    '  {"type": "function", "name": "get_time", "parameters": {}}  ',
    '{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n'
    '        "n": 10,\n        "genre": null,\n        "flags": [true, false]\n    }\n}',
    '<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>',
    'wolfram_alpha.call(query="100th decimal of pi")',
    '<|python_tag|>photogen.call(query="a llama in a field")',
    "<|python_tag|>def is_prime(n):\n    if n <= 1:\n        return False\n    return True\n\n"
    "print(is_prime(7))<|eom_id|>",
    '<|python_tag|>print("hi")',
    '<function=get_weather>{"city": "Berlin"}</function>',
    "<function=get_weather>{'city': 'Berlin'}</function><|eot_id|>",
    '[get_weather(city="Rome", unit="c")]',
    "[trending_songs(n=5), get_weather(city='Oslo')]",
    '{"name": "brave_search", "parameters": {"q": "llamas"}}',
    'Sure: {"name": "get_weather", "parameters": {"city": "Paris"}}',
    '{"city": "Paris"}',
    "[1, 2, 3]",
    "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>",
    'You could use foo.call(query="x") for that.',
    "Let me write some code:\n```python\nprint(1)\n```",
]


@pytest.mark.parametrize("output", OUTPUTS)
def test_tool_call_parsing_agrees_with_meta(output: str, meta_format: ChatFormat) -> None:
    expected = meta_format.decode_assistant_message_from_content(output, StopReason.end_of_turn)
    content, calls = parse_llama3_tool_calls(output)
    if expected.tool_calls:
        assert content is None and expected.content == ""
        assert len(calls) == len(expected.tool_calls) == 1
        meta_call = expected.tool_calls[0]
        name = meta_call.tool_name if isinstance(meta_call.tool_name, str) else meta_call.tool_name.value
        assert calls[0].name == name
        assert json.loads(calls[0].arguments) == meta_call.arguments
    else:
        assert calls == []
        assert content == expected.content


def test_parsing_finds_calls_where_expected() -> None:
    """The agreement test above is only as good as its samples: make sure they exercise both outcomes."""
    parsed = {o: parse_llama3_tool_calls(o) for o in OUTPUTS}
    assert sum(1 for _, calls in parsed.values() if calls) >= 14
    assert sum(1 for _, calls in parsed.values() if not calls) >= 6
    _, calls = parsed['<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>']
    assert (calls[0].name, json.loads(calls[0].arguments)) == ("brave_search", {"query": "latest price of 1oz gold"})
    _, calls = parsed['<|python_tag|>print("hi")']
    assert (calls[0].name, json.loads(calls[0].arguments)) == ("code_interpreter", {"code": 'print("hi")'})


def test_parsed_call_renders_back_as_meta_encodes_it(
    model: LlamaModel, meta_format: ChatFormat, fixed_today: datetime.date
) -> None:
    """A parsed tool call, sent back by the client as an assistant message, renders as Meta encodes that call."""
    rendered = 0
    for output in OUTPUTS:
        _, calls = parse_llama3_tool_calls(output)
        if not calls:
            continue
        rendered += 1
        case = {
            "messages": [
                {"role": "user", "content": "go"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": calls[0].name, "arguments": calls[0].arguments},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c", "content": "ok"},
            ],
            "tools": [{"type": "function", "function": {"name": calls[0].name}}],
        }
        assert llama_cpp_tokens(model, render(case, today=fixed_today)) == meta_dialog_tokens(case, meta_format)
    assert rendered >= 14


# --- recognising Llama 3 ------------------------------------------------------------------------------------------


def _special_texts(m: LlamaModel, count: int = 256) -> set[str]:
    return {m.token_text(t) for t in range(max(0, m.n_vocab - count), m.n_vocab)}


def test_is_llama3(model: LlamaModel) -> None:
    texts = _special_texts(model)
    assert is_llama3(model.chat_template(), texts)  # the tiny GGUF has no template: the vocabulary decides
    assert is_llama3("{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}", texts)
    assert not is_llama3("{{ '<|im_start|>' + message['role'] }}", texts)  # a ChatML fine-tune of Llama 3
    assert not is_llama3(None, {"<|im_start|>", "<|im_end|>"})


def test_smollm2_is_not_llama3() -> None:
    m = LlamaModel(str(embedded_model_path()), ContextConfig(n_ctx_seq=64, n_seq_max=1, n_batch=32, n_threads=1))
    try:
        assert not is_llama3(m.chat_template(), {m.token_text(t) for t in range(m.n_vocab)})
    finally:
        m.close()
