"""JSON schema → llama.cpp grammar (GBNF), for structured output and forced tool calls.

Written here rather than taken from llama-cpp-python's `llama_grammar` converter: that one lets raw control
characters into strings (invalid JSON), reads `{}` as "an object", and skips keywords it does not know
(`minimum`, `format: email`, ...) without a word. Here the supported subset is explicit and everything outside
it is a `SchemaError` naming the keyword and where it is, which the API turns into a 400.

Supported: type (one or a list), enum, const, anyOf, oneOf (as anyOf), allOf of one schema, local $ref
($defs / definitions, recursion allowed); objects with properties, required, additionalProperties; arrays with
items, prefixItems, minItems, maxItems; strings with minLength, maxLength and format date, time, date-time,
uuid. Annotations (title, description, default, examples, ...) are ignored. Objects without
additionalProperties get only their declared properties: a subset of what the schema allows, so the output
still validates.

The compiler checks what it is given itself (the API validates schemas first, but a grammar llama.cpp refuses,
or one whose repetition counts make it allocate without end, must never reach the engine): counts are integers
in range and in order, every part is a schema, and every rule can end (no $ref loop without a way out, none
that is left-recursive).
"""

from __future__ import annotations

import json
import re
from typing import Any

ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$defs",
        "definitions",
    }
)
KEYWORDS = {
    "object": {"type", "properties", "required", "additionalProperties"},
    "array": {"type", "items", "prefixItems", "minItems", "maxItems"},
    "string": {"type", "minLength", "maxLength", "format"},
    "number": {"type"},
    "integer": {"type"},
    "boolean": {"type"},
    "null": {"type"},
}
STRING_FORMATS = {
    "date": r'"\"" date "\"" ws',
    "time": r'"\"" time "\"" ws',
    "date-time": r'"\"" date "T" time "\"" ws',
    "uuid": r'"\"" ' + ' "-" '.join(f"[0-9a-fA-F]{{{n}}}" for n in (8, 4, 4, 4, 12)) + r' "\"" ws',
}
# Whitespace is bounded so a small model cannot pad forever between tokens of JSON.
BASE_RULES = {
    "ws": r'| " " | "\n" [ \t]{0,20}',
    "value": "object | array | string | number | boolean | null",
    "object": r'"{" ws ( string ":" ws value ( "," ws string ":" ws value )* )? "}" ws',
    "array": r'"[" ws ( value ( "," ws value )* )? "]" ws',
    "string": r'"\"" char* "\"" ws',
    "char": r'[^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "number": r'"-"? int-part ( "." [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,16} )? ws',
    "integer": r'"-"? int-part ws',
    "int-part": r"[0] | [1-9] [0-9]{0,15}",
    "boolean": r'( "true" | "false" ) ws',
    "null": r'"null" ws',
    "date": r'[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )',
    "time": r'( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? '
    r'( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )',
}
RULE_DEPS = {
    "value": ["object", "array", "string", "number", "boolean", "null"],
    "object": ["ws", "string", "value"],
    "array": ["ws", "value"],
    "string": ["char", "ws"],
    "number": ["int-part", "ws"],
    "integer": ["int-part", "ws"],
    "boolean": ["ws"],
    "null": ["ws"],
}


MAX_MIN_COUNT = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD: it refuses a grammar that repeats more
MAX_MAX_COUNT = 1_000_000  # an upper bound beyond any output a context holds
MAX_DEPTH = 64  # nested schemas; the walk is recursive


class SchemaError(ValueError):
    """A schema outside the supported subset; the message names the keyword and its place."""


def literal(text: str) -> str:
    """A GBNF string literal matching `text` exactly."""
    return json.dumps(text, ensure_ascii=False)


