"""Every failure leaves as an OpenAI-style error body; bad input is a 4xx naming the parameter, never a 500."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from llamaserve.protocol.errors import APIError, ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)

# Pydantic puts the union member it tried into an error's location; those are not parameter names.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "text", "image_url"}


def error_response(status: int, detail: ErrorDetail, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status, headers=headers)


def param_name(loc: Sequence[Any]) -> str | None:
    """('body', 'messages', 0, 'role') → 'messages[0].role'."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif "[" in str(part) or "-" in str(part) or str(part) in _TYPE_TAGS:
            continue
        else:
            name += f".{part}" if name else str(part)
    return name or None


def _validation_message(err: dict[str, Any], param: str | None) -> str:
    if err.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}"
    if err.get("type") in ("json_invalid", "model_attributes_type") and not param:
        return "The request body is not valid JSON (or not a JSON object)."
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"Invalid value for '{param}': {msg}" if param else msg


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    # A JSON syntax error's location is a character offset, not a parameter.
    param = None if first.get("type") == "json_invalid" else param_name(first.get("loc", ()))
    code = "unrecognized_argument" if first.get("type") == "extra_forbidden" else "invalid_value"
    detail = ErrorDetail(
        message=_validation_message(first, param), type="invalid_request_error", param=param, code=code
    )
    return error_response(400, detail)


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body.model_dump(), status_code=exc.status, headers=exc.headers)


async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(exc.status_code, ErrorDetail(message=message, type=kind), getattr(exc, "headers", None))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug: log it with its request id; the client gets that id and nothing of the traceback. (This handler
    runs outside the request-id middleware, so it sets the header itself.)"""
    request_id = getattr(request.state, "request_id", "unknown")
    log.exception("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id)
    detail = ErrorDetail(
        message=f"Internal server error (request id {request_id}); the server log has the details",
        type="server_error",
        code="internal_error",
    )
    return error_response(500, detail, {"x-request-id": request_id})


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(APIError, _on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unexpected)
