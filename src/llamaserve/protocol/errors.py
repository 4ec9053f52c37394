"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

UNSUPPORTED = "unsupported_parameter"  # the error code of a known field whose value would change the output here


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


# Pydantic puts the union member it tried into an error's location; those are not parameter names.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "text", "image_url"}


_LOCATIONS = {"body", "query", "path", "header", "cookie"}  # where FastAPI found a parameter: not part of its name


def param_name(loc: Sequence[Any]) -> str | None:
    """('body', 'messages', 0, 'role') → 'messages[0].role'; ('query', 'limit') → 'limit'."""
    name = ""
    for part in loc[1:] if loc and loc[0] in _LOCATIONS else loc:
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
    if err.get("type") == "missing" and tuple(err.get("loc", ())) == ("body",):
        return "The request body is empty: send a JSON object."
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"Invalid value for '{param}': {msg}" if param else msg


def _within(param: str | None, outer: str | None) -> bool:
    if outer is None or param == outer:
        return True
    return param is not None and param.startswith((f"{outer}.", f"{outer}["))


def _most_telling(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The error to report. A value that fits no member of a union fails once per member: `content` with an
    image part is "not a valid string" and, as a list, has a bad URL inside. Of the first parameter's failures
    (itself or within it), one from a member whose type matched says what is wrong, and the deepest says where."""
    if not errors:
        return {"msg": "invalid request", "loc": ()}
    outer = param_name(errors[0].get("loc", ()))
    related = [e for e in errors if _within(param_name(e.get("loc", ())), outer)]
    telling = [e for e in related if not str(e.get("type", "")).endswith(("_type", "_parsing"))]
    return max(telling, key=lambda e: len(e.get("loc", ()))) if telling else errors[0]


def validation_detail(errors: list[dict[str, Any]]) -> ErrorDetail:
    """The 400 error of a body that failed validation (pydantic's errors), naming the parameter."""
    first = _most_telling(errors)
    # A JSON syntax error's location is a character offset, not a parameter.
    param = None if first.get("type") == "json_invalid" else param_name(first.get("loc", ()))
    kind = first.get("type")
    code = {"extra_forbidden": "unrecognized_argument", UNSUPPORTED: UNSUPPORTED}.get(str(kind), "invalid_value")
    return ErrorDetail(message=_validation_message(first, param), type="invalid_request_error", param=param, code=code)
