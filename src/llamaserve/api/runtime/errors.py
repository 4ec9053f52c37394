"""Every failure leaves as an OpenAI-style error body; bad input is a 4xx naming the parameter, never a 500."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException

from llamaserve.billing.store import database_unavailable
from llamaserve.protocol.errors import APIError, ErrorDetail, ErrorResponse, validation_detail

log = logging.getLogger(__name__)

# Codes of the errors Starlette and FastAPI raise themselves (unknown route, wrong method, unparsable body).
_HTTP_CODES = {400: "invalid_body", 405: "method_not_allowed", 413: "request_too_large"}


class ErrorJSONResponse(JSONResponse):
    """An error body as ASCII JSON: a message may quote what the client sent, and text that UTF-8 cannot carry
    (a lone surrogate from a JSON escape) must not turn an error into a failure to send the error."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, detail: ErrorDetail, headers: dict[str, str] | None = None) -> JSONResponse:
    return ErrorJSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status, headers=headers)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = validation_detail(list(exc.errors()))
    request.state.error_code = detail.code  # for the access log and the error counter
    return error_response(400, detail)


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    request.state.error_code = exc.body.error.code
    return ErrorJSONResponse(exc.body.model_dump(), status_code=exc.status, headers=exc.headers)


UnknownPath = Callable[[Request], Awaitable[None]]


def _on_http_error(unknown_path: UnknownPath | None) -> Callable[[Request, HTTPException], Awaitable[JSONResponse]]:
    async def handle(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404 and unknown_path is not None:
            try:
                await unknown_path(request)  # may say more about a path that no route has
            except APIError as e:
                return await _on_api_error(request, e)
        return await _http_error(request, exc)

    return handle


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    detail = ErrorDetail(message=message, type=kind, code=_HTTP_CODES.get(exc.status_code))
    request.state.error_code = detail.code
    return error_response(exc.status_code, detail, getattr(exc, "headers", None))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug: log it with its request id; the client gets that id and nothing of the traceback. (This handler
    runs outside the request-id middleware, so it sets the header itself.)"""
    response = _internal_error(request)
    response.headers["x-request-id"] = getattr(request.state, "request_id", "unknown")
    return response


def _internal_error(request: Request) -> JSONResponse:
    request_id = getattr(request.state, "request_id", "unknown")
    log.exception("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id)
    detail = ErrorDetail(
        message=f"Internal server error (request id {request_id}); the server log has the details",
        type="server_error",
        code="internal_error",
    )
    return error_response(500, detail)


async def _on_database_error(request: Request, exc: Exception) -> JSONResponse:
    """The database out of reach is the service being unavailable for a moment (503, retry), not a bug: one log
    line, no traceback per request. Each store call is one transaction, so nothing was half-written. (This
    handler runs inside the request-id middleware, which adds the header.)"""
    if not database_unavailable(exc):
        return _internal_error(request)
    request_id = getattr(request.state, "request_id", "unknown")
    log.warning("database unavailable on %s %s (request %s): %s", request.method, request.url.path, request_id, exc)
    detail = ErrorDetail(
        message=f"The service is unavailable for a moment (request id {request_id}); retry shortly",
        type="server_unavailable",
        code="database_unavailable",
    )
    return error_response(503, detail, {"Retry-After": "2"})


def install(app: FastAPI, unknown_path: UnknownPath | None = None) -> None:
    """The handlers; `unknown_path` may raise an APIError that says more than "not found" about a path no route
    has (a chat body posted to a model name nothing serves)."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(APIError, _on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _on_http_error(unknown_path))  # type: ignore[arg-type]
    # Database outages: handled here rather than by the catch-all, which Starlette re-raises (a traceback each).
    for kind in (DBAPIError, PoolTimeout, ConnectionError, TimeoutError):
        app.add_exception_handler(kind, _on_database_error)
    app.add_exception_handler(Exception, _on_unexpected)
