"""Who is calling: the Bearer key of every API request, checked before its body (401/403 whatever the body)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from llamaserve.billing.store import AuthError, Caller
from llamaserve.protocol.errors import APIError
from llamaserve.serving.admission import Gate, Platform


def platform_of(request: Request) -> Platform:
    return request.app.state.gate.platform


async def require_caller(request: Request) -> Caller:
    """FastAPI dependency: the authenticated caller (everyone, on `llamaserve engine`)."""
    gate: Gate = request.app.state.gate
    if gate.platform is None:
        return await gate.authenticate("")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise APIError(
            401,
            "Missing API key: send 'Authorization: Bearer <key>'",
            type="authentication_error",
            code="missing_api_key",
        )
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(
            401,
            "Malformed Authorization header: expected 'Bearer <key>'",
            type="authentication_error",
            code="invalid_authorization_header",
        )
    try:
        caller = await gate.authenticate(token.strip())
    except AuthError as e:
        kind = "authentication_error" if e.status == 401 else "permission_error"
        raise APIError(e.status, str(e), type=kind, code=e.code) from e
    request.state.caller = caller
    return caller


CallerDep = Annotated[Caller, Depends(require_caller)]
