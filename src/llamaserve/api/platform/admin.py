"""The admin HTTP API (/admin/...): accounts, keys and credits, guarded by the admin key (--admin-key or
LLAMASERVE_ADMIN_KEY), or by the dashboard session of an admin account (with its CSRF token; the dashboard's
admin view calls these same endpoints). The CLI does the same through the store directly."""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from llamaserve.api.platform.auth import check_csrf, session_of
from llamaserve.api.platform.keys import platform_of
from llamaserve.billing.limits import PLANS
from llamaserve.billing.models import Account, ApiKey
from llamaserve.billing.passwords import check_email, check_password, hash_password, normalize_email
from llamaserve.billing.pricing import format_credits, parse_credits
from llamaserve.billing.store import BalanceError, StoreError
from llamaserve.protocol.account import (
    AccountList,
    AccountView,
    CacheReset,
    CreditsGranted,
    KeyList,
    KeyState,
    KeyView,
    NewKeyView,
)
from llamaserve.protocol.common import StrictModel
from llamaserve.protocol.errors import APIError, invalid
from llamaserve.protocol.validation import StoredText, Text


async def _admin_session(request: Request) -> bool:
    """Whether an admin's dashboard session authorises the request (CSRF-checked); 403 for a non-admin's."""
    logged_in = await session_of(request)
    if logged_in is None:
        return False
    if not logged_in.account.is_admin:
        raise APIError(403, "this account is not an admin", type="permission_error", code="not_admin")
    check_csrf(request, logged_in.csrf)
    return True


async def require_admin(request: Request) -> None:
    if "authorization" not in request.headers and await _admin_session(request):
        return
    expected = platform_of(request).admin_key
    if not expected:  # an empty key guards nothing: the API is off
        raise APIError(
            403,
            "the admin API is off: start the server with --admin-key",
            type="permission_error",
            code="admin_disabled",
        )
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(
            401,
            "admin endpoints need 'Authorization: Bearer <admin key>'",
            type="authentication_error",
            code="invalid_admin_key",
        )


async def forget_authentications(request: Request) -> AsyncIterator[None]:
    """After any admin change, keys are checked against the store again (a disabled key is refused at once)."""
    yield
    if request.method != "GET":
        platform_of(request).auth_cache.clear()


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin), Depends(forget_authentications)])
PlanName = Literal[tuple(PLANS)]  # type: ignore[valid-type]


