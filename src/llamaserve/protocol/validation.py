"""Field types of requests that check what pydantic's str and dict do not: text that UTF-8 can carry, and JSON
schemas that are schemas and that llama.cpp's grammar parser can take."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from llamaserve.chat.grammar import MAX_MAX_COUNT, MAX_MIN_COUNT
from llamaserve.protocol.errors import UNSUPPORTED


def _first_unencodable(text: str) -> int | None:
    """Where `text` has a lone UTF-16 surrogate (JSON allows the escape "\\ud800"; UTF-8 cannot carry it), if it
    does."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def valid_unicode(text: str) -> str:
    """Text must survive UTF-8: the tokenizer, the database, grammars and logs all encode it."""
    at = _first_unencodable(text)
    if at is not None:
        raise ValueError(f"text must be valid Unicode: a lone surrogate (U+{ord(text[at]):04X}) at character {at}")
    return text


def valid_unicode_tree(value: Any) -> Any:
    """Every string in a JSON value (keys too) must be valid Unicode. Iterative: nesting depth costs no stack."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            valid_unicode(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


# --- JSON schemas in requests (response_format, tool parameters) ---------------------------------------------
# They become llama.cpp grammars, compiled on the engine's thread: a schema that is not one, or whose counts
# the grammar parser cannot take (it refuses a minimum over 2000 repetitions; a minimum above the maximum makes it
# allocate without end), must stop here, as a 400 naming it, before it can stall or kill the engine.
MAX_SCHEMA_DEPTH = 64  # nested objects and arrays; real schemas are a fraction of this
# Bounds on a schema's size, in the spirit of OpenAI's for structured outputs: a grammar's compilation grows with
# them (a 20,000-value enum took 21 s of the engine's thread).
MAX_SCHEMA_BYTES = 64 * 1024  # as JSON
MAX_ENUM_VALUES = 1000  # enum values in one schema, all enums together
COUNTS = ("minItems", "maxItems", "minLength", "maxLength")
DATA_KEYWORDS = {"enum", "const", "default", "examples"}  # their values are JSON data, not schemas
_META = Draft202012Validator(Draft202012Validator.META_SCHEMA)


def _where(path: Iterable[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "the schema"


def _check_depth(schema: Any) -> None:
    stack = [(schema, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)


def _check_counts(schema: Any) -> None:
    """minItems, maxItems, minLength, maxLength: integers the grammar can repeat, the minimum not above the
    maximum (the meta-schema lets 1.0 through and says nothing of the order)."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(schema, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, list):
            stack.extend((child, (*path, i)) for i, child in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        counts = {k: node[k] for k in COUNTS if k in node and not isinstance(node[k], dict)}
        for key, value in counts.items():
            top = MAX_MIN_COUNT if key.startswith("min") else MAX_MAX_COUNT
            if type(value) is not int or not 0 <= value <= top:
                raise ValueError(f"{_where((*path, key))} must be an integer from 0 to {top}, got {value!r}")
        for lo, hi in (("minItems", "maxItems"), ("minLength", "maxLength")):
            if lo in counts and hi in counts and counts[lo] > counts[hi]:
                raise ValueError(f"{_where(path)}: {lo} {counts[lo]} is above {hi} {counts[hi]}")
        stack.extend((child, (*path, k)) for k, child in node.items() if k not in DATA_KEYWORDS)


TRANSPARENT = ("anyOf", "oneOf", "allOf")  # keywords whose alternatives start where the schema starts


def _resolve(root: Any, ref: str) -> Any:
    """The schema a local $ref ("#/$defs/a") points at, or None."""
    if not ref.startswith("#/"):
        return None
    target = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, dict) or part not in target:
            return None
        target = target[part]
    return target


def _first_refs(node: Any) -> set[str]:
    """The $refs a schema may begin with: itself a $ref, or one through anyOf, oneOf or allOf."""
    found: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("$ref"), str):
            found.add(item["$ref"])
        for keyword in TRANSPARENT:
            if isinstance(item.get(keyword), list):
                stack.extend(item[keyword])
    return found


