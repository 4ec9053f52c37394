"""The Llama 3.1 path through the real server and engine, on a tiny random-weight model with Meta's real
vocabulary: the text is gibberish, the mechanics are exact (prompt tokens, end tokens, forced calls, JSON)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.tokenizer import Tokenizer

from tests.conftest import Server, start_server
from tests.test_llama3_format import meta_dialog_tokens
from tests.test_tools import streamed_choice
from tests.tiny_llama3 import tiny_llama3_gguf

MODEL = "tiny-llama3"
EOT, EOM, END_OF_TEXT = 128009, 128008, 128001
SETTINGS = {
    "type": "function",
    "function": {
        "name": "set_mode",
        "description": "Switch the device mode",
        "parameters": {
            "type": "object",
            "properties": {"mode": {"enum": ["eco", "boost"]}, "confirm": {"type": "boolean"}},
            "required": ["mode", "confirm"],
            "additionalProperties": False,
        },
    },
}
DIALOG = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Switch to eco mode, please."},
]


@pytest.fixture(scope="module")
def llama_server() -> Iterator[Server]:
    with start_server("--model", str(tiny_llama3_gguf()), "--model-id", MODEL, "--parallel", "4", "--ctx", "2048") as s:
        yield s


@pytest.fixture(scope="module")
def llama(llama_server: Server) -> openai.OpenAI:
    return llama_server.openai()


@pytest.fixture(scope="module")
def meta_format() -> ChatFormat:
    return ChatFormat(Tokenizer.get_instance())


def test_served_prompt_tokens_equal_meta(llama_server: Server, meta_format: ChatFormat) -> None:
    for case in [{"messages": DIALOG}, {"messages": DIALOG, "tools": [SETTINGS]}]:
        r = llama_server.http().post("/tokenize", json={"model": MODEL, **case})
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == meta_dialog_tokens(case, meta_format)


def test_chat_and_stream_agree(llama: openai.OpenAI, llama_server: Server, meta_format: ChatFormat) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, messages=DIALOG, max_tokens=12, temperature=0)
    whole = llama.chat.completions.create(**kwargs)
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == len(meta_dialog_tokens({"messages": DIALOG}, meta_format))
    text = "".join(
        c.choices[0].delta.content or "" for c in llama.chat.completions.create(**kwargs, stream=True) if c.choices
    )
    assert text == whole.choices[0].message.content


@pytest.mark.parametrize("end_token", [EOT, EOM, END_OF_TEXT], ids=["eot_id", "eom_id", "end_of_text"])
def test_end_tokens_stop(llama: openai.OpenAI, end_token: int) -> None:
    """Force an end token after a few free ones: generation stops there with "stop", the token not in the text."""
    r = llama.chat.completions.create(
        model=MODEL, messages=DIALOG, max_tokens=20, temperature=0, logit_bias={str(end_token): 100}
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens == 1
    assert choice.message.content == ""


def test_forced_tool_call(llama: openai.OpenAI) -> None:
    for stream in (False, True):
        kwargs: dict[str, Any] = dict(
            model=MODEL, messages=DIALOG, tools=[SETTINGS], tool_choice="required", max_tokens=60, temperature=0
        )
        if not stream:
            choice = llama.chat.completions.create(**kwargs).choices[0]
            assert choice.finish_reason == "tool_calls"
            calls = choice.message.tool_calls
            assert calls is not None and len(calls) == 1 and calls[0].function.name == "set_mode"
            jsonschema.validate(json.loads(calls[0].function.arguments), SETTINGS["function"]["parameters"])
            continue
        name, arguments, reason = None, "", None
        for chunk in llama.chat.completions.create(**kwargs, stream=True):
            for c in chunk.choices:
                for d in c.delta.tool_calls or []:
                    name = name or (d.function.name if d.function else None)
                    arguments += (d.function.arguments or "") if d.function else ""
                reason = c.finish_reason or reason
        assert name == "set_mode" and reason == "tool_calls"
        jsonschema.validate(json.loads(arguments), SETTINGS["function"]["parameters"])


@pytest.mark.parametrize("max_tokens", [3, 20])
def test_a_cut_forced_call_is_the_same_streamed_or_not(llama: openai.OpenAI, max_tokens: int) -> None:
    """Llama 3's call format, cut by max_tokens inside its head and inside its arguments: `length`, the call as
    far as it got, no call text in the content, streamed or not."""
    body = {"model": MODEL, "messages": DIALOG, "tools": [SETTINGS], "tool_choice": "required",
            "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
    choice = llama.chat.completions.create(**body).choices[0]
    content, calls, reason = streamed_choice(llama, **body)
    assert choice.finish_reason == reason == "length" and not choice.message.content and content is None
    whole = [{"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls or []]
    assert whole == [{"name": c["name"], "arguments": c["arguments"]} for c in calls]
    assert (max_tokens > 16) == bool(whole), whole  # the grammar writes the call's head in 16 tokens here


def test_json_schema_mode(llama: openai.OpenAI) -> None:
    schema = SETTINGS["function"]["parameters"]
    r = llama.chat.completions.create(
        model=MODEL,
        messages=DIALOG,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "settings", "schema": schema}},
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)


def test_tool_history_round_trips(llama_server: Server, meta_format: ChatFormat) -> None:
    messages = [
        *DIALOG,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "set_mode", "arguments": '{"mode": "eco"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"ok": true}'},
    ]
    case = {"messages": messages, "tools": [SETTINGS]}
    r = llama_server.http().post("/tokenize", json={"model": MODEL, **case})
    assert r.json()["tokens"] == meta_dialog_tokens(case, meta_format)
    r = httpx.post(
        f"{llama_server.base_url}/v1/chat/completions",
        json={"model": MODEL, **case, "max_tokens": 4},
        timeout=60,
        headers=llama_server.auth,
    )
    assert r.status_code == 200, r.text