class NewAccount(StrictModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")]
    plan: PlanName = "free"  # type: ignore[valid-type]
    credits: Text = "0"
    email: StoredText | None = None  # with password: a dashboard login
    password: Annotated[Text, Field(max_length=1024)] | None = None
    is_admin: bool = False


class AccountChange(StrictModel):
    plan: PlanName | None = None  # type: ignore[valid-type]
    status: Literal["active", "suspended"] | None = None


class CreditGrant(StrictModel):
    amount: Text  # credits, e.g. "12.5"; negative takes credits away
    note: StoredText = "admin grant"


class NewKey(StrictModel):
    name: StoredText = ""
    allowed_models: Annotated[list[StoredText], Field(min_length=1)] | None = None  # None: every model


def unix(t: dt.datetime) -> int:
    """Unix seconds of a stored time (SQLite gives it back naive, in UTC: not the server's local time)."""
    return int((t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp())


def account_view(a: Account) -> AccountView:
    return AccountView(
        name=a.name,
        plan=a.plan,
        status=a.status,
        balance=format_credits(a.balance),
        balance_micro=a.balance,
        created=unix(a.created_at),
        email=a.email,
        is_admin=a.is_admin,
    )


def _login(body: NewAccount) -> tuple[str | None, str | None]:
    """(email, password hash) of a new account: both or neither."""
    if (body.email is None) != (body.password is None) or (body.is_admin and body.email is None):
        raise invalid("a dashboard login needs both email and password (and an admin needs one)", "email")
    if body.email is None or body.password is None:
        return None, None
    email = normalize_email(body.email)
    for problem, param in ((check_email(email), "email"), (check_password(body.password), "password")):
        if problem:
            raise invalid(problem, param)
    return email, hash_password(body.password)


def key_view(k: ApiKey, account: str) -> KeyView:
    return KeyView(
        prefix=k.prefix,
        account=account,
        name=k.name,
        enabled=k.enabled,
        revoked=k.revoked,
        allowed_models=k.allowed_models,
        created=unix(k.created_at),
        last_used=unix(k.last_used_at) if k.last_used_at else None,
    )


MAX_CREDITS = 10**9  # credits in one grant: thousands of grants before a balance nears the 64-bit limit


def _credits(text: str, param: str) -> int:
    try:
        micro = parse_credits(text)
    except ValueError as e:
        raise invalid(str(e), param) from e
    except ArithmeticError as e:  # "Infinity", "NaN" and "1e999999" parse as Decimals, and then do not convert
        raise invalid(f"not an amount of credits: {text!r}", param) from e
    if abs(micro) > MAX_CREDITS * 1_000_000:
        raise invalid(f"at most {MAX_CREDITS} credits at once", param)
    return micro


def _not_found(e: StoreError) -> APIError:
    return APIError(404, str(e), type="not_found_error", code="not_found")


@router.get("/accounts")
async def list_accounts(request: Request) -> AccountList:
    accounts = await platform_of(request).store.list_accounts()
    return AccountList(data=[account_view(a) for a in accounts])


@router.post("/accounts", status_code=201)
async def create_account(body: NewAccount, request: Request) -> AccountView:
    email, password_hash = await asyncio.to_thread(_login, body)
    try:
        account = await platform_of(request).store.create_account(
            body.name,
            body.plan,
            _credits(body.credits, "credits"),
            email=email,
            password_hash=password_hash,
            is_admin=body.is_admin,
        )
    except StoreError as e:
        raise APIError(409, str(e), code="account_exists") from e
    return account_view(await platform_of(request).store.account(account.name))


@router.patch("/accounts/{name}")
async def change_account(name: StoredText, body: AccountChange, request: Request) -> AccountView:
    if body.plan is None and body.status is None:  # a PATCH that changes nothing is a mistake worth naming
        raise invalid("give plan or status", None)
    try:
        return account_view(await platform_of(request).store.update_account(name, plan=body.plan, status=body.status))
    except StoreError as e:
        raise _not_found(e) from e


@router.post("/accounts/{name}/credits")
async def grant_credits(name: StoredText, body: CreditGrant, request: Request) -> CreditsGranted:
    try:
        balance = await platform_of(request).store.grant(name, _credits(body.amount, "amount"), body.note)
    except StoreError as e:
        raise _not_found(e) from e
    except BalanceError as e:
        raise invalid(str(e), "amount") from e
    return CreditsGranted(account=name, balance=format_credits(balance), balance_micro=balance)


@router.get("/accounts/{name}/keys")
async def list_keys(name: StoredText, request: Request) -> KeyList:
    keys = await platform_of(request).store.list_keys(name)
    return KeyList(data=[key_view(k, a) for k, a in keys])


@router.post("/accounts/{name}/keys", status_code=201)
async def create_key(name: StoredText, body: NewKey, request: Request) -> NewKeyView:
    try:
        full, key = await platform_of(request).store.create_key(name, body.name, body.allowed_models)
    except StoreError as e:
        raise _not_found(e) from e
    return NewKeyView(**key_view(await platform_of(request).store.key(key.prefix), name).model_dump(), key=full)


@router.post("/keys/{prefix}/{action}")
async def change_key(prefix: StoredText, action: Literal["enable", "disable", "revoke"], request: Request) -> KeyState:
    store = platform_of(request).store
    try:
        key = await (
            store.set_key(prefix, revoked=True)
            if action == "revoke"
            else store.set_key(prefix, enabled=action == "enable")
        )
    except StoreError as e:
        raise _not_found(e) from e
    return KeyState(prefix=key.prefix, enabled=key.enabled, revoked=key.revoked)


@router.post("/engine/reset-prefix-cache")
async def reset_prefix_cache(request: Request) -> CacheReset:
    """Empty the local model's prefix cache, leaving its KV cache as a fresh start does: for benchmarks of cold
    starts, and for outputs that must not depend on what ran before (docs/determinism.md). 409 while any request
    runs or waits."""
    local = request.app.state.models.local
    if local is None:
        raise APIError(404, "this server runs no local model", code="no_local_model")
    if not await local.model.engine.reset_cache():
        raise APIError(409, "requests are running or waiting; retry when the engine is idle", code="engine_busy")
    return CacheReset(model=local.id)
