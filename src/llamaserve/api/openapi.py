"""The OpenAPI document at /openapi.json, true to what the server does.

FastAPI's own document is close but says three untrue things, which this module corrects: that bad input is a
422 (the server answers 400 with an OpenAI error body), that nothing else can go wrong (every route has its
errors, all in one shape), and that streams are JSON (they are server-sent events of chunk objects). It also
declares who may call what: the API key (Bearer) on the inference and account routes, the admin key or an
admin's session on /admin, a session (and its CSRF token on changes) on the dashboard's routes.

Which errors a route declares: 400 for any route that takes input, 500 for every route, 401/403 for every
authenticated one (found from its dependencies, so a new route gets them by using the same ones), and the
route's own in ROUTE_ERRORS below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from llamaserve.api.platform.admin import require_admin
from llamaserve.api.platform.auth import PRESESSION_COOKIE, csrf_header, require_session
from llamaserve.api.platform.keys import require_caller
from llamaserve.api.runtime.lifecycle import PROBES
from llamaserve.protocol.chat import ChatCompletionChunk
from llamaserve.protocol.completions import CompletionChunk
from llamaserve.protocol.errors import ErrorResponse

REF = "#/components/schemas/{model}"
ERROR_REF = {"$ref": REF.format(model="ErrorResponse")}

# What each status means, as docs/api.md's error table says it.
STATUS_TEXT = {
    400: "Bad input: `param` names the parameter (invalid_value, unrecognized_argument, ...).",
    401: "No credentials, malformed ones, or unknown or revoked ones.",
    402: "The balance cannot cover the request's worst case (insufficient_credits).",
    403: "Not allowed: key disabled, account suspended, model not allowed, not an admin, or a failed CSRF check.",
    404: "Not found (for another account's things too: they are not revealed to exist).",
    409: "Conflicts with the present state: it exists already, the engine is busy (engine_busy), or a request "
    "with the same Idempotency-Key still runs (idempotency_key_in_use).",
    413: "The body is larger than the server takes (`--max-body-mb`; request_too_large).",
    429: "Over a rate limit (`Retry-After` says when to come back).",
    500: "A bug or an engine failure; the message carries the request id, never a traceback.",
    502: "An upstream engine is unreachable, reset the connection or failed (bad_gateway).",
    503: "Try again later (`Retry-After`): the engine's queue is full (engine_overloaded), the database is "
    "unreachable (database_unavailable) or the server is shutting down (shutting_down).",
    504: "Ran past the request timeout (request_timeout) or an upstream's (upstream_timeout).",
}
INFERENCE = (402, 404, 409, 429, 502, 503, 504)  # 409: an Idempotency-Key still in use
# The errors particular to a route, beyond 400 (input), 401/403 (credentials) and 500 (any).
ROUTE_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("POST", "/v1/chat/completions"): INFERENCE,
    ("POST", "/v1/{model}"): INFERENCE,
    ("POST", "/v1/completions"): INFERENCE,
    ("GET", "/v1/models/{model_id}"): (404,),
    ("POST", "/tokenize"): (404, 429),
    ("POST", "/detokenize"): (404, 429),
    ("POST", "/v1/files"): (409, 413, 429),
    ("GET", "/v1/files"): (404,),
    ("GET", "/v1/files/{file_id}"): (404,),
    ("GET", "/v1/files/{file_id}/content"): (404,),
    ("DELETE", "/v1/files/{file_id}"): (404,),
    ("POST", "/v1/batches"): (404, 409, 429),
    ("GET", "/v1/batches"): (404,),
    ("GET", "/v1/batches/{batch_id}"): (404,),
    ("POST", "/v1/batches/{batch_id}/cancel"): (404,),
    ("POST", "/admin/accounts"): (409,),
    ("PATCH", "/admin/accounts/{name}"): (404,),
    ("POST", "/admin/accounts/{name}/credits"): (404,),
    ("POST", "/admin/accounts/{name}/keys"): (404,),
    ("POST", "/admin/keys/{prefix}/{action}"): (404,),
    ("POST", "/admin/engine/reset-prefix-cache"): (404, 409),
    ("POST", "/auth/signup"): (403, 409, 429),
    ("POST", "/v1/dashboard/keys"): (403,),
    ("POST", "/auth/login"): (401, 403, 429),
    ("PATCH", "/v1/dashboard/keys/{prefix}"): (404,),
    ("POST", "/v1/dashboard/keys/{prefix}/revoke"): (404,),
    ("GET", "/v1/dashboard/files/{file_id}/content"): (404,),
}
SECURITY_SCHEMES = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (`ls-<prefix>_<secret>`): `Authorization: Bearer <key>`.",
    },
    "adminKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "The server's admin key (--admin-key): `Authorization: Bearer <admin key>`.",
    },
    "presession": {
        "type": "apiKey",
        "in": "cookie",
        "name": PRESESSION_COOKIE,
        "description": "Before log-in, the CSRF token's cookie from GET /auth/session (double submit).",
    },
}
HEALTH_SCHEMA = {
    "type": "object",
    "required": ["status", "model", "engine"],
    "properties": {
        "status": {"type": "string", "description": "ok, or engine stopped (with 503)"},
        "model": {"type": ["string", "null"]},
        "engine": {"type": ["object", "null"], "additionalProperties": {"type": "integer"}},
    },
}
READY_SCHEMA = {
    "type": "object",
    "required": ["status", "checks"],
    "properties": {
        "status": {"type": "string", "enum": ["ready", "not ready"]},
        "checks": {
            "type": "object",
            "description": "accepting, engine, database and upstream:<model>, each true when it is fine",
            "additionalProperties": {"type": "boolean"},
        },
    },
}


def install(app: FastAPI, accounts: bool) -> None:
    """Serve the corrected document; `accounts`: whether the API key routes check keys (serve, not engine)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, accounts)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build(app: FastAPI, accounts: bool) -> dict[str, Any]:
    spec = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        description=app.description,
        routes=app.routes,
    )
    components = spec.setdefault("components", {})
    _add_models(components.setdefault("schemas", {}), [ErrorResponse, ChatCompletionChunk, CompletionChunk])
    for name in ("HTTPValidationError", "ValidationError"):  # the 422 that never happens
        components["schemas"].pop(name, None)
    for route in _api_routes(app):
        for method in sorted(route.methods - {"HEAD"}):
            _fix_operation(spec["paths"][route.path_format][method.lower()], route, method, accounts)
    _stream_content(spec["paths"]["/v1/chat/completions"]["post"], "ChatCompletionChunk")
    _stream_content(spec["paths"]["/v1/completions"]["post"], "CompletionChunk")
    _health(spec["paths"].get("/health", {}).get("get"))
    _ready(spec["paths"].get("/ready", {}).get("get"))
    components.setdefault("securitySchemes", {}).update(SECURITY_SCHEMES if accounts else {})
    return spec


