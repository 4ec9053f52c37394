"""Tool calling: how a model family writes a call, how we force one with a grammar, and how we read it back.

Two formats:
- `hermes` (ChatML models): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`. When the model's
  template does not render tools itself, we put the definitions in the system message the way Hermes and
  Qwen templates do, and turn the history's calls and results into that same text.
- `llama3` (Llama 3.x): `{"name": ..., "parameters": {...}}` for custom tools and
  `<|python_tag|>name.call(arg="...")` for built-in ones, as Meta's `llama_models` defines them.

`tool_choice: "required"` or a named function compiles the format's call syntax, with each tool's parameters
schema inside, to a grammar: the model cannot write anything but a valid call, whatever its size.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from llamaserve.chat import llama3
from llamaserve.chat.grammar import Grammar, SchemaError, literal

PYTHON_TAG = "<|python_tag|>"  # Llama 3.1 starts a built-in tool call with this special token


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = ""

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parameters_schema(function: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters; none means a function of no arguments."""
    return function.get("parameters") or {"type": "object", "properties": {}}


class ToolFormat:
    """A family's call syntax. Subclasses set the markers and the key that holds the arguments."""

    name = ""
    arguments_key = "arguments"
    call_prefix = ""  # text before the JSON object of a call
    call_suffix = ""
    marker: str | None = None  # text that starts a call anywhere in a reply

    def call_grammar(self, tools: list[dict[str, Any]], where: list[str]) -> str:
        """A grammar for exactly one call of one of `tools` (OpenAI tool dicts); `where` names each tool's
        place in the request for SchemaError messages."""
        g = Grammar()
        alternatives = []
        for function, place in zip((t["function"] for t in tools), where, strict=True):
            args = g.schema(parameters_schema(function), f"{function['name']}-args", place)
            head = f'{{"name": {json.dumps(function["name"])}, "{self.arguments_key}": '
            alternatives.append(f"{literal(self.call_prefix + head)} {args} {literal('}' + self.call_suffix)}")
        return g.render(" | ".join(f"( {a} )" for a in alternatives))

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Split generated text into content and calls; text that is not a well-formed call stays content."""
        raise NotImplementedError

    def parse_cut(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Text that began a call and was cut short (max_tokens): the content before the call, and the call as
        far as it got (its name, and the arguments' text so far), if its name was written. Its markup is never
        content."""
        raise NotImplementedError

    def may_start_call(self, text: str) -> bool:
        """Could `text` (what the model wrote so far) be the beginning of a call? Streaming holds such text back
        until it knows."""
        raise NotImplementedError

    def _call_from_json(self, obj: Any) -> ToolCall | None:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get(self.arguments_key, obj.get("arguments", obj.get("parameters", {})))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False), new_call_id())


