"""How the inference endpoints are served: plain Starlette routes, ahead of FastAPI's.

FastAPI declares POST /v1/chat/completions and /v1/completions with the other routes (the OpenAPI document is
built from those declarations). These routes answer them, taking the same steps in the same order as FastAPI's
request handler, without its per-request machinery (dependency solving, exit stacks, validation wrappers),
which cost more CPU than the rest of a proxied request's own work (bench/gateway_bench.py):

1. read the body and parse it as JSON as FastAPI does (only for a JSON content type; same errors);
2. authenticate the key: 401/403 before any complaint about the body's fields;
3. validate the body with the endpoint's pydantic model: a RequestValidationError, answered by the same
   handler as every other route's (400 naming the parameter).

Exceptions go to the app's handlers as from any route.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Scope

from llamaserve.api.platform import require_caller
from llamaserve.billing.store import Caller

M = TypeVar("M", bound=BaseModel)
Endpoint = Callable[[M, Request, Caller], Awaitable[Any]]
_NO_BODY = object()  # an empty body: FastAPI reports the body missing, after the key check


def inference_route(path: str, model: type[M], endpoint: Endpoint[M]) -> Route:
    async def handle(request: Request) -> Response:
        body = await json_body(request)
        caller = await require_caller(request)
        return await endpoint(validated(model, body), request, caller)

    return InferenceRoute(path, handle, methods=["POST"], name=endpoint.__name__)


class InferenceRoute(Route):
    """A route that, like FastAPI's, names itself in the scope (`scope["route"]`: the metrics' route label)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match != Match.NONE:
            child_scope["route"] = self
        return match, child_scope


def install(app: FastAPI, routes: list[Route]) -> None:
    """Put `routes` first: a request they match never reaches FastAPI's declarations of the same paths."""
    app.router.routes[0:0] = routes


async def json_body(request: Request) -> Any:
    """The body as FastAPI parses it for a JSON body parameter: JSON for an application/json (or +json) content
    type, else the bytes themselves (which then fail validation as not an object)."""
    try:
        raw = await request.body()
        if not raw:
            return _NO_BODY
        content_type = request.headers.get("content-type")
        if not content_type or not _is_json(content_type):
            return raw
        return json.loads(raw)
    except json.JSONDecodeError as e:
        error = {"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error", "input": {}}
        raise RequestValidationError([{**error, "ctx": {"error": e.msg}}], body=e.doc) from e
    except Exception as e:  # undecodable bytes, a client gone mid-body
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from e


def _is_json(content_type: str) -> bool:
    """application/json or application/*+json, parameters aside (as the email module reads a content type)."""
    maintype, _, subtype = content_type.partition(";")[0].strip().lower().partition("/")
    json_subtype = subtype == "json" or subtype.endswith("+json")
    return maintype == "application" and json_subtype and "/" not in subtype


def validated(model: type[M], body: Any) -> M:
    """`body` as `model`, validated as FastAPI validates a body (from attributes: a body that is no JSON object
    fails as one error about the whole body)."""
    if body is _NO_BODY:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        return model.model_validate(body, from_attributes=True)
    except ValidationError as e:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in e.errors(include_url=False)]
        raise RequestValidationError(errors, body=body) from None
