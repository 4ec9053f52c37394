"""Llama 3.1 prompts and tool calls, token for token as Meta renders them.

The reference is Meta's own code: `llama_models.llama3.chat_format.ChatFormat.encode_dialog_prompt` for the
tokens, and llama-stack 0.2.x (`providers/utils/inference/prompt_adapter.py`,
`augment_messages_for_tools_llama_3_1`, with the generators of
`models/llama/llama3/prompt_templates/system_prompts.py`) for the messages it encodes:

- a system message always comes first: "Environment: ipython" when there are tools, then "Tools: ..." listing
  the built-in tools (code_interpreter aside, which "Environment: ipython" alone turns on), then
  "Cutting Knowledge Date: December 2023" and "Today Date: 21 September 2024", then the caller's own system
  prompt, then the tool_choice instruction;
- custom (function) tools are described, in llama-stack's JSON layout, in a user message of their own right
  after the system message;
- tool results are `ipython` messages; an assistant tool call is rendered as Meta's ToolUtils writes it
  (custom: `{"type": "function", "name": ..., "parameters": {...}}`; built-in: `brave_search.call(query="...")`;
  code_interpreter: `<|python_tag|>` and the code), and ends with `<|eom_id|>`, the token the model itself
  ends a tool call with; every other message ends with `<|eot_id|>`.

A function tool (or tool call) named brave_search, wolfram_alpha, photogen or code_interpreter is the built-in
tool of that name, as llama-stack reads it (`ToolDefinition.tool_name` validates such names into `BuiltinTool`).

ChatFormat tokenizes each piece of a message (role, the blank line after the header, each content part, each
tool call) on its own and never parses special tokens inside text. `render_llama3_segments` keeps that
structure: tokenize each text segment alone, without parsing special tokens, and each special segment as its
token, and the result equals Meta's always (`tokenize_segments`). `render_llama3` joins the segments into one
string; tokenized at once with special tokens parsed it gives the same tokens except where two text pieces
may merge across a seam (content parts, content starting with a newline right after the header, text before a
tool call, two tool calls in one message) or where message text itself spells a special token (Meta keeps it
as text; a parser of special tokens would make it the token).

Images (Llama 3.2 Vision's format): ChatFormat writes an image content item as the `<|image|>` token at its place
among the message's content parts. An image part renders as such a segment, carrying the part, so that a caller
with a vision projector can put the image's embeddings there.

No dependency on Meta's packages at run time: they are the oracle of the tests.
"""

from __future__ import annotations

import ast
import datetime
import json
import re
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOM = "<|eom_id|>"
EOT = "<|eot_id|>"
PYTHON_TAG = "<|python_tag|>"
IMAGE = "<|image|>"

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
# The built-in tools whose calls are `name.call(query="...")`.
_QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")

_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

_ROLE_HEADERS = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython", "ipython": "ipython"}


class Llama3FormatError(ValueError):
    """The conversation cannot be rendered in the Llama 3.1 format (bad tool call arguments, unknown role...)."""


@dataclass(frozen=True)
class Segment:
    """A piece of the prompt that Meta's ChatFormat tokenizes on its own: one special token, plain text, or an
    image (written and tokenized as the `<|image|>` token that marks it in Llama 3.2 Vision prompts; `image` is
    the message's image part, for the caller to put in its place)."""

    text: str
    special: bool = False
    image: Any = field(default=None, compare=False)


# --- rendering --------------------------------------------------------------------------------------------------


