"""How the inference endpoints are served: by a pure ASGI middleware, the innermost, ahead of FastAPI's routing.

FastAPI declares POST /v1/chat/completions and /v1/completions with the other routes (the OpenAPI document and
405s for other methods come from those declarations). This middleware answers them, taking the same steps in the
same order as FastAPI's request handler, without the layers between it and the route (exception middleware,
exit stacks, routing, dependency solving, validation wrappers), which cost about as much CPU as a proxied
request's own work (bench/gateway_bench.py):

1. read the body and parse it as JSON as FastAPI does (only for a JSON content type; same errors);
2. authenticate the key: 401/403 before any complaint about the body's fields;
3. validate the body with the endpoint's pydantic model: a RequestValidationError, answered by the same
   handler as every other route's (400 naming the parameter).

Steps 1 and 3 run in a worker thread for a large body, or one holding JSON schemas (INLINE_BODY_BYTES).

An exception is answered by the app's handler for it, as Starlette's exception middleware would; one with no
handler of its own (a bug) goes on up to the server-error middleware, as from any route.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from llamaserve.api.platform import require_caller
from llamaserve.billing.store import Caller

M = TypeVar("M", bound=BaseModel)
Endpoint = Callable[[M, Request, Caller], Awaitable[Any]]
_NO_BODY = object()  # an empty body: FastAPI reports the body missing, after the key check


@dataclass(frozen=True)
class InferenceRoute:
    path: str  # also the metrics' route label (scope["route"].path, as FastAPI's routes have it)
    handle: Callable[[Request], Awaitable[Response]]


# A body is parsed and validated on the event loop when that takes well under a millisecond: small, and without
# JSON schemas. A larger body, or one with schemas (each is checked against the meta-schema, milliseconds apiece:
# 128 small tools took 46 ms), is parsed and validated in a worker thread.
INLINE_BODY_BYTES = 64 * 1024
SCHEMA_FIELDS = ("tools", "functions", "response_format")


def inference_route(path: str, model: type[M], endpoint: Endpoint[M]) -> InferenceRoute:
    async def handle(request: Request) -> Response:
        body = await json_body(request)
        caller = await require_caller(request)
        heavy = len(await request.body()) > INLINE_BODY_BYTES or (
            isinstance(body, dict) and any(field in body for field in SCHEMA_FIELDS)
        )
        checked = await asyncio.to_thread(validated, model, body) if heavy else validated(model, body)
        return await endpoint(checked, request, caller)

    return InferenceRoute(path, handle)


class InferenceMiddleware:
    def __init__(self, app: ASGIApp, routes: Sequence[InferenceRoute]) -> None:
        self.app = app
        self.routes = {route.path: route for route in routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route
        request = Request(scope, receive, send)
        try:
            response = await route.handle(request)
        except Exception as e:
            response = await _answer(request, e)
        await response(scope, receive, send)


async def _answer(request: Request, error: Exception) -> Response:
    """The app's handler's answer to `error` (looked up by class, as Starlette does); re-raised if only the
    catch-all handles it: that one answers from the server-error middleware, outside the access log's."""
    handlers = request.app.exception_handlers
    for kind in type(error).__mro__:
        if kind is Exception:
            break
        if kind in handlers:
            return await handlers[kind](request, error)
    raise error


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
        return json.loads(raw) if len(raw) <= INLINE_BODY_BYTES else await asyncio.to_thread(json.loads, raw)
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
