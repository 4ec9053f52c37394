"""The account dashboard: its JSON API (/v1/dashboard/..., a logged-in session's own account) and its pages.

The pages are static shells (Jinja2 templates for the layout only) whose scripts call the JSON APIs: /auth/...,
/v1/dashboard/..., /admin/... for admins, and /v1/chat/completions itself for the playground. Every change goes
through the store's functions, as the CLI's and the admin API's do.

The playground cannot use the user's keys (the store keeps only their hashes), so each session mints its own key:
named `playground`, expiring with the session, revoked at log-out or when the page mints the next one, kept only
in the page's memory. Its requests are ordinary API requests: limited, held, settled and billed to the account.
"""

from __future__ import annotations

import datetime as dt
import re
from importlib import resources
from typing import Annotated, Any, Literal

import jinja2
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import Field

from llamaserve.api.platform import auth
from llamaserve.api.platform.account import parse_time, usage_item, usage_totals
from llamaserve.api.platform.admin import key_view, unix
from llamaserve.api.platform.attempts import LOGIN_FAILURES, LOGIN_WINDOW, SIGNUP_WINDOW, make_window_limiter
from llamaserve.api.platform.auth import DashboardSettings, SessionDep, require_session
from llamaserve.api.platform.keys import platform_of
from llamaserve.billing.limits import PLANS
from llamaserve.billing.models import ApiKey
from llamaserve.billing.pricing import format_credits
from llamaserve.billing.store import KeyLimitError, StoreError
from llamaserve.config import PlatformConfig
from llamaserve.protocol.account import (
    DashboardAccount,
    DashboardKey,
    DashboardKeyList,
    DashboardUsageItem,
    DashboardUsageList,
    ModelId,
    ModelIdList,
    NewDashboardKey,
    PlanList,
    PlanView,
    SummaryKey,
    UsageBucketView,
    UsageSummary,
)
from llamaserve.protocol.batches import BatchList, batch_page
from llamaserve.protocol.common import StrictModel
from llamaserve.protocol.errors import APIError, invalid
from llamaserve.protocol.validation import StoredText

BUCKETS = {"hour": 3600, "day": 86400}
MAX_BUCKETS = 2000
router = APIRouter(prefix="/v1/dashboard", tags=["dashboard"], dependencies=[Depends(require_session)])


class KeyCreate(StrictModel):
    name: Annotated[StoredText, Field(max_length=64)] = ""
    allowed_models: Annotated[list[StoredText], Field(min_length=1)] | None = None  # None: every model


class KeyChange(StrictModel):
    name: Annotated[StoredText, Field(max_length=64)] | None = None
    enabled: bool | None = None


def _key(k: ApiKey, account: str) -> DashboardKey:
    return DashboardKey(**key_view(k, account).model_dump(), expires=unix(k.expires_at) if k.expires_at else None)


def _known_model(request: Request, name: str) -> bool:
    return request.app.state.models.served(name)


def _forget_keys(request: Request) -> None:
    """Keys are checked against the store again: a key disabled here is refused at once, not within 5 s."""
    platform_of(request).auth_cache.clear()


# --- account and keys -----------------------------------------------------------------------------------------
@router.get("/account")
async def account(request: Request, logged_in: SessionDep) -> DashboardAccount:
    """The account's balance, plan and limits."""
    store = platform_of(request).store
    open_holds = await store.open_holds(logged_in.account.id)  # first, as GET /v1/account/balance does
    a = await store.account_by_id(logged_in.account.id)
    plan = PLANS.get(a.plan, PLANS["free"])
    return DashboardAccount(
        account=a.name,
        email=a.email,
        plan=a.plan,
        requests_per_minute=plan.requests_per_minute,
        tokens_per_minute=plan.tokens_per_minute,
        balance=format_credits(a.balance),
        balance_micro=a.balance,
        open_holds=open_holds,
        is_admin=a.is_admin,
    )


@router.get("/plans")
async def plans() -> PlanList:
    """The rate-limit plans (None: no limit)."""
    data = [
        PlanView(name=p.name, requests_per_minute=p.requests_per_minute, tokens_per_minute=p.tokens_per_minute)
        for p in PLANS.values()
    ]
    return PlanList(data=data)


@router.get("/models")
async def models(request: Request) -> ModelIdList:
    """The models served here (for a key's allowed models)."""
    return ModelIdList(data=[ModelId(id=card.id) for card in request.app.state.models.cards(None)])


