"""Every response carries an `x-request-id` (set by api/observe.py's middleware); handlers find it at
`request.state.request_id` (usage records, 500 bodies and the access log use it, so a user's report can be
matched with the logs)."""

from __future__ import annotations

import uuid


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"
