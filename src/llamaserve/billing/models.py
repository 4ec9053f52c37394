"""The account store's tables. Money is in micro-credits (integers, 1 credit = 1,000,000), never floats.

An account's `balance` is what it can still spend: grants add to it, a hold takes the worst case of a request
out of it, settling gives the hold back and takes the real charge. Every change to `balance` writes a ledger row
in the same transaction, so the balance always equals the sum of its ledger.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

MICRO = 1_000_000  # micro-credits per credit


class Base(DeclarativeBase):
    pass


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _now() -> Mapped[dt.datetime]:
    return mapped_column(DateTime(timezone=True), default=_utcnow, nullable=False)


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    plan: Mapped[str] = mapped_column(String(32), nullable=False, default="free")
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="active")  # active | suspended
    balance: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    created_at: Mapped[dt.datetime] = _now()
    # Dashboard login (None: the account has no login; keys still work). Emails are stored lower-cased.
    email: Mapped[str | None] = mapped_column(String(254), nullable=True)
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)  # argon2id, never the password
    is_admin: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())

    __table_args__ = (Index("ix_accounts_email", "email", unique=True),)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), nullable=False, index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True, nullable=False)
    secret_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    name: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    revoked: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)  # None: every model
    created_at: Mapped[dt.datetime] = _now()
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Keys that expire: the dashboard playground's, minted per login session. None: never expires.
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Hold(Base):
    """Credits reserved for one request until it is settled."""

    __tablename__ = "holds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), nullable=False)
    request_id: Mapped[str] = mapped_column(String(64), nullable=False)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="open")  # open | settled
    created_at: Mapped[dt.datetime] = _now()
    settled_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The gateway process that took it (Gateway.id); None: taken before processes were tracked.
    owner: Mapped[str | None] = mapped_column(String(32), nullable=True)

    __table_args__ = (Index("ix_holds_status_created", "status", "created_at"),)


class Gateway(Base):
    """A running gateway process, as long as it keeps beating: the holds of one that stopped beating belong to no
    live request (it crashed or was killed) and any other process may release them."""

    __tablename__ = "gateways"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    started_at: Mapped[dt.datetime] = _now()
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class LedgerEntry(Base):
    __tablename__ = "ledger"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), nullable=False, index=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # grant | hold | release | charge
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)  # signed change of the balance
    hold_id: Mapped[int | None] = mapped_column(ForeignKey("holds.id"), nullable=True)
    note: Mapped[str] = mapped_column(String(200), nullable=False, default="")
    created_at: Mapped[dt.datetime] = _now()


class UsageRecord(Base):
    __tablename__ = "usage"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), nullable=False)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), nullable=False)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    prompt_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    completion_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    cost: Mapped[int] = mapped_column(BigInteger, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)  # ok | cancelled | error | timeout
    latency_ms: Mapped[int] = mapped_column(Integer, nullable=False)
    # The counts are an estimate (an upstream that reported no usage, no tokenizer to count with).
    estimated: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())
    created_at: Mapped[dt.datetime] = _now()

    __table_args__ = (Index("ix_usage_account_created", "account_id", "created_at"),)


class WebSession(Base):
    """A dashboard login. The cookie holds the token; only its SHA-256 is stored, so the table cannot log anyone
    in."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), nullable=False, index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    created_at: Mapped[dt.datetime] = _now()
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # The playground's key for this session (revoked with the session).
    playground_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
