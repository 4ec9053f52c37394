"""The calling key's own account: balance and usage (GET /v1/account/balance, GET /v1/account/usage)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query, Request

from llamaserve.api.platform.keys import CallerDep, platform_of
from llamaserve.billing.models import UsageRecord
from llamaserve.billing.pricing import format_credits
from llamaserve.protocol.account import Balance, UsageItem, UsageList, UsageTotals
from llamaserve.protocol.errors import invalid
from llamaserve.protocol.validation import StoredText

router = APIRouter()


def _parse_time(value: str) -> dt.datetime:
    try:
        seconds = float(value)
    except ValueError:
        when = dt.datetime.fromisoformat(value)
        # In UTC, as the store compares them; a time at the calendar's edge may not exist there (OverflowError).
        return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)
    return dt.datetime.fromtimestamp(seconds, dt.UTC)  # nan: ValueError; inf, 1e300: OverflowError or OSError


def parse_time(value: str | None, param: str) -> dt.datetime | None:
    """ISO 8601 (naive means UTC) or Unix seconds, as an aware time in UTC."""
    if value is None:
        return None
    try:
        return _parse_time(value)
    except (ValueError, OverflowError, OSError) as e:
        raise invalid(f"{param} must be ISO 8601 or Unix seconds within years 1-9999, got {value!r}", param) from e


def usage_item(r: UsageRecord) -> UsageItem:
    created = r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=dt.UTC)
    return UsageItem(
        request_id=r.request_id,
        created=int(created.timestamp()),
        model=r.model,
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        cost=format_credits(r.cost),
        cost_micro=r.cost,
        status=r.status,
        latency_ms=r.latency_ms,
        estimated=r.estimated,
    )


def usage_totals(records: list[UsageRecord]) -> UsageTotals:
    return UsageTotals(
        requests=len(records),
        prompt_tokens=sum(r.prompt_tokens for r in records),
        completion_tokens=sum(r.completion_tokens for r in records),
        cost=format_credits(sum(r.cost for r in records)),
    )


@router.get("/v1/account/balance")
async def balance(request: Request, caller: CallerDep) -> Balance:
    platform = platform_of(request)
    # Holds first: a client that sees none open then gets a balance that has every settlement in it (read the
    # other way round, a settlement landing in between showed the old balance with no hold open).
    open_holds = await platform.store.open_holds(caller.account_id)
    account = await platform.store.account_by_id(caller.account_id)
    return Balance(
        account=account.name,
        plan=account.plan,
        balance=format_credits(account.balance),
        balance_micro=account.balance,
        open_holds=open_holds,
    )


@router.get("/v1/account/usage")
async def usage(
    request: Request,
    caller: CallerDep,
    since: Annotated[str | None, Query(description="ISO 8601 or Unix seconds")] = None,
    until: Annotated[str | None, Query(description="ISO 8601 or Unix seconds")] = None,
    model: StoredText | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> UsageList:
    records = await platform_of(request).store.usage(
        caller.account_id, parse_time(since, "since"), parse_time(until, "until"), model, limit
    )
    return UsageList(data=[usage_item(r) for r in records], totals=usage_totals(records))
