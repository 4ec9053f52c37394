"""GET /v1/account/balance and GET /v1/account/usage: the calling key's own account."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Balance(BaseModel):
    object: Literal["balance"] = "balance"
    account: str
    plan: str
    balance: str = Field(description='Credits, as a decimal string ("9.999812").')
    balance_micro: int = Field(description="The same in micro-credits (1 credit = 1,000,000).")
    open_holds: int = Field(description="Requests whose worst-case cost is held right now.")


class UsageItem(BaseModel):
    request_id: str
    created: int
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost: str
    cost_micro: int
    status: str = Field(description="ok, cancelled, error, timeout or rejected")
    latency_ms: int
    estimated: bool = Field(
        description="true when the token counts are an estimate: an upstream that reported no usage, counted at "
        "4 bytes of text a token (no tokenizer configured for the model)"
    )


class UsageTotals(BaseModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: str


class UsageList(BaseModel):
    object: Literal["list"] = "list"
    data: list[UsageItem] = Field(description="Newest first.")
    totals: UsageTotals


# --- accounts and keys, as the admin API and the dashboard show them ------------------------------------------
class AccountView(BaseModel):
    name: str
    plan: str
    status: str = Field(description="active or suspended")
    balance: str
    balance_micro: int
    created: int
    email: str | None
    is_admin: bool


class AccountList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AccountView]


class CreditsGranted(BaseModel):
    account: str
    balance: str
    balance_micro: int


class KeyView(BaseModel):
    prefix: str = Field(description="The key's public part; the secret is never stored.")
    account: str
    name: str
    enabled: bool
    revoked: bool
    allowed_models: list[str] | None = Field(description="null: every model")
    created: int
    last_used: int | None


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyView]


class NewKeyView(KeyView):
    key: str = Field(description="The whole key: shown in this response only.")


class KeyState(BaseModel):
    prefix: str
    enabled: bool
    revoked: bool


# --- the dashboard's views of the logged-in account ----------------------------------------------------------
class DashboardAccount(BaseModel):
    object: Literal["account"] = "account"
    account: str
    email: str | None
    plan: str
    requests_per_minute: int | None = Field(description="null: no limit")
    tokens_per_minute: int | None = Field(description="null: no limit")
    balance: str
    balance_micro: int
    open_holds: int
    is_admin: bool


class PlanView(BaseModel):
    name: str
    requests_per_minute: int | None
    tokens_per_minute: int | None


class PlanList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PlanView]


class ModelId(BaseModel):
    id: str


class ModelIdList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelId]


class DashboardKey(KeyView):
    expires: int | None = Field(description="Playground keys expire with their session; others never.")


class DashboardKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DashboardKey]


class NewDashboardKey(DashboardKey):
    key: str = Field(description="The whole key: shown in this response only.")


class DashboardUsageItem(UsageItem):
    key: str | None = Field(description="The prefix of the key that made the request (null: since deleted).")
    key_name: str | None


class DashboardUsageList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DashboardUsageItem]
    totals: UsageTotals


class UsageBucketView(BaseModel):
    start: int = Field(description="Unix seconds: the bucket's start.")
    model: str
    key: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: str
    cost_micro: int


class SummaryKey(BaseModel):
    prefix: str
    name: str
    playground: bool


class UsageSummary(BaseModel):
    object: Literal["usage_summary"] = "usage_summary"
    bucket_seconds: int
    since: int
    until: int
    data: list[UsageBucketView]
    keys: list[SummaryKey]


class CacheReset(BaseModel):
    model: str  # the local model whose prefix cache was emptied
    reset: bool = True
