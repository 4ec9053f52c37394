"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """Raised anywhere in a request; the app turns it into the HTTP status and error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code))
        self.headers = headers or {}


def invalid(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def shutting_down() -> APIError:
    """A request still running when the server's drain ran out (a 503, or the error event ending its stream)."""
    return APIError(
        503,
        "The server stopped before this request ended; retry on another replica",
        type="server_unavailable",
        code="shutting_down",
    )
