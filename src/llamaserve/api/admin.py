"""The admin HTTP API (/admin/...): accounts, keys and credits, guarded by the admin key (--admin-key or
LLAMASERVE_ADMIN_KEY). The CLI does the same through the store directly."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from llamaserve.api.platform import platform_of
from llamaserve.billing.limits import PLANS
from llamaserve.billing.models import Account, ApiKey
from llamaserve.billing.pricing import format_credits, parse_credits
from llamaserve.billing.store import StoreError
from llamaserve.protocol.common import StrictModel
from llamaserve.protocol.errors import APIError, invalid


async def require_admin(request: Request) -> None:
    expected = platform_of(request).admin_key
    if expected is None:
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
    credits: str = "0"


class AccountChange(StrictModel):
    plan: PlanName | None = None  # type: ignore[valid-type]
    status: Literal["active", "suspended"] | None = None


class CreditGrant(StrictModel):
    amount: str  # credits, e.g. "12.5"; negative takes credits away
    note: str = "admin grant"


class NewKey(StrictModel):
    name: str = ""
    allowed_models: Annotated[list[str], Field(min_length=1)] | None = None  # None: every model


def account_view(a: Account) -> dict[str, Any]:
    return {
        "name": a.name,
        "plan": a.plan,
        "status": a.status,
        "balance": format_credits(a.balance),
        "balance_micro": a.balance,
        "created": int(a.created_at.timestamp()),
    }


def key_view(k: ApiKey, account: str) -> dict[str, Any]:
    return {
        "prefix": k.prefix,
        "account": account,
        "name": k.name,
        "enabled": k.enabled,
        "revoked": k.revoked,
        "allowed_models": k.allowed_models,
        "created": int(k.created_at.timestamp()),
        "last_used": int(k.last_used_at.timestamp()) if k.last_used_at else None,
    }


def _credits(text: str, param: str) -> int:
    try:
        return parse_credits(text)
    except ValueError as e:
        raise invalid(str(e), param) from e


def _not_found(e: StoreError) -> APIError:
    return APIError(404, str(e), type="not_found_error", code="not_found")


@router.get("/accounts")
async def list_accounts(request: Request) -> dict[str, Any]:
    accounts = await platform_of(request).store.list_accounts()
    return {"object": "list", "data": [account_view(a) for a in accounts]}


@router.post("/accounts", status_code=201)
async def create_account(body: NewAccount, request: Request) -> dict[str, Any]:
    try:
        account = await platform_of(request).store.create_account(
            body.name, body.plan, _credits(body.credits, "credits")
        )
    except StoreError as e:
        raise APIError(409, str(e), code="account_exists") from e
    return account_view(await platform_of(request).store.account(account.name))


@router.patch("/accounts/{name}")
async def change_account(name: str, body: AccountChange, request: Request) -> dict[str, Any]:
    try:
        return account_view(await platform_of(request).store.update_account(name, plan=body.plan, status=body.status))
    except StoreError as e:
        raise _not_found(e) from e


@router.post("/accounts/{name}/credits")
async def grant_credits(name: str, body: CreditGrant, request: Request) -> dict[str, Any]:
    try:
        balance = await platform_of(request).store.grant(name, _credits(body.amount, "amount"), body.note)
    except StoreError as e:
        raise _not_found(e) from e
    return {"account": name, "balance": format_credits(balance), "balance_micro": balance}


@router.get("/accounts/{name}/keys")
async def list_keys(name: str, request: Request) -> dict[str, Any]:
    keys = await platform_of(request).store.list_keys(name)
    return {"object": "list", "data": [key_view(k, a) for k, a in keys]}


@router.post("/accounts/{name}/keys", status_code=201)
async def create_key(name: str, body: NewKey, request: Request) -> dict[str, Any]:
    try:
        full, key = await platform_of(request).store.create_key(name, body.name, body.allowed_models)
    except StoreError as e:
        raise _not_found(e) from e
    return {**key_view(await platform_of(request).store.key(key.prefix), name), "key": full}


@router.post("/keys/{prefix}/{action}")
async def change_key(prefix: str, action: Literal["enable", "disable", "revoke"], request: Request) -> dict[str, Any]:
    store = platform_of(request).store
    try:
        key = await (
            store.set_key(prefix, revoked=True)
            if action == "revoke"
            else store.set_key(prefix, enabled=action == "enable")
        )
    except StoreError as e:
        raise _not_found(e) from e
    return {"prefix": key.prefix, "enabled": key.enabled, "revoked": key.revoked}
