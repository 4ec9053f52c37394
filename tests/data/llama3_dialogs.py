"""Dialogs for the Llama 3.1 prompt-format tests: OpenAI-style requests (messages, tools, tool_choice).

`seam=True` marks dialogs where two text pieces of one message meet (content parts, content that starts with
a newline right after the header, text before a tool call, two tool calls in one message): Meta tokenizes the
pieces apart, so only the segment-wise tokenization is sure to equal Meta's there, not the joined string
tokenized at once. `literal_specials=True`: message text spells a special token, which Meta keeps as text.
"""

from __future__ import annotations

import json
from typing import Any

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["c", "f"], "description": "Temperature unit"},
            },
            "required": ["city"],
        },
    },
}
SONGS = {
    "type": "function",
    "function": {
        "name": "trending_songs",
        "description": "Returns the trending songs on a Music site",
        "parameters": {
            "type": "object",
            "properties": {
                "n": {"type": "integer", "description": "The number of songs to return"},
                "genre": {"type": "string", "description": "The genre of the songs to return"},
            },
            "required": ["n"],
        },
    },
}
NO_ARGS = {"type": "function", "function": {"name": "get_time"}}  # no description, no parameters
ODD = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": 'Look up a "quoted" term & <tags>\nin the glossary',
        "parameters": {
            "type": "object",
            "properties": {
                "term": {"type": "string"},  # no description
                "lang's": {"type": "string", "description": "Language <code>"},
                "limit": {"type": "integer", "description": "Max results"},
            },
            "required": ["term", "lang's"],
        },
    },
}
BRAVE = {
    "type": "function",
    "function": {
        "name": "brave_search",
        "description": "Search the web",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}
WOLFRAM = {
    "type": "function",
    "function": {
        "name": "wolfram_alpha",
        "description": "Compute with Wolfram Alpha",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}
PHOTOGEN = {
    "type": "function",
    "function": {
        "name": "photogen",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}
CODE = {
    "type": "function",
    "function": {
        "name": "code_interpreter",
        "description": "Run Python",
        "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
    },
}


def call(name: str, args: dict[str, Any], id: str = "call_0") -> dict[str, Any]:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def assistant_calls(*calls: dict[str, Any], content: str | None = None) -> dict[str, Any]:
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


def tool(content: str, id: str = "call_0") -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": id, "content": content}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def system(content: Any) -> dict[str, Any]:
    return {"role": "system", "content": content}


def assistant(content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


WOLFRAM_RESULT = json.dumps(
    {"queryresult": {"success": True, "inputstring": "100th decimal of pi", "pods": [{"plaintext": "7"}]}},
    indent=4,
)

DIALOGS: list[dict[str, Any]] = [
    {"id": "user-only", "messages": [user("Hello!")]},
    {"id": "system-user", "messages": [system("You are a helpful assistant"), user("Who are you?")]},
    {
        "id": "multi-turn",
        "messages": [
            system("You are terse."),
            user("What is 2+2?"),
            assistant("4"),
            user("And times 3?"),
            assistant("12."),
            user("Thanks! Now explain why, briefly."),
        ],
    },
    {
        "id": "unicode-whitespace",
        "messages": [
            user("  Ünïcödé — 日本語, emoji 🦙🎉, tabs\tand\r\nCRLF  \n\n  trailing spaces   "),
            assistant("¿Qué tal? Привет! مرحبا\n\n```python\nprint('hi')\n```"),
            user("1234567 + 0.000001 = ?"),
        ],
    },
    {
        "id": "special-token-text-in-content",
        "messages": [user("Print the literal text <|eot_id|> and <|start_header_id|> please")],
        "literal_specials": True,
    },
    {
        "id": "content-parts",
        "messages": [
            system([{"type": "text", "text": "Rule one."}, {"type": "text", "text": "Rule two."}]),
            user([{"type": "text", "text": "First part. "}, {"type": "text", "text": "Second part."}]),
        ],
        "seam": True,
    },
    {"id": "history-ends-with-assistant", "messages": [user("Hi"), assistant("Hello! How can I help?")]},
    {"id": "custom-tools", "messages": [user("What's the weather in Paris?")], "tools": [WEATHER, SONGS]},
    {
        "id": "custom-tools-with-system",
        "messages": [system("You are a helpful assistant."), user("Use tools to get latest trending songs")],
        "tools": [SONGS],
    },
    {"id": "custom-tool-odd-strings", "messages": [user("look up 'llama'")], "tools": [ODD, NO_ARGS]},
    {
        "id": "custom-tool-call-and-result",
        "messages": [
            system("Be precise."),
            user("What's the weather in Paris?"),
            assistant_calls(call("get_weather", {"city": "Paris", "unit": "c"})),
            tool('{"temperature": 21, "sky": "clear"}'),
        ],
        "tools": [WEATHER],
    },
    {
        "id": "custom-tool-full-loop",
        "messages": [
            user("Top 3 songs?"),
            assistant_calls(call("trending_songs", {"n": 3, "genre": None})),
            tool('["Song A", "Song B", "Song C"]'),
            assistant("The top 3 are Song A, Song B and Song C."),
            user("And in jazz?"),
        ],
        "tools": [SONGS, WEATHER],
    },
    {
        "id": "custom-tool-call-nested-unicode-args",
        "messages": [
            user("weather for Zürich and São Paulo?"),
            assistant_calls(
                call("get_weather", {"city": "Zürich", "extra": {"days": 3, "hourly": True}, "tags": ["a", "ß"]})
            ),
            tool("Zürich: 12°C"),
        ],
        "tools": [WEATHER],
    },
    {
        "id": "builtin-tools",
        "messages": [user("Search the web for the latest price of 1oz gold?")],
        "tools": [BRAVE, WOLFRAM],
    },
    {
        "id": "builtin-call-and-result",
        "messages": [
            system("You are a helpful assistant."),
            user("What is the 100th decimal of pi?"),
            assistant_calls(call("wolfram_alpha", {"query": "100th decimal of pi"})),
            tool(WOLFRAM_RESULT),
        ],
        "tools": [BRAVE, WOLFRAM],
    },
    {
        "id": "brave-call-then-answer",
        "messages": [
            user("Who won the 2024 Tour de France?"),
            assistant_calls(call("brave_search", {"query": "2024 Tour de France winner"})),
            tool('{"results": [{"title": "Pogačar wins"}]}'),
            assistant("Tadej Pogačar won the 2024 Tour de France."),
            user("Thanks"),
        ],
        "tools": [BRAVE],
    },
    {"id": "code-interpreter-only", "messages": [user("Is 7 prime? Use code.")], "tools": [CODE]},
    {
        "id": "code-interpreter-call-and-result",
        "messages": [
            user("Write code to check if 7 is prime"),
            assistant_calls(
                call(
                    "code_interpreter",
                    {
                        "code": "def is_prime(n):\n    return n > 1 and all(n % i for i in range(2, n))\n\n"
                        "print(is_prime(7))"
                    },
                )
            ),
            tool("True"),
        ],
        "tools": [CODE, BRAVE],
    },
    {
        "id": "builtin-and-custom-mixed",
        "messages": [
            system("Answer in English."),
            user("Weather in Oslo, and search news about it"),
            assistant_calls(call("get_weather", {"city": "Oslo"})),
            tool('{"temperature": -3}'),
            assistant_calls(call("brave_search", {"query": "Oslo weather news"})),
            tool("[]"),
        ],
        "tools": [WEATHER, BRAVE, WOLFRAM, PHOTOGEN, CODE],
    },
    {"id": "tool-choice-required", "messages": [user("Weather?")], "tools": [WEATHER], "tool_choice": "required"},
    {
        "id": "tool-choice-named",
        "messages": [system("Be brief."), user("Weather in Rome?")],
        "tools": [WEATHER, SONGS],
        "tool_choice": "get_weather",
    },
    {"id": "tool-choice-none", "messages": [user("Weather?")], "tools": [WEATHER, BRAVE], "tool_choice": "none"},
    {
        "id": "later-system-message",
        "messages": [system("First system."), user("hi"), assistant("hello"), system("Second system."), user("bye")],
    },
    {
        "id": "tool-result-content-parts",
        "messages": [
            user("time?"),
            assistant_calls(call("get_time", {})),
            {"role": "tool", "tool_call_id": "call_0", "content": [{"type": "text", "text": "12:00"}]},
        ],
        "tools": [NO_ARGS],
    },
    {
        "id": "seam-content-starts-with-newline",
        "messages": [system("\nLeading newline in system"), user("\n\nleading newlines"), assistant(" \n spaced")],
        "seam": True,
    },
    {
        "id": "seam-text-before-tool-call",
        "messages": [
            user("Weather in Lima?"),
            assistant_calls(call("get_weather", {"city": "Lima"}), content="Let me check."),
            tool("18C"),
        ],
        "tools": [WEATHER],
        "seam": True,
    },
    {
        "id": "seam-two-tool-calls",
        "messages": [
            user("Weather in Lima and Quito?"),
            assistant_calls(
                call("get_weather", {"city": "Lima"}, id="a"), call("get_weather", {"city": "Quito"}, id="b")
            ),
            tool("18C", id="a"),
            tool("14C", id="b"),
        ],
        "tools": [WEATHER],
        "seam": True,
    },
]