def _api_routes(app: FastAPI) -> Iterator[RouteContext]:
    """Every API route as served: an included router's routes with its prefix and dependencies applied."""
    for context in iter_route_contexts(app.routes):
        if isinstance(context.original_route, APIRoute) and context.include_in_schema:
            yield context


def _calls(dependant: Dependant) -> set[Callable[..., Any]]:
    """Every dependency a route runs, nested ones included."""
    found: set[Callable[..., Any]] = set()
    for dep in dependant.dependencies:
        if dep.call is not None:
            found.add(dep.call)
        found |= _calls(dep)
    return found


Requirements = list[dict[str, list[str]]]


def _security(calls: set[Callable[..., Any]], method: str, accounts: bool) -> tuple[Requirements, set[int]]:
    """Who may call (alternatives, each the credentials needed together; none: anyone), and the statuses
    that turn away those who may not."""
    changes = method not in ("GET", "HEAD", "OPTIONS")  # only changes are CSRF-checked
    session = {"session": [], "csrf": []} if changes else {"session": []}
    if require_caller in calls:
        return ([{"apiKey": []}], {401, 403}) if accounts else ([], set())  # 403: key disabled, account suspended
    if require_admin in calls:
        return [{"adminKey": []}, session], {401, 403}  # 403: a session that is not an admin's
    if require_session in calls:
        return [session], {401, 403} if changes else {401}
    if csrf_header in calls:  # log-in and sign-up: the pre-login token, as cookie and header
        return [{"csrf": [], "presession": []}], {403}
    return [], set()


