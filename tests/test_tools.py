"""Tool calling on the default (ChatML) model: forced calls by grammar, the Hermes format read back, streaming
deltas, and history that round-trips into the next prompt."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from llamaserve.chat.tools import FORMATS, HermesFormat, ToolFormat, ToolStream, assembled
from tests.conftest import MODEL

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 40}},
            "required": ["timezone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def schema_of(name: str) -> dict[str, Any]:
    return next(t for t in (WEATHER, TIME) if t["function"]["name"] == name)["function"]["parameters"]


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}], ids=["required", "named"]
)
def test_forced_call_validates(client: openai.OpenAI, tool_choice: Any) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice, max_tokens=120, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), schema_of(call.function.name))


def test_forced_call_streams_name_then_argument_fragments(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=120,
        temperature=0,
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    assert whole is not None
    deltas = []
    reason = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            deltas += choice.delta.tool_calls or []
            reason = choice.finish_reason or reason
    assert reason == "tool_calls"
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id and first.function is not None and first.function.name == "get_weather"
    assert len(rest) > 1, "arguments should arrive in several fragments"
    assert all(d.index == 0 and d.id is None and d.function is not None for d in rest)
    arguments = "".join(d.function.arguments or "" for d in rest if d.function is not None)
    assert json.loads(arguments) == json.loads(whole[0].function.arguments)


def streamed_choice(client: openai.OpenAI, **body: Any) -> tuple[str | None, list[dict[str, Any]], str | None]:
    """A streamed reply put together as a client library does: content, tool calls by index, finish reason."""
    content, calls, reason = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **body):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for part in choice.delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = part.id or call["id"]
                if part.function is not None:
                    call["name"] = part.function.name or call["name"]
                    call["arguments"] += part.function.arguments or ""
            reason = choice.finish_reason or reason
    return content or None, [calls[i] for i in sorted(calls)], reason


@pytest.mark.parametrize("max_tokens", [5, 22, 36])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_call_cut_by_max_tokens_is_the_same_streamed_or_not(
    client: openai.OpenAI, max_tokens: int, tool_choice: Any
) -> None:
    """Cut short, a forced call is reported as far as it got (name, arguments' text so far), `length`, and never
    as `<tool_call>` markup in the content: the same whether streamed or not (the non-streamed reply used to put
    the markup in `content`)."""
    body = {"model": MODEL, "messages": ASK, "tools": [WEATHER], "tool_choice": tool_choice,
            "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
    message = client.chat.completions.create(**body).choices[0]
    content, calls, reason = streamed_choice(client, **body)
    assert message.finish_reason == reason == "length"
    assert "<tool_call>" not in (message.message.content or "") and content is None
    whole = [{"name": c.function.name, "arguments": c.function.arguments} for c in message.message.tool_calls or []]
    assert whole == [{"name": c["name"], "arguments": c["arguments"]} for c in calls]
    if max_tokens > 18:  # past the call's head (18 tokens): its name is known
        assert whole and whole[0]["name"] == "get_weather" and whole[0]["arguments"].startswith("{"), whole


def test_auto_with_plain_answer_stays_content(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello to me."}],
        tools=[WEATHER],
        tool_choice="auto",
        max_tokens=30,
        temperature=0,
    )
    choice = r.choices[0]
    content, calls = HermesFormat().parse(choice.message.content or "")
    # Whatever the small model chose, the response agrees with the parser: calls are calls, text is text.
    if calls:
        assert choice.message.tool_calls and choice.finish_reason == "tool_calls"
    else:
        assert choice.message.content and not choice.message.tool_calls


def test_history_round_trips_into_the_prompt(http: httpx.Client) -> None:
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'},
    ]
    tokens = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
    prompt = http.post("/detokenize", json={"model": MODEL, "tokens": tokens}).json()["prompt"]
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    assert f"<tool_call>\n{call}\n</tool_call>" in prompt
    assert '<tool_response>\n{"temperature": 18}\n</tool_response>' in prompt
    # With tools offered, their definitions go into the system message.
    r = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "tools": [WEATHER], "max_tokens": 20, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > len(tokens) + 50


# --- the Hermes format and the stream, on given text -----------------------------------------------------------
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'


def test_hermes_parse() -> None:
    fmt = HermesFormat()
    content, calls = fmt.parse(CALL_TEXT)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "celsius"})
    ]
    content, calls = fmt.parse("Let me check.\n" + CALL_TEXT + "\n" + CALL_TEXT.replace("Oslo", "Rome"))
    assert content == "Let me check." and [json.loads(c.arguments)["city"] for c in calls] == ["Oslo", "Rome"]
    for text in ["Hello there", "<tool_call>\n{not json}\n</tool_call>", '<tool_call>{"arguments": {}}</tool_call>']:
        assert fmt.parse(text) == (text, [])


def feed_all(stream: ToolStream, text: str, step: int) -> list[dict[str, Any]]:
    deltas = []
    for i in range(0, len(text), step):
        deltas += stream.feed(text[i : i + step])
    return deltas + stream.finish()


@pytest.mark.parametrize("step", [1, 3, 7])
def test_tool_stream(step: int) -> None:
    deltas = feed_all(ToolStream(HermesFormat(), forced=False), "Sure. " + CALL_TEXT, step)
    content = "".join(d.get("content", "") for d in deltas)
    assert content == "Sure. "
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"]
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Oslo", "unit": "celsius"}
    # Plain text streams as content, even when it starts like a tag.
    deltas = feed_all(ToolStream(HermesFormat(), forced=False), "<b>bold</b> and <tool", step)
    assert "".join(d.get("content", "") for d in deltas) == "<b>bold</b> and <tool"


# --- calls cut short, on given text ---------------------------------------------------------------------------
CUT_CASES = [
    # (format, text the model wrote before max_tokens, expected content, expected [(name, arguments)])
    (HermesFormat(), '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os', None,
     [("get_weather", '{"city": "Os')]),
    (HermesFormat(), "Let me look.\n<tool_call>\n{\"na", "Let me look.\n", []),
    (HermesFormat(), "<tool", None, []),
    (HermesFormat(), CALL_TEXT[:-4], None, [("get_weather", '{"city": "Oslo", "unit": "celsius"}')]),
    (FORMATS["llama3"], '{"name": "get_weather", "parameters": {"city": "Os', None, [("get_weather", '{"city": "Os')]),
    (FORMATS["llama3"], '{"answer": 4', '{"answer": 4', []),
    (FORMATS["llama3"], '<|python_tag|>brave_search.call(query="wea', None, [("brave_search", "")]),
    (FORMATS["llama3"], "<|python_tag|>print(1 +", None, [("code_interpreter", '{"code": "print(1 +"}')]),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CUT_CASES)
@pytest.mark.parametrize("step", [1, 5, 1000])
def test_a_call_cut_short_reads_as_far_as_it_got(
    fmt: ToolFormat, text: str, content: str | None, calls: list[tuple[str, str]], step: int
) -> None:
    stream = ToolStream(fmt, forced=False)
    deltas = [d for i in range(0, len(text), step) for d in stream.feed(text[i : i + step])]
    got_content, got_calls = assembled(deltas + stream.finish(cut=True))
    assert got_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls] == calls