@router.get("/keys")
async def list_keys(request: Request, logged_in: SessionDep) -> DashboardKeyList:
    """The account's keys (prefixes only; secrets are never stored), without the playground's."""
    name = logged_in.account.name
    keys = await platform_of(request).store.list_keys(name)
    return DashboardKeyList(data=[_key(k, name) for k, _ in keys if k.expires_at is None])


@router.post("/keys", status_code=201)
async def create_key(body: KeyCreate, request: Request, logged_in: SessionDep) -> NewDashboardKey:
    """A new key; the response is the only place the full key (`key`) ever appears."""
    for i, model in enumerate(body.allowed_models or []):
        if not _known_model(request, model):
            raise invalid(f"no model named {model!r} is served here", f"allowed_models[{i}]", "model_not_found")
    name = logged_in.account.name
    store, most = platform_of(request).store, auth.settings_of(request).max_keys
    try:
        full, key = await store.create_key(name, body.name.strip(), body.allowed_models, max_active=most)
    except KeyLimitError as e:
        raise APIError(403, str(e), type="permission_error", code="too_many_keys") from e
    return NewDashboardKey(**_key(await platform_of(request).store.key(key.prefix), name).model_dump(), key=full)


async def _change_key(request: Request, logged_in: SessionDep, prefix: str, **change: Any) -> DashboardKey:
    """Change one of the account's own keys; another account's key is 404, exactly like a key that does not
    exist."""
    try:
        key = await platform_of(request).store.set_key(prefix, account_id=logged_in.account.id, **change)
    except StoreError as e:
        raise APIError(404, f"no key with prefix {prefix!r}", type="not_found_error", code="not_found") from e
    _forget_keys(request)
    return _key(key, logged_in.account.name)


@router.patch("/keys/{prefix}")
async def change_key(prefix: StoredText, body: KeyChange, request: Request, logged_in: SessionDep) -> DashboardKey:
    """Rename a key, or enable or disable it (a disabled key gets 403 until enabled again)."""
    if body.name is None and body.enabled is None:
        raise invalid("give name or enabled", None)
    name = body.name.strip() if body.name is not None else None
    return await _change_key(request, logged_in, prefix, name=name, enabled=body.enabled)


@router.post("/keys/{prefix}/revoke")
async def revoke_key(prefix: StoredText, request: Request, logged_in: SessionDep) -> DashboardKey:
    """Revoke a key for good (401 from now on)."""
    return await _change_key(request, logged_in, prefix, revoked=True)


@router.post("/playground/key", status_code=201)
async def playground_key(request: Request, logged_in: SessionDep) -> NewDashboardKey:
    """A key for the playground page, expiring with the session; the session's previous one is revoked."""
    full, key = await platform_of(request).store.playground_key(logged_in.token)
    _forget_keys(request)
    return NewDashboardKey(**_key(key, logged_in.account.name).model_dump(), key=full)