class Grammar:
    """Collects rules; `schema()` adds the rules for a JSON schema and returns the name of its rule."""

    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        self._root_schema: dict[str, Any] = {}
        self._refs: dict[str, str] = {}
        self._depth = 0
        # For the termination checks, per rule of ours (base rules always end): its alternatives, each the set of
        # rules it cannot do without; the rules it may begin with (before any character of its own); its place.
        self._needs: dict[str, list[set[str]]] = {}
        self._heads: dict[str, set[str]] = {}
        self._where: dict[str, str] = {}

    def base(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = BASE_RULES[name]
            for dep in RULE_DEPS.get(name, []):
                self.base(dep)
        return name

    def schema(self, schema: Any, name: str, where: str = "schema") -> str:
        """Rules for a whole schema document (its $defs resolvable by $ref); returns its rule name."""
        if not isinstance(schema, dict | bool):
            raise SchemaError(f"{where} must be a JSON schema object")
        self._root_schema = schema if isinstance(schema, dict) else {}
        self._refs = {}
        root = self._visit(schema, name, where)
        self._check_left_recursion()
        self._check_termination()
        return root

    def render(self, root: str) -> str:
        """The grammar text with `root ::= <root>`."""
        lines = [f"root ::= {root}"]
        lines += [f"{name} ::= {body}" for name, body in self.rules.items()]
        return "\n".join(lines) + "\n"

    # --- the schema walk -----------------------------------------------------------------------------------
    def _add(self, name: str, body: str, needs: list[set[str]] | None = None, where: str = "") -> str:
        """Add a rule (a new name unless the same rule exists); `needs`: its alternatives' indispensable rules,
        as _check_termination reads them (default: it needs none)."""
        base = re.sub(r"[^a-zA-Z0-9-]+", "-", name).strip("-") or "r"
        key, i = base, 0
        while key in BASE_RULES or (key in self.rules and self.rules[key] != body):
            i += 1
            key = f"{base}-{i}"
        self.rules[key] = body
        self._needs[key] = needs if needs is not None else [set()]
        self._where.setdefault(key, where)
        return key

    def _choice(self, name: str, alts: list[str], where: str) -> str:
        """A rule that is one of `alts` (rules), each of which it begins with."""
        key = self._add(name, " | ".join(alts), [{a} for a in alts], where)
        self._heads[key] = set(alts)
        return key

    def _visit(self, schema: Any, name: str, where: str) -> str:
        if self._depth >= MAX_DEPTH:
            raise SchemaError(f"{where}: the schema nests deeper than {MAX_DEPTH} levels")
        self._depth += 1
        try:
            return self._visit_schema(schema, name, where)
        finally:
            self._depth -= 1

    def _visit_schema(self, schema: Any, name: str, where: str) -> str:
        if schema is True or schema == {}:
            return self.base("value")
        if schema is False:
            raise SchemaError(f"{where}: a schema that accepts nothing (false) cannot be generated")
        if not isinstance(schema, dict):
            raise SchemaError(f"{where} must be a JSON schema (an object or a boolean), got {_kind(schema)}")
        if "$ref" in schema:
            self._only(schema, {"$ref"}, where)
            return self._ref(schema["$ref"], where)
        for combinator in ("anyOf", "oneOf"):
            if combinator in schema:
                self._only(schema, {combinator}, where)
                options = schema[combinator]
                if not isinstance(options, list) or not options:
                    raise SchemaError(f"{where}.{combinator} must be a non-empty list of schemas")
                alts = [self._visit(s, f"{name}-{i}", f"{where}.{combinator}[{i}]") for i, s in enumerate(options)]
                return self._choice(name, alts, where)
        if "allOf" in schema:
            self._only(schema, {"allOf"}, where)
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise SchemaError(f"{where}.allOf with more than one schema is not supported")
            return self._visit(parts[0], name, f"{where}.allOf[0]")
        if "const" in schema:
            self._only(schema, {"const"}, where)
            return self._add(name, self._constant(schema["const"]))
        if "enum" in schema:
            self._only(schema, {"enum", "type"}, where)
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}.enum must be a non-empty list")
            return self._add(name, " | ".join(self._constant(v) for v in values))
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind or not all(isinstance(t, str) for t in kind):
                raise SchemaError(f"{where}.type must be a type name or a non-empty list of type names")
            alts = [self._visit({**schema, "type": t}, f"{name}-{t}", where) for t in kind]
            return self._choice(name, alts, where)
        if kind is None:
            kind = self._implied_type(schema, where)
        if not isinstance(kind, str) or kind not in KEYWORDS:
            raise SchemaError(f"{where}.type {kind!r} is not a JSON schema type")
        self._only(schema, KEYWORDS[kind], where)
        if kind == "object":
            return self._object(schema, name, where)
        if kind == "array":
            return self._array(schema, name, where)
        if kind == "string":
            return self._string(schema, name, where)
        return self.base(kind)

    def _only(self, schema: dict[str, Any], allowed: set[str], where: str) -> None:
        for key in schema:
            if key not in allowed and key not in ANNOTATIONS:
                raise SchemaError(f"{where}: the JSON schema keyword {key!r} is not supported here")

    def _implied_type(self, schema: dict[str, Any], where: str) -> str:
        keys = set(schema) - ANNOTATIONS
        for kind in ("object", "array", "string"):
            if keys <= KEYWORDS[kind]:
                return kind
        unknown = sorted(keys - set().union(*KEYWORDS.values()))
        raise SchemaError(f"{where}: the JSON schema keyword {(unknown or sorted(keys))[0]!r} is not supported")

    def _constant(self, value: Any) -> str:
        return f"{literal(json.dumps(value, ensure_ascii=False))} {self.base('ws')}"

    def _ref(self, ref: Any, where: str) -> str:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise SchemaError(f"{where}.$ref {ref!r}: only local references (#, #/$defs/...) are supported")
        if ref in self._refs:
            return self._refs[ref]
        target: Any = self._root_schema
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"{where}.$ref {ref!r} points at nothing")
            target = target[part]
        # Reserve the name first (the target may refer to itself), with a body no other rule has.
        name = self._add("ref-" + (ref[2:] or "root"), f"<{ref}>", where=f"{where}.$ref {ref!r}")
        self._refs[ref] = name
        target_rule = self._visit(target, name + "-def", ref)
        self.rules[name] = target_rule
        self._needs[name] = [{target_rule}]
        self._heads[name] = {target_rule}
        return name

    def _object(self, schema: dict[str, Any], name: str, where: str) -> str:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise SchemaError(f"{where}.properties must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"{where}.required must be a list of property names")
        missing = [r for r in required if r not in props]
        if missing:
            raise SchemaError(f"{where}.required names {missing[0]!r}, which is not in properties")
        extra = schema.get("additionalProperties", False if props else True)
        if not props and extra is True:
            return self.base("object")
        ws = self.base("ws")
        kv = {key: self._property(name, key, sub, f"{where}.properties.{key}") for key, sub in props.items()}
        must = [kv[k] for k in props if k in required]
        may = [kv[k] for k in props if k not in required]
        if extra is not False:
            value = self._visit(extra, f"{name}-extra", f"{where}.additionalProperties")
            extra_kv = self._add(f"{name}-extra-kv", f'{self.base("string")} ":" ws {value}', [{value}])
            may.append(self._add(f"{name}-extra-kvs", f'{extra_kv} ( "," ws {extra_kv} )*', [{extra_kv}]))
        parts = []
        if must:
            parts.append(f' "," {ws} '.join(must))
            parts += [f'( "," {ws} {k} )?' for k in may]
        elif may:  # any of them may come first; each is followed by any of those after it (a rule per suffix:
            # written out in full, the chains grew with the square of the count and 46 properties broke llama.cpp)
            rest = ""
            chains = []
            for i in range(len(may) - 1, -1, -1):
                chains.append(f"{may[i]} {rest}".strip())
                if i:
                    rest = self._add(f"{name}-after-{i}", f'( "," {ws} {may[i]} )? {rest}'.strip())
            parts.append("( " + " | ".join(reversed(chains)) + " )?")
        body = " ".join(parts)
        return self._add(name, f'"{{" {ws} {body} "}}" {ws}', [set(must)], where)

    def _property(self, name: str, key: str, sub: Any, where: str) -> str:
        """The rule for `"key": value` of one property."""
        value = self._visit(sub, f"{name}-{key}", where)
        return self._add(
            f"{name}-{key}-kv", f'{literal(json.dumps(key, ensure_ascii=False))} ws ":" ws {value}', [{value}]
        )

    def _array(self, schema: dict[str, Any], name: str, where: str) -> str:
        ws = self.base("ws")
        if "prefixItems" in schema:
            items = schema["prefixItems"]
            if not isinstance(items, list) or not items:
                raise SchemaError(f"{where}.prefixItems must be a non-empty list of schemas")
            if schema.get("items", False) is not False or "minItems" in schema or "maxItems" in schema:
                raise SchemaError(f"{where}: prefixItems is supported only as a fixed tuple (items: false)")
            parts = [self._visit(s, f"{name}-{i}", f"{where}.prefixItems[{i}]") for i, s in enumerate(items)]
            body = f'"[" {ws} ' + f' "," {ws} '.join(parts) + f' "]" {ws}'
            return self._add(name, body, [set(parts)], where)
        lo, hi = _counts(schema, "minItems", "maxItems", where)
        if hi == 0:
            return self._add(name, f'"[" {ws} "]" {ws}')
        item = self._visit(schema.get("items", True), f"{name}-item", f"{where}.items")
        more = f'( "," {ws} {item} )'
        if lo == 0:
            repeat = "*" if hi is None else f"{{0,{hi - 1}}}"
            body = f"( {item} {more}{repeat} )?"
        else:
            body = f"{item} {more}{{{lo - 1},{'' if hi is None else hi - 1}}}"
        return self._add(name, f'"[" {ws} {body} "]" {ws}', [{item} if lo else set()], where)

    def _string(self, schema: dict[str, Any], name: str, where: str) -> str:
        if "format" in schema:
            fmt = schema["format"]
            if not isinstance(fmt, str) or fmt not in STRING_FORMATS:
                raise SchemaError(f"{where}.format {fmt!r} is not supported (supported: {', '.join(STRING_FORMATS)})")
            for dep in ("date", "time", "ws"):
                self.base(dep)
            return self._add(name, STRING_FORMATS[fmt])
        if "minLength" not in schema and "maxLength" not in schema:
            return self.base("string")
        lo, hi = _counts(schema, "minLength", "maxLength", where)
        char = self.base("char")
        return self._add(name, rf'"\"" {char}{{{lo},{"" if hi is None else hi}}} "\"" {self.base("ws")}')

    # --- termination -------------------------------------------------------------------------------------------
    def _check_left_recursion(self) -> None:
        """A rule that may begin with itself ($ref, anyOf, oneOf or a type list back to itself before any
        character) is left-recursive: llama.cpp refuses such a grammar."""
        done: set[str] = set()
        for start in self._heads:
            path, stack = {start}, [(start, iter(self._heads[start]))]
            while stack:
                rule, heads = stack[-1]
                head = next(heads, None)
                if head is None:
                    stack.pop()
                    path.discard(rule)
                    done.add(rule)
                elif head in path:
                    raise SchemaError(
                        f"{self._loop_where(head)}: leads back to itself before any object, array or string "
                        "(left recursion)"
                    )
                elif head not in done:
                    path.add(head)
                    stack.append((head, iter(self._heads.get(head, ()))))

    def _check_termination(self) -> None:
        """Every rule must be able to end: a rule ends when one of its alternatives needs only rules that end.
        A schema whose every value must hold another of itself (a $ref loop with no way out) has no finite
        value; llama.cpp would take its grammar and generate until max_tokens."""
        ends = set(BASE_RULES)
        grew = True
        while grew:
            grew = False
            for rule, alternatives in self._needs.items():
                if rule not in ends and any(needs <= ends for needs in alternatives):
                    ends.add(rule)
                    grew = True
        stuck = [rule for rule in self._needs if rule not in ends]
        if stuck:
            raise SchemaError(
                f"{self._loop_where(stuck[0])}: no finite value matches this schema "
                "(every value must contain another one of itself: a $ref loop with no way out)"
            )

    def _loop_where(self, rule: str) -> str:
        """The place to name for a rule in a loop: the first $ref of the loop if there is one."""
        return self._where.get(rule) or "the schema"


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _counts(schema: dict[str, Any], low: str, high: str, where: str) -> tuple[int, int | None]:
    """A schema's minimum and maximum count (minItems/maxItems or minLength/maxLength): integers llama.cpp can
    repeat, the minimum not above the maximum (a `{5,3}` repetition makes llama.cpp allocate without end)."""
    for key, top in ((low, MAX_MIN_COUNT), (high, MAX_MAX_COUNT)):
        value = schema.get(key, 0)
        if type(value) is not int or not 0 <= value <= top:
            raise SchemaError(f"{where}.{key} must be an integer from 0 to {top}, got {value!r}")
    lo, hi = schema.get(low, 0), schema.get(high)
    if hi is not None and lo > hi:
        raise SchemaError(f"{where}: {low} {lo} is above {high} {hi}")
    return lo, hi


def json_object_grammar() -> str:
    """Any JSON object: `response_format: {"type": "json_object"}`."""
    g = Grammar()
    return g.render(g.base("object"))


def json_schema_grammar(schema: Any, where: str = "schema") -> str:
    """Values valid under `schema`; SchemaError names what is not supported."""
    g = Grammar()
    return g.render(g.schema(schema, "value-root", where))
