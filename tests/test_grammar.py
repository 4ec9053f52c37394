"""The JSON schema → GBNF compiler on its own: what it refuses (as a SchemaError naming the place), and that
whatever it accepts is a grammar llama.cpp takes. The API validates schemas before they get here; these tests
hold the compiler to the same rules without that help."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import llama_cpp as C
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaserve.chat.grammar import SchemaError, json_schema_grammar
from llamaserve.config import resolve_model
from llamaserve.engine import ContextConfig, LlamaModel

NODE = {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}, "required": ["next"]}


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "array", "minItems": 5, "maxItems": 3}, "schema: minItems 5 is above maxItems 3"),
        ({"type": "string", "minLength": 5, "maxLength": 3}, "schema: minLength 5 is above maxLength 3"),
        ({"type": "array", "minItems": -1}, "schema.minItems must be an integer from 0"),
        ({"type": "string", "maxLength": -2}, "schema.maxLength must be an integer from 0"),
        ({"type": "array", "maxItems": 1.5}, "schema.maxItems must be an integer"),
        ({"type": "array", "minItems": True}, "schema.minItems must be an integer"),
        ({"type": "array", "minItems": 2001}, "from 0 to 2000"),
        ({"type": "array", "prefixItems": {"type": "string"}, "items": False}, "prefixItems must be a non-empty list"),
        ({"type": "array", "prefixItems": 3, "items": False}, "prefixItems must be a non-empty list"),
        ({"type": "array", "items": [{"type": "string"}]}, r"schema\.items must be a JSON schema"),
        ({"type": "array", "items": "string"}, r"schema\.items must be a JSON schema"),
        ({"type": "object", "properties": {"a": 5}}, r"schema\.properties\.a must be a JSON schema"),
        ({"type": "object", "properties": {"a": None}}, r"schema\.properties\.a must be a JSON schema"),
        ({"type": "object", "properties": []}, "properties must be an object"),
        ({"type": "object", "properties": {"a": {}}, "required": "a"}, "required must be a list"),
        ({"type": {"a": 1}}, "is not a JSON schema type"),
        ({"type": []}, "non-empty list of type names"),
        ({"type": "string", "format": ["date"]}, "format"),
        # A loop with no way out: every node must hold another node.
        ({"$defs": {"node": NODE}, "$ref": "#/$defs/node"}, r"\$ref '#/\$defs/node'.*no finite value"),
        ({"type": "array", "items": {"$ref": "#"}, "minItems": 1}, "no finite value"),
        ({"type": "array", "prefixItems": [{"$ref": "#"}], "items": False}, "no finite value"),
        (
            {
                "$defs": {
                    "a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}}, "required": ["b"]},
                    "b": {"type": "array", "items": {"$ref": "#/$defs/a"}, "minItems": 2},
                },
                "$ref": "#/$defs/a",
            },
            "no finite value",
        ),  # fmt: skip
        # Left recursion (llama.cpp refuses it), with or without a way out.
        ({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}}, "$ref": "#/$defs/a"}, "left recursion"),
        ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"oneOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}, "left"),
        ({"anyOf": [{"$ref": "#"}, {"type": "string"}]}, "left recursion"),
    ],
)
def test_the_compiler_refuses(schema: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        json_schema_grammar(schema)


@pytest.mark.parametrize(
    "schema",
    [
        {"$defs": {"node": {**NODE, "required": []}}, "$ref": "#/$defs/node"},  # the next node is optional
        {"type": "array", "items": {"$ref": "#"}},  # nested empty arrays end
        {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}, "required": ["kids"]},
        {"anyOf": [{"type": "string"}, {"type": "array", "items": {"$ref": "#"}, "minItems": 1}]},
        {"type": "array", "minItems": 3, "maxItems": 3},
        {"type": "array", "minItems": 2000, "maxItems": 1_000_000},
        {"type": "array", "maxItems": 0, "items": {"$ref": "#/nowhere"}},  # no item ever: items is moot
        {"type": "string", "minLength": 0, "maxLength": 0},
        # Optional properties: 46 broke llama.cpp's parser when each one's chain of later ones was written out.
        {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(300)}},
        {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(300)}, "required": ["p7"]},
    ],
)
def test_the_compiler_takes(schema: dict[str, Any], vocab: Any) -> None:
    grammar = json_schema_grammar(schema)
    assert len(grammar) < 200_000  # linear in the schema's size
    assert_llama_takes(grammar, vocab)


@pytest.fixture(scope="module")
def vocab() -> Iterator[Any]:
    path, _ = resolve_model(None)
    model = LlamaModel(str(path), ContextConfig(n_ctx_seq=256, n_seq_max=1, n_batch=32, n_threads=1))
    yield model.vocab
    model.close()


def assert_llama_takes(grammar: str, vocab: Any) -> None:
    sampler = C.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    assert sampler, grammar
    C.llama_sampler_free(sampler)


# Schema-shaped JSON: the supported keywords (and a few others) with values of any JSON type, nested.
SCALARS = st.none() | st.booleans() | st.integers(-3, 2500) | st.floats(-2, 2, allow_nan=False) | st.text(max_size=4)
KEYS = st.sampled_from(
    ["type", "properties", "required", "items", "prefixItems", "minItems", "maxItems", "minLength", "maxLength",
     "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "additionalProperties", "format", "title", "a"]
)  # fmt: skip
VALUES = st.sampled_from(
    ["object", "array", "string", "number", "integer", "boolean", "null", "date", "#", "#/$defs/a", "#/$defs/b"]
)
SCHEMAS = st.recursive(
    SCALARS | VALUES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS | st.sampled_from(["a", "b"]), inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS)
def test_any_json_is_a_grammar_llama_takes_or_a_schema_error(schema: Any, vocab: Any) -> None:
    try:
        grammar = json_schema_grammar(schema)
    except SchemaError:
        return
    # What the compiler accepts, llama.cpp must take: a refusal there is a 500 (or worse) at the engine.
    assert_llama_takes(grammar, vocab)