class HermesFormat(ToolFormat):
    name = "hermes"
    call_prefix = "<tool_call>\n"
    call_suffix = "\n</tool_call>"
    marker = "<tool_call>"
    _call = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        calls = []
        for match in self._call.finditer(text):
            body = match.group(1)
            body = body[: len(body) - _partial_marker(body, "</tool_call>")].rstrip()  # a closing tag cut short
            try:
                call = self._call_from_json(json.loads(body))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        content = self._call.sub("", text).strip() if calls else text
        return content or None, calls

    def parse_cut(self, text: str) -> tuple[str | None, list[ToolCall]]:
        marker = self.call_prefix.strip()
        at = text.find(marker)
        if at < 0:  # cut inside the marker itself
            return text[: len(text) - _partial_marker(text, marker)].strip() or None, []
        calls = []
        for segment in text[at:].split(marker)[1:]:
            body = segment.split("</tool_call>")[0]
            body = body[: len(body) - _partial_marker(body, "</tool_call>")].strip()
            try:
                call = self._call_from_json(json.loads(body))
            except json.JSONDecodeError:
                call = _partial_call(body, self.arguments_key)
            if call is not None:
                calls.append(call)
        return text[:at].strip() or None, calls

    def may_start_call(self, text: str) -> bool:
        stripped = text.lstrip()
        return stripped.startswith("<tool_call>") or "<tool_call>".startswith(stripped)

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        definitions = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{definitions}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )

    def inline_messages(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> list[dict[str, Any]]:
        """For templates that know nothing of tools: definitions into the system message, calls and results
        into plain text the way Hermes-trained models saw them."""
        out: list[dict[str, Any]] = []
        for m in messages:
            if m["role"] == "assistant" and m.get("tool_calls"):
                blocks = [
                    self.call_prefix
                    + json.dumps(
                        {"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])},
                        ensure_ascii=False,
                    )
                    + self.call_suffix
                    for c in m["tool_calls"]
                ]
                text = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
                out.append({"role": "assistant", "content": text})
            elif m["role"] == "tool":
                out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
            else:
                out.append({"role": m["role"], "content": m["content"]})
        if tools:
            instructions = self.system_prompt(tools)
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{instructions}"}
            else:
                out.insert(0, {"role": "system", "content": instructions})
        return out


class Llama3Format(ToolFormat):
    name = "llama3"
    arguments_key = "parameters"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        content, calls = llama3.parse_llama3_tool_calls(text)
        return content, [ToolCall(c.name, c.arguments, new_call_id()) for c in calls]

    def parse_cut(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip()
        if body.startswith(PYTHON_TAG) or PYTHON_TAG.startswith(body):
            body = body[len(PYTHON_TAG) :]
            builtin = re.match(r"\s*(\w+)\.call\(", body)
            if builtin:  # a built-in call's arguments are Python: only its name is sure
                return None, [ToolCall(builtin.group(1), "", new_call_id())]
            return None, ([ToolCall("code_interpreter", json.dumps({"code": body}), new_call_id())] if body else [])
        call = _partial_call(body, self.arguments_key)
        return (None, [call]) if call else (text, [])  # JSON without a name may be a plain answer

    def may_start_call(self, text: str) -> bool:
        stripped = text.lstrip()
        return not stripped or stripped.startswith(("{", PYTHON_TAG)) or PYTHON_TAG.startswith(stripped)


def _arguments(arguments: str) -> Any:
    """History carries arguments as JSON text; templates and our own formats want the object."""
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def template_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that renders tools itself (HF convention: call arguments as objects)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [
                {**c, "function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


class ToolStream:
    """Turns streamed text into OpenAI deltas: content while it cannot be a call, tool-call deltas once the
    whole call is known (auto mode: a call is only reported after it parsed, never half-guessed).

    Forced calls (grammar) stream their arguments as they come: the grammar fixes the text around them."""

    def __init__(self, fmt: ToolFormat, forced: bool) -> None:
        self.fmt = fmt
        self.forced = forced
        self.text = ""
        self.sent = 0  # characters of text already sent as content
        self.calling = False
        self.calls: list[ToolCall] = []
        self._forced_args_start: int | None = None
        self._forced_args_sent = 0
        self._forced_id = new_call_id()

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.text += text
        if self.forced:
            return self._forced_deltas()
        if self.calling or (self.sent == 0 and self.fmt.may_start_call(self.text)):
            return []  # a call, or maybe one: hold it until it is whole
        marker = self.fmt.marker  # a call may also follow some text (Hermes models do that)
        at = self.text.find(marker, self.sent) if marker else -1
        if at >= 0:
            self.calling = True
            upto = at
        else:
            upto = len(self.text) - (_partial_marker(self.text, marker) if marker else 0)
        deltas = self._content(self.text[self.sent : upto])
        self.sent = max(self.sent, upto)
        return deltas

    def finish(self, cut: bool = False) -> list[dict[str, Any]]:
        """Deltas for what is left when generation ends: the calls (if the text parses as calls) or content. A
        call `cut` short (max_tokens) is reported as far as it got, as a forced call's stream is: its markup
        never becomes content."""
        if self.forced:
            content, calls = self.fmt.parse(self.text)
            self.calls = [ToolCall(c.name, c.arguments, self._forced_id) for c in calls]
            return []
        rest = self.text[self.sent :]
        if cut and (self.calling or self.sent == 0) and rest.strip():
            content, calls = self.fmt.parse_cut(rest)
            if not calls:
                return self._content(content or "")
        else:
            content, calls = self.fmt.parse(rest)
        if calls:
            self.calls = calls
            deltas = self._content(content) if content else []
            for i, call in enumerate(calls):
                deltas.append(
                    {
                        "tool_calls": [
                            {
                                "index": i,
                                "id": call.id,
                                "type": "function",
                                "function": {"name": call.name, "arguments": ""},
                            }
                        ]
                    }
                )
                deltas.append({"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]})
            return deltas
        return self._content(rest)

    def _content(self, text: str) -> list[dict[str, Any]]:
        return [{"content": text}] if text else []

    def _forced_deltas(self) -> list[dict[str, Any]]:
        """The grammar wrote `<prefix>{"name": "X", "<key>": ` then the arguments object then `}<suffix>`."""
        deltas: list[dict[str, Any]] = []
        if self._forced_args_start is None:
            head = re.match(
                r"\s*"
                + re.escape(self.fmt.call_prefix)
                + r'\{"name": ("(?:[^"\\]|\\.)*"), "'
                + self.fmt.arguments_key
                + '": ',
                self.text,
            )
            if head is None:
                return []
            self._forced_args_start = head.end()
            name = json.loads(head.group(1))
            deltas.append(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": self._forced_id,
                            "type": "function",
                            "function": {"name": name, "arguments": ""},
                        }
                    ]
                }
            )
        args = self.text[self._forced_args_start :]
        end = json_object_end(args)
        upto = end if end is not None else len(args)
        if upto > self._forced_args_sent:
            fragment = args[self._forced_args_sent : upto]
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]})
            self._forced_args_sent = upto
        return deltas


def _partial_marker(text: str, marker: str) -> int:
    """How many characters at the end of text could begin `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _partial_call(text: str, arguments_key: str) -> ToolCall | None:
    """The call a cut-short JSON call object starts: its name, and its arguments' text so far (as a stream sends
    it), or None before the name is whole."""
    name = _NAME.search(text)
    if name is None:
        return None
    args = re.search(rf'"(?:{arguments_key}|arguments|parameters)"\s*:\s*', text)
    arguments = text[args.end() :] if args else ""
    end = json_object_end(arguments)
    if end is not None:
        arguments = arguments[:end]
    return ToolCall(json.loads(f'"{name.group(1)}"'), arguments, new_call_id())


def json_object_end(text: str) -> int | None:
    """The index just past the JSON object `text` starts with, or None while it is still open."""
    depth, in_string, escaped = 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def assembled(deltas: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """A message's content and OpenAI tool calls from its stream of deltas: a non-streamed reply is what its
    stream would have said."""
    content = "".join(d["content"] for d in deltas if "content" in d)
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        for part in delta.get("tool_calls", []):
            call = calls.setdefault(
                part["index"], {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            )
            call["id"] = part.get("id") or call["id"]
            function = part.get("function") or {}
            call["function"]["name"] = function.get("name") or call["function"]["name"]
            call["function"]["arguments"] += function.get("arguments") or ""
    return content or None, [calls[i] for i in sorted(calls)]


FORMATS: dict[str, ToolFormat] = {"hermes": HermesFormat(), "llama3": Llama3Format()}

__all__ = ["FORMATS", "SchemaError", "ToolCall", "ToolFormat", "ToolStream", "assembled", "template_tool_messages"]
