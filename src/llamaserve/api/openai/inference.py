"""How the inference POSTs are handled: FastAPI routes them, and their route class answers them with the same
steps, in the same order, as FastAPI's request handler, without its dependency solving and validation wrappers
(which cost about as much CPU as a proxied request's own work, bench/gateway_bench.py), and with the heavy steps
off the event loop:

1. read the body and parse it as JSON as FastAPI does (only for a JSON content type; same errors);
2. authenticate the key: 401/403 before any complaint about the body's fields;
3. validate the body with the endpoint's pydantic model: a RequestValidationError, answered by the same
   handler as every other route's (400 naming the parameter).

Steps 1 and 3 run in a worker thread for a large body, or one holding JSON schemas (INLINE_BODY_BYTES).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, get_type_hints

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from llamaserve.api.platform.keys import require_caller

M = TypeVar("M", bound=BaseModel)
_NO_BODY = object()  # an empty body: FastAPI reports the body missing, after the key check


# A body is parsed and validated on the event loop when that takes well under a millisecond: small, and without
# JSON schemas. A larger body, or one with schemas (each is checked against the meta-schema, milliseconds apiece:
# 128 small tools took 46 ms), is parsed and validated in a worker thread.
INLINE_BODY_BYTES = 64 * 1024
SCHEMA_FIELDS = ("tools", "functions", "response_format")


class InferenceRoute(APIRoute):
    """A route whose endpoint takes (body, request, caller): `body` validated from the JSON body (its type is the
    endpoint's annotation), `caller` the key's owner."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        model: type[BaseModel] = get_type_hints(self.endpoint)["body"]
        endpoint = self.endpoint

        async def handle(request: Request) -> Response:
            body = await json_body(request)
            caller = await require_caller(request)
            heavy = len(await request.body()) > INLINE_BODY_BYTES or (
                isinstance(body, dict) and any(field in body for field in SCHEMA_FIELDS)
            )
            checked = await asyncio.to_thread(validated, model, body) if heavy else validated(model, body)
            return await endpoint(checked, request, caller)

        return handle


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