def render_llama3_segments(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    today: datetime.date | None = None,
    tool_choice: str | None = None,
) -> list[Segment]:
    """The prompt as Meta encodes it, piece by piece.

    messages: OpenAI-style dicts (role system/user/assistant/tool, content a string, None or a list of text
    parts and image parts `{"type": "image", ...}`, which become image segments where Llama 3.2 Vision puts
    `<|image|>`; assistant `tool_calls` with JSON `arguments`). tools: OpenAI tool dicts. today: the "Today Date"
    (default: the local date, as llama-stack). tool_choice: None or "auto", "required", "none" (drops the
    tools, as llama-stack does), or the name of the function the model must call.
    """
    if tool_choice == "none":
        tools = None
    tool_defs = [_tool_definition(t) for t in tools or []]
    rest = list(messages)
    system: str | None = None
    if rest and rest[0].get("role") == "system":
        parts = _content_parts(rest.pop(0).get("content"))
        if any(not isinstance(p, str) for p in parts):
            raise Llama3FormatError("the system message cannot hold images in the Llama 3 format")
        system = "\n".join(parts)  # type: ignore[arg-type]

    segments: list[Segment] = [Segment(BEGIN_OF_TEXT, True)]
    _message(segments, "system", [_system_prompt(tool_defs, system, today, tool_choice)])
    custom = [t for t in tool_defs if t.name not in BUILTIN_TOOLS]
    if custom:
        _message(segments, "user", [_custom_tools_prompt(custom)])

    for message in rest:
        role = message.get("role")
        if role not in _ROLE_HEADERS:
            raise Llama3FormatError(f"unsupported message role {role!r} for the Llama 3.1 format")
        parts = _content_parts(message.get("content"))
        if role != "assistant":
            _message(segments, role, parts)
            continue
        calls = [_tool_call(c) for c in message.get("tool_calls") or []]
        # ChatFormat: <|python_tag|> before the content when the first call is code; then the content, then
        # each call as ToolUtils.encode_tool_call writes it, each tokenized on its own.
        prefix = [Segment(PYTHON_TAG, True)] if calls and calls[0][0] == "code_interpreter" else []
        parts += [_encode_tool_call(name, args) for name, args in calls]
        _message(segments, "assistant", parts, prefix=prefix, end=EOM if calls else EOT)

    if add_generation_prompt:
        segments += _header("assistant")
    return segments


def render_llama3(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    today: datetime.date | None = None,
    tool_choice: str | None = None,
) -> str:
    """The prompt as one string, special tokens written out (starts with <|begin_of_text|>: tokenize it
    without adding another BOS). See the module docstring for when `render_llama3_segments` is needed."""
    return "".join(s.text for s in render_llama3_segments(messages, tools, add_generation_prompt, today, tool_choice))


def tokenize_segments(segments: Iterable[Segment], tokenize: Callable[[str, bool], list[int]]) -> list[int]:
    """Tokens of rendered segments, exactly as Meta's ChatFormat. tokenize(text, parse_special) must not add
    BOS, e.g. `lambda text, special: model.tokenize(text, add_special=False, parse_special=special)`."""
    tokens: list[int] = []
    for segment in segments:
        ids = tokenize(segment.text, segment.special)
        if segment.special and len(ids) != 1:
            raise Llama3FormatError(f"the model has no single token for {segment.text!r}")
        tokens += ids
    return tokens


def _header(role: str) -> list[Segment]:
    return [Segment(START_HEADER, True), Segment(role), Segment(END_HEADER, True), Segment("\n\n")]


def _message(
    segments: list[Segment],
    role: str,
    parts: list[str | Mapping[str, Any]],
    prefix: list[Segment] | None = None,
    end: str = EOT,
) -> None:
    segments += _header(_ROLE_HEADERS[role])
    segments += prefix or []
    for part in parts:
        if isinstance(part, str):
            if part:
                segments.append(Segment(part))
        else:
            # ChatFormat._encode_content: an image (RawMediaItem) is the <|image|> token where the part is, with
            # nothing around it; the text parts on either side are tokenized on their own.
            segments.append(Segment(IMAGE, True, image=part))
    segments.append(Segment(end, True))