def _check_ref_cycles(schema: dict[str, Any]) -> None:
    """A $ref that leads back to itself through $ref, anyOf, oneOf or allOf alone, with no object, array or
    string opened in between, describes no finite value; as a grammar it is left-recursive, which llama.cpp
    refuses. (Recursion through properties or items is fine.)"""
    starts = {item["$ref"] for item in _walk(schema) if isinstance(item, dict) and isinstance(item.get("$ref"), str)}
    for start in starts:
        seen, stack = set(), [start]
        while stack:
            for ref in _first_refs(_resolve(schema, stack.pop())):
                if ref == start:
                    raise ValueError(f"$ref {start!r} leads back to itself before any object, array or string")
                if ref not in seen:
                    seen.add(ref)
                    stack.append(ref)


def _walk(value: Any) -> Iterator[Any]:
    stack = [value]
    while stack:
        item = stack.pop()
        yield item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


@functools.lru_cache(maxsize=1024)
def _schema_problem(text: str) -> str | None:
    """What is wrong with a schema (as JSON text: the cache's key), or None. Checking against the meta-schema
    takes milliseconds, and agents send the same tools with every turn."""
    schema = json.loads(text)
    error = best_match(_META.iter_errors(schema))
    if error is not None:
        return f"not a valid JSON schema: {_where(error.absolute_path)}: {error.message}"
    try:
        _check_counts(schema)
        _check_ref_cycles(schema)
    except ValueError as e:
        return str(e)
    return None


def valid_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    valid_unicode_tree(schema)
    _check_depth(schema)
    text = json.dumps(schema, sort_keys=True)
    if len(text) > MAX_SCHEMA_BYTES:
        raise ValueError(f"the schema is {len(text)} bytes as JSON; at most {MAX_SCHEMA_BYTES} are accepted")
    enums = sum(
        len(node["enum"]) for node in _walk(schema) if isinstance(node, dict) and isinstance(node.get("enum"), list)
    )
    if enums > MAX_ENUM_VALUES:
        raise ValueError(f"the schema has {enums} enum values; at most {MAX_ENUM_VALUES} are accepted")
    problem = _schema_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return schema


def json_size_at_most(limit: int, what: str) -> Callable[[Any], Any]:
    """A before-validator: a JSON value (as parsed) of at most `limit` bytes, before any of it is validated."""

    def check(value: Any) -> Any:
        try:
            size = len(json.dumps(value, ensure_ascii=False).encode())
        except (TypeError, ValueError):  # not JSON data: the field's own validation says what is wrong
            return value
        if size > limit:
            raise ValueError(f"{what} are {size} bytes as JSON; at most {limit} are accepted")
        return value

    return check


def unsupported(reason: str) -> Any:
    """The type of a field OpenAI has and we do not honour: null (or absent) is accepted, any other value is a
    400 `unsupported_parameter` naming it, with `reason`."""

    def refuse(value: Any) -> None:
        if value is not None:
            raise PydanticCustomError(UNSUPPORTED, reason)

    return Annotated[None, BeforeValidator(refuse), Field(description=f"Not supported here: {reason}", exclude=True)]


def no_nul(text: str) -> str:
    """PostgreSQL's text cannot hold U+0000: a name with one would fail in the database, as a 500."""
    if "\x00" in text:
        raise ValueError("text must not contain U+0000 (NUL)")
    return text


# Strings and JSON schemas of requests: what pydantic's str and dict accept, less what would break downstream.
Text = Annotated[str, AfterValidator(valid_unicode)]
# Text that the store keeps or looks up (names, emails, notes, key prefixes); the spec states the rule too.
StoredText = Annotated[
    str, AfterValidator(valid_unicode), AfterValidator(no_nul), Field(json_schema_extra={"pattern": "^[^\\x00]*$"})
]
JSONSchema = Annotated[dict[str, Any], AfterValidator(valid_json_schema)]