# --- usage ----------------------------------------------------------------------------------------------------
@router.get("/usage")
async def usage(
    request: Request,
    logged_in: SessionDep,
    since: Annotated[str | None, Query(description="ISO 8601 or Unix seconds")] = None,
    until: Annotated[str | None, Query(description="ISO 8601 or Unix seconds")] = None,
    model: StoredText | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DashboardUsageList:
    """Recent requests, newest first, as GET /v1/account/usage gives them, with the key that made each."""
    store = platform_of(request).store
    account_id = logged_in.account.id
    records = await store.usage(account_id, parse_time(since, "since"), parse_time(until, "until"), model, limit)
    keys = {k.id: k for k, _ in await store.list_keys(logged_in.account.name)}
    items = []
    for r in records:
        key = keys.get(r.key_id)
        item = usage_item(r).model_dump()
        items.append(DashboardUsageItem(**item, key=key.prefix if key else None, key_name=key.name if key else None))
    return DashboardUsageList(data=items, totals=usage_totals(records))


@router.get("/batches")
async def batches(
    request: Request, logged_in: SessionDep, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> BatchList:
    """The account's batches, newest first, as GET /v1/batches gives them (the usage page's table)."""
    return batch_page(await request.app.state.batches.batches.batches(logged_in.account.id, None, limit + 1), limit)


@router.get("/files/{file_id}/content", response_class=Response)
async def file_content(file_id: str, request: Request, logged_in: SessionDep) -> Response:
    """One of the account's files, to download (a batch's output or error file)."""
    try:
        file = await request.app.state.batches.batches.file(logged_in.account.id, file_id, with_content=True)
    except StoreError as e:
        raise APIError(404, str(e), param="file_id", code="not_found") from e
    name = re.sub(r"[^A-Za-z0-9._-]", "_", file.filename) or "file.jsonl"  # nothing of it can break the header
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    return Response(file.content, media_type="application/jsonl", headers=headers)


@router.get("/usage/summary")
async def usage_summary(
    request: Request,
    logged_in: SessionDep,
    since: Annotated[str | None, Query(description="ISO 8601 or Unix seconds; default: 7 days ago")] = None,
    until: Annotated[str | None, Query(description="ISO 8601 or Unix seconds; default: now")] = None,
    bucket: Literal["hour", "day"] = "day",
) -> UsageSummary:
    """Requests, tokens and spend per time bucket (UTC), model and key: what the usage charts draw."""
    end = parse_time(until, "until") or dt.datetime.now(dt.UTC)
    try:
        start = parse_time(since, "since") or end - dt.timedelta(days=7)
    except OverflowError as e:  # until in the first week of year 1
        raise invalid("until is too early to count 7 days back from; give since", "until") from e
    seconds = BUCKETS[bucket]
    if (end - start).total_seconds() / seconds > MAX_BUCKETS:
        raise invalid(f"more than {MAX_BUCKETS} {bucket}s between since and until; use a larger bucket", "since")
    store = platform_of(request).store
    rows = await store.usage_summary(logged_in.account.id, start, end, seconds)
    keys = await store.list_keys(logged_in.account.name)
    data = [
        UsageBucketView(
            start=r.start,
            model=r.model,
            key=r.key_prefix,
            requests=r.requests,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
            cost=format_credits(r.cost),
            cost_micro=r.cost,
        )
        for r in rows
    ]
    return UsageSummary(
        bucket_seconds=seconds,
        since=int(start.timestamp()),
        until=int(end.timestamp()),
        data=data,
        keys=[SummaryKey(prefix=k.prefix, name=k.name, playground=k.expires_at is not None) for k, _ in keys],
    )


# --- pages ----------------------------------------------------------------------------------------------------
PAGES = {"/": "usage", "/keys": "keys", "/playground": "playground", "/admin": "admin"}
# Scripts and styles only from this server, no inline code, no framing: an injected string cannot run.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
pages = APIRouter(include_in_schema=False)
_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("llamaserve.web", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
)


def _page(request: Request, template: str, **context: Any) -> HTMLResponse:
    html = _templates.get_template(f"{template}.html").render(
        page=template, signup_enabled=auth.settings_of(request).signup, **context
    )
    return HTMLResponse(html, headers=SECURITY_HEADERS)


def _page_route(path: str, template: str) -> None:
    async def show(request: Request) -> HTMLResponse:
        return _page(request, template)

    pages.add_api_route(path, show, methods=["GET"], response_class=HTMLResponse, name=f"page_{template}")


for _path, _template in PAGES.items():
    _page_route(_path, _template)


@pages.get("/login", response_class=HTMLResponse)
async def login_page(request: Request) -> HTMLResponse:
    return _page(request, "login", mode="login")


@pages.get("/signup", response_class=HTMLResponse)
async def signup_page(request: Request) -> Response:
    if not auth.settings_of(request).signup:
        return RedirectResponse("/login", status_code=303)
    return _page(request, "login", mode="signup")


def install(app: FastAPI, config: PlatformConfig) -> None:
    """The dashboard on a platform app: log-in API, dashboard API, pages and their static files."""
    redis = config.redis_url
    signups = config.signups_per_hour
    app.state.dashboard = DashboardSettings(
        config.signup,
        config.starter_credits,
        logins=make_window_limiter(redis, "login", LOGIN_FAILURES, LOGIN_WINDOW),
        signups=make_window_limiter(redis, "signup", signups, SIGNUP_WINDOW) if signups else None,
        max_keys=config.max_keys_per_account or None,
    )
    app.include_router(auth.router)
    app.include_router(router)
    app.include_router(pages)
    static = resources.files("llamaserve.web") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