def _content_parts(content: Any) -> list[str | Mapping[str, Any]]:
    """A message's content as texts and image parts ({"type": "image", ...}), in order."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        parts: list[str | Mapping[str, Any]] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, Mapping) and part.get("type") == "image":
                parts.append(part)
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise Llama3FormatError(f"unsupported content part {kind!r} for the Llama 3 format")
        return parts
    raise Llama3FormatError(f"unsupported message content of type {type(content).__name__}")


# --- system prompt and tool definitions (llama-stack's generators) --------------------------------------------------


@dataclass(frozen=True)
class _ToolParam:
    name: str
    description: Any
    required: bool


@dataclass(frozen=True)
class _ToolDef:
    name: str
    description: Any
    params: tuple[_ToolParam, ...]


def _tool_definition(tool: Mapping[str, Any]) -> _ToolDef:
    """An OpenAI tool as llama-stack's ToolDefinition: the top-level properties with their descriptions, and
    whether each is required (from the schema's `required`)."""
    fn = tool.get("function") if tool.get("type", "function") == "function" else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise Llama3FormatError("each tool must be {'type': 'function', 'function': {'name': ...}}")
    schema = fn.get("parameters")
    schema = schema if isinstance(schema, Mapping) else {}
    properties = schema.get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    required = schema.get("required")
    required = required if isinstance(required, list) else []
    params = tuple(
        _ToolParam(name, (prop or {}).get("description") if isinstance(prop, Mapping) else None, name in required)
        for name, prop in properties.items()
    )
    return _ToolDef(fn["name"], fn.get("description"), params)


def _jinja_str(value: Any) -> str:
    """How a Jinja2 `{{ value }}` prints (None prints as "None")."""
    return str(value)


def _jinja_tojson(value: Any) -> str:
    """Jinja2's `tojson` filter: sorted keys, and HTML-sensitive characters escaped."""
    text = json.dumps(value, sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("'", "\\u0027")


def _system_prompt(
    tools: list[_ToolDef],
    system: str | None,
    today: datetime.date | None = None,
    tool_choice: str | None = None,
) -> str:
    """The system message text (BuiltinToolGenerator + SystemDefaultGenerator + the caller's system prompt)."""
    text = ""
    if tools:
        builtin = [t.name for t in tools if t.name in BUILTIN_TOOLS and t.name != "code_interpreter"]
        text += "Environment: ipython\n"
        if builtin:
            text += "Tools: " + ", ".join(builtin).strip()
        text += "\n"
    date = today or datetime.date.today()
    # strftime("%d %B %Y") in the C locale, whatever the process locale is.
    text += f"Cutting Knowledge Date: December 2023\nToday Date: {date.day:02d} {_MONTHS[date.month - 1]} {date.year}"
    if system is not None:
        text += "\n" + system
    if tool_choice and tool_choice != "auto" and tool_choice != "none":
        if tool_choice == "required":
            text += "\nYou MUST use one of the provided functions/tools to answer the user query."
        else:
            text += f"\nYou MUST use the tool `{tool_choice}` to answer the user query."
    return text


def _custom_tools_prompt(tools: list[_ToolDef]) -> str:
    """The user message describing custom tools (llama-stack's JsonCustomToolGenerator, verbatim)."""
    out = (
        "Answer the user's question by making use of the following functions if needed.\n"
        "If none of the function can be used, please say so.\n"
        "Here is a list of functions in JSON format:\n"
    )
    for tool in tools:
        props = ",".join(
            "\n                {\n"
            f'                    "{p.name}": {{\n'
            '                        "type": "object",\n'
            f'                        "description": "{_jinja_str(p.description)}"\n'
            "                    }\n"
            "                }"
            for p in tool.params
        )
        required = _jinja_tojson([p.name for p in tool.params if p.required])
        out += (
            "{\n"
            '    "type": "function",\n'
            '    "function": {\n'
            f'        "name": "{tool.name}",\n'
            f'        "description": "{_jinja_str(tool.description)}",\n'
            '        "parameters": {\n'
            '            "type": "object",\n'
            f'            "properties": [{props}\n'
            "            ],\n"
            f'            "required": {required}\n'
            "        }\n"
            "    }\n"
            "}\n"
        )
    return out + "\nReturn function calls in JSON format."


# --- assistant tool calls ---------------------------------------------------------------------------------------


def _tool_call(call: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    fn = call.get("function")
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise Llama3FormatError("each tool call must have function.name")
    raw = fn.get("arguments")
    if isinstance(raw, str):
        try:
            args = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as e:
            raise Llama3FormatError(f"tool call {fn['name']!r}: arguments are not valid JSON ({e})") from e
    else:
        args = raw if raw is not None else {}
    if not isinstance(args, dict):
        raise Llama3FormatError(f"tool call {fn['name']!r}: arguments must be a JSON object")
    return fn["name"], args


def _encode_tool_call(name: str, args: dict[str, Any]) -> str:
    """llama_models' ToolUtils.encode_tool_call with the JSON tool prompt format."""
    if name in _QUERY_TOOLS:
        if "query" in args:
            query = args["query"]
        elif len(args) == 1:  # Meta would fail here; take the only argument as the query
            query = next(iter(args.values()))
        else:
            raise Llama3FormatError(f"a {name} tool call needs a 'query' argument")
        return f'{name}.call(query="{query}")'
    if name == "code_interpreter":
        if "code" not in args:
            raise Llama3FormatError("a code_interpreter tool call needs a 'code' argument")
        return str(args["code"])
    return json.dumps({"type": "function", "name": name, "parameters": args})


# --- parsing the model's output ---------------------------------------------------------------------------------

_BUILTIN_CALL = re.compile(r'\b(?P<tool_name>\w+)\.call\(query="(?P<query>[^"]*)"\)')
_FUNCTION_TAG_CALL = re.compile(r"<function=(?P<function_name>[^}]+)>(?P<args>{.*?})")
_ASSISTANT_HEADER = f"{START_HEADER}assistant{END_HEADER}\n\n"


@dataclass(frozen=True)
class Llama3ToolCall:
    name: str
    arguments: str  # a JSON object


def parse_llama3_tool_calls(text: str) -> tuple[str | None, list[Llama3ToolCall]]:
    """Split a Llama 3.1 completion into content and tool calls, as llama_models'
    ChatFormat.decode_assistant_message_from_content does.

    `text` is the generated text with special tokens written out (a leading `<|python_tag|>` matters: it marks
    code for code_interpreter); a trailing <|eot_id|> or <|eom_id|> is ignored. Returns (content, calls): with
    a call, content is None (Meta drops the text); at most one call (Llama 3.1 makes one at a time).
    """
    content = text.strip(" ")
    if content.startswith(_ASSISTANT_HEADER):
        content = content[len(_ASSISTANT_HEADER) :]
    ipython = content.startswith(PYTHON_TAG)
    if ipython:
        content = content[len(PYTHON_TAG) :]
    if content.endswith(EOT):
        content = content[: -len(EOT)]
    elif content.endswith(EOM):
        content = content[: -len(EOM)]

    call: tuple[str, dict[str, Any]] | None = None
    custom = _custom_tool_call(content)
    if custom is not None:
        name, args = custom
        if name in BUILTIN_TOOLS and args:
            # The model sometimes calls a built-in tool in the custom format: Meta keeps the first value as query.
            args = {"query": next(iter(args.values()))}
        call = (name, args)
    else:
        match = _BUILTIN_CALL.search(content)
        if match:
            call = (match.group("tool_name"), {"query": match.group("query")})
        elif ipython:
            call = ("code_interpreter", {"code": content})

    if call is None:
        return content, []
    try:
        arguments = json.dumps(call[1], ensure_ascii=False)
    except (TypeError, ValueError):
        return content, []
    return None, [Llama3ToolCall(call[0], arguments)]


def _custom_tool_call(body: str) -> tuple[str, dict[str, Any]] | None:
    """llama_models' ToolUtils.maybe_extract_custom_tool_call, minus its crashes: `<function=name>{...}`, a JSON
    object with "name" and "parameters", or a Python list of calls `[name(arg=value, ...)]` (the first)."""
    match = _FUNCTION_TAG_CALL.search(body)
    if match:
        try:
            args = json.loads(match.group("args").replace("'", '"'))
        except ValueError:
            return None
        return (match.group("function_name"), args) if isinstance(args, dict) else None
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        if (obj.get("type") == "function" or "name" in obj) and isinstance(obj.get("name"), str):
            params = obj.get("parameters")
            if isinstance(params, dict):
                return obj["name"], params
        return None
    return _python_list_call(body)


def _python_list_call(body: str) -> tuple[str, dict[str, Any]] | None:
    try:
        tree = ast.parse(body)
    except (SyntaxError, ValueError):
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
        return None
    expr = tree.body[0].value
    if not isinstance(expr, ast.List) or not expr.elts:
        return None
    for element in expr.elts:
        if not isinstance(element, ast.Call) or not isinstance(element.func, ast.Name) or element.args:
            return None
        if any(k.arg is None for k in element.keywords):
            return None
    first = expr.elts[0]
    assert isinstance(first, ast.Call) and isinstance(first.func, ast.Name)
    try:
        args = {k.arg: ast.literal_eval(k.value) for k in first.keywords if k.arg is not None}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return first.func.id, args


# --- recognising a Llama 3 model --------------------------------------------------------------------------------

_LLAMA3_TOKENS = (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT)


def is_llama3(chat_template: str | None, token_texts: Container[str]) -> bool:
    """Whether a GGUF is a Llama 3.x chat model: its vocabulary has Llama 3's special tokens (token_texts: the
    texts of its tokens, special ones written out) and its chat template, if it has one, uses Llama 3's
    headers (so a fine-tune with another chat format on the Llama 3 vocabulary is not taken for one)."""
    if not all(t in token_texts for t in _LLAMA3_TOKENS):
        return False
    return chat_template is None or START_HEADER in chat_template