def _takes_input(operation: dict[str, Any]) -> bool:
    """Whether a request can be malformed: a body, a query, or a path parameter with values to keep to."""
    parameters = operation.get("parameters", [])
    return (
        "requestBody" in operation
        or any(p["in"] != "path" for p in parameters)
        or any("enum" in p.get("schema", {}) for p in parameters)
    )


# The POSTs that create work take an Idempotency-Key (api/openai/idempotency.py), where accounts are kept.
IDEMPOTENT = {
    ("POST", p) for p in ("/v1/chat/completions", "/v1/{model}", "/v1/completions", "/v1/files", "/v1/batches")
}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Sent again with the same body, the request is answered with its first response "
    "(`Idempotent-Replayed: true`) and not charged again; kept per account for --idempotency-hours.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x20-\\x7e]+$"},
}


def _fix_operation(operation: dict[str, Any], route: RouteContext, method: str, accounts: bool) -> None:
    if accounts and (method, route.path_format) in IDEMPOTENT:
        operation.setdefault("parameters", []).append(IDEMPOTENCY_KEY)
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)
    security, statuses = _security(_calls(route.dependant), method, accounts)
    operation.pop("security", None)
    if security:
        operation["security"] = security
    statuses |= {500, *ROUTE_ERRORS.get((method, route.path_format), ())}
    if route.path_format not in PROBES:  # a drain or a database outage can refuse any other route
        statuses.add(503)
    if _takes_input(operation):
        statuses.add(400)
    for status in sorted(statuses):
        responses[str(status)] = {
            "description": STATUS_TEXT[status],
            "content": {"application/json": {"schema": ERROR_REF}},
        }


def _stream_content(operation: dict[str, Any], chunk: str) -> None:
    """With `stream: true` the 200 is a stream of server-sent events: each one's `data` a chunk object (or, if
    generation fails midway, an error object), the last one's `[DONE]`. As Open API 3.2 writes an event (and
    3.1 tools read `schema` under text/event-stream as one event)."""
    ok = operation["responses"]["200"]
    ok["description"] = "The completion; with stream: true, server-sent events, each `data` one chunk."
    data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"oneOf": [{"$ref": REF.format(model=chunk)}, ERROR_REF]},
    }
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, {"not": {"const": "[DONE]"}, **data}]}},
    }
    ok["content"]["text/event-stream"] = {"schema": event}


def _health(operation: dict[str, Any] | None) -> None:
    if operation is None:
        return
    content = {"application/json": {"schema": HEALTH_SCHEMA}}
    operation["responses"]["200"] = {"description": "Serving.", "content": content}
    operation["responses"]["503"] = {"description": "The engine has stopped.", "content": content}


def _ready(operation: dict[str, Any] | None) -> None:
    if operation is None:
        return
    content = {"application/json": {"schema": READY_SCHEMA}}
    operation["responses"]["200"] = {"description": "Ready for traffic.", "content": content}
    operation["responses"]["503"] = {"description": "Not ready: a check failed, or draining.", "content": content}


def _add_models(schemas: dict[str, Any], models: list[type[BaseModel]]) -> None:
    """Models no route names (errors, stream chunks) into components, next to those FastAPI put there."""
    _, top = models_json_schema([(m, "serialization") for m in models], ref_template=REF)
    for name, schema in top.get("$defs", {}).items():
        # FastAPI writes the same model a little differently (no output defaults); keep its version, but two
        # models of one name would be a real clash.
        known = schemas.setdefault(name, schema)
        if set(known.get("properties", {})) != set(schema.get("properties", {})):
            raise RuntimeError(f"two different schemas named {name} in the OpenAPI document")
