"""Every response carries an `x-request-id` (set by api/runtime/observe.py's middleware); handlers find it at
`request.state.request_id` (usage records, 500 bodies and the access log use it, so a user's report can be
matched with the logs). A gateway passes its id on to the engine behind it, which takes it (only an engine
without accounts trusts it: there ids are not usage keys), so one request has one id in every log. The gateway
sends it as a UUID (`req_<32 hex>` → the same hex as a UUID), the form other engines accept (llama-cpp-python's
server refuses any other x-request-id with a 400); an engine takes either form back as `req_<32 hex>`."""

from __future__ import annotations

import re
import uuid

from starlette.types import Scope

_REQUEST_ID = re.compile(rb"req_([0-9a-f]{32})|([0-9a-f]{8})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{12})")


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def forwarded_request_id(scope: Scope) -> str | None:
    """The request's own `x-request-id` header, if it is one of ours (or one of ours as a UUID)."""
    for name, value in scope["headers"]:
        if name == b"x-request-id" and (match := _REQUEST_ID.fullmatch(value)):
            return "req_" + b"".join(g for g in match.groups() if g).decode()
    return None
