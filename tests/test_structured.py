"""Structured output by constrained decoding: on the 135M default model, JSON mode always gives a JSON object
and json_schema always gives a document the schema accepts (checked with the jsonschema library)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import jsonschema
import openai
import pytest

from llamaserve.chat.grammar import SchemaError, json_schema_grammar
from tests.conftest import MODEL

T = TypeVar("T")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "email": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"enum": ["friend", "colleague", "family"]}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "minLength": 5, "maxLength": 5}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "born": {"type": "string", "format": "date"},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
RECURSIVE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "value": {"type": "number"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
            },
            "required": ["value", "children"],
        }
    },
    "$ref": "#/$defs/node",
}
WITH_DEFS = {
    "$defs": {
        "place": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    },
    "type": "object",
    "properties": {"from": {"$ref": "#/$defs/place"}, "to": {"$ref": "#/$defs/place"}},
    "required": ["from", "to"],
}
PROMPTS = [
    "Describe a person you know.",
    "Tell me about your best friend in JSON.",
    "Who wrote Hamlet?",
    "Write a haiku about autumn.",
]


def ask(client: openai.OpenAI, content: str, response_format: dict[str, Any], **kwargs: Any) -> tuple[str, str]:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        response_format=response_format,  # type: ignore[arg-type]
        **kwargs,
    )
    assert r.choices[0].message.content is not None
    return r.choices[0].message.content, r.choices[0].finish_reason


def concurrently(call: Callable[..., T], arguments: list[tuple[Any, ...]]) -> list[T]:
    """`call` on each tuple of arguments at once (the engine batches them), results in order."""
    with ThreadPoolExecutor(len(arguments)) as pool:
        return list(pool.map(lambda args: call(*args), arguments))


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_json_object_mode_gives_an_object(client: openai.OpenAI) -> None:
    """Every reply that ends by itself is a JSON object. A 135M model sometimes loops inside the JSON (keys
    that grow forever); such a reply runs into max_tokens and says "length", never a false "stop". (The replies
    that end do so in under 70 tokens here; those that loop run to max_tokens, and take the test's time.)"""

    def one(content: str, seed: int) -> tuple[str, str]:
        return ask(client, content, {"type": "json_object"}, max_tokens=100, temperature=0.7, seed=seed)

    replies = concurrently(one, [(content, seed) for content in PROMPTS for seed in (1, 2)])
    for text, reason in replies:
        if reason == "stop":
            assert isinstance(json.loads(text), dict), text
        else:
            assert reason == "length" and text.lstrip().startswith("{"), text
    reasons = [reason for _, reason in replies]
    assert reasons.count("stop") >= len(reasons) // 2, reasons


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_output_validates(client: openai.OpenAI, seed: int) -> None:
    text, reason = ask(
        client, "Describe a person you know.", schema_format(PERSON), max_tokens=300, temperature=0.8, seed=seed
    )
    assert reason == "stop", text
    jsonschema.validate(json.loads(text), PERSON)


def test_schema_with_refs(client: openai.OpenAI) -> None:
    text, reason = ask(client, "Plan a trip.", schema_format(WITH_DEFS), max_tokens=100, temperature=0)
    assert reason == "stop", text
    jsonschema.validate(json.loads(text), WITH_DEFS)


# A node's first child: where the recursive $ref expands once more.
CHILD = re.compile(r'"children"\s*:\s*\[\s*\{\s*"value"\s*:')


def test_recursive_schema(client: openai.OpenAI) -> None:
    """Recursive $ref compiles and constrains; a tree the model ends validates (this small model tends to nest
    until max_tokens, which it reports as "length"). The $ref expands at every level: some tree reaches a
    grandchild of the root (here each of the four does, within 45 tokens)."""

    def one(seed: int) -> tuple[str, str]:
        tree = schema_format(RECURSIVE)
        return ask(client, "A small tree of numbers.", tree, max_tokens=64, temperature=0.8, seed=seed)

    replies = concurrently(one, [(1,), (2,), (3,), (4,)])
    for text, reason in replies:
        if reason == "stop":
            jsonschema.validate(json.loads(text), RECURSIVE)
        else:
            assert reason == "length" and re.match(r'\s*\{\s*"value"\s*:', text), text
    assert max(len(CHILD.findall(text)) for text, _ in replies) >= 2, replies


def test_json_schema_streaming_matches(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a person you know."}],
        response_format=schema_format(PERSON),
        max_tokens=300,
        temperature=0,
    )
    whole = client.chat.completions.create(**kwargs)
    text, reason = "", None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    assert text == whole.choices[0].message.content and reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_cut_json_is_length_not_stop(client: openai.OpenAI) -> None:
    text, reason = ask(client, "Describe a person you know.", schema_format(PERSON), max_tokens=6, temperature=0)
    assert reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_without_constraint_the_model_writes_prose(client: openai.OpenAI) -> None:
    """The constraint is what makes the output JSON: the same request without it is not JSON."""
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=64, temperature=0
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content or "")


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "integer", "exclusiveMinimum": 0}, "exclusiveMinimum"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "patternProperties": {"^a": {}}}, "patternProperties"),
        ({"$ref": "https://example.com/schema.json"}, "only local references"),
        ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf"),
        ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "'b'"),
        ({"type": "decimal"}, "decimal"),
    ],
)
def test_unsupported_schemas_are_named(schema: dict[str, Any], keyword: str) -> None:
    with pytest.raises(SchemaError, match=keyword):
        json_schema_grammar(schema)
