"""The account store's tables. Money is in micro-credits (integers, 1 credit = 1,000,000), never floats.

An account's `balance` is what it can still spend: grants add to it, a hold takes the worst case of a request
out of it, settling gives the hold back and takes the real charge. Every change to `balance` writes a ledger row
in the same transaction, so the balance always equals the sum of its ledger.
"""

from __future__ import annotations

import builtins  # the files tables have a column named bytes: the type is builtins.bytes there
import datetime as dt

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
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


class File(Base):
    """An uploaded file (`purpose` batch: a batch's JSONL input) or one a batch made (batch_output). The content
    is in the database, so every replica serves it."""

    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # file-<hex>
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), nullable=False)
    purpose: Mapped[str] = mapped_column(String(32), nullable=False)
    filename: Mapped[str] = mapped_column(String(255), nullable=False)
    bytes: Mapped[int] = mapped_column(Integer, nullable=False)
    content: Mapped[builtins.bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[dt.datetime] = _now()

    __table_args__ = (Index("ix_files_account_created", "account_id", "created_at"),)


class Batch(Base):
    """A batch job: an input file's requests, run when the engines have room, answered in an output file (and
    an error file for the lines that failed). Statuses as OpenAI's: validating → in_progress → finalizing →
    completed; failed, expired, cancelling → cancelled."""

    __tablename__ = "batches"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # batch_<hex>
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), nullable=False)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), nullable=False)  # its lines run as this key
    endpoint: Mapped[str] = mapped_column(String(64), nullable=False)
    input_file_id: Mapped[str] = mapped_column(String(40), nullable=False)
    completion_window: Mapped[str] = mapped_column(String(16), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    output_file_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)
    errors: Mapped[list[dict[str, object]] | None] = mapped_column(JSON, nullable=True)  # why it failed
    total: Mapped[int] = mapped_column(Integer, nullable=False)
    completed: Mapped[int] = mapped_column(Integer, nullable=False)
    failed: Mapped[int] = mapped_column(Integer, nullable=False)
    cost: Mapped[int] = mapped_column(BigInteger, nullable=False)  # micro-credits charged for its lines so far
    created_at: Mapped[dt.datetime] = _now()
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    in_progress_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finalizing_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    failed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expired_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancelling_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancelled_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (
        Index("ix_batches_account_created", "account_id", "created_at"),
        Index("ix_batches_status", "status"),
    )


class BatchLine(Base):
    """One request of a batch: pending → running (claimed by a gateway, `owner`) → done, with its output line
    (OpenAI's shape) written in the same transaction as its charge."""

    __tablename__ = "batch_lines"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"), nullable=False)
    line: Mapped[int] = mapped_column(Integer, nullable=False)  # its place in the input file, from 0
    custom_id: Mapped[str] = mapped_column(String(512), nullable=False)
    body: Mapped[str] = mapped_column(Text, nullable=False)  # the request body, JSON
    tokens: Mapped[int] = mapped_column(Integer, nullable=False)  # its estimate: prompt bytes / 4 + max_tokens × n
    status: Mapped[str] = mapped_column(String(16), nullable=False)  # pending | running | done
    owner: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the gateway running it
    output: Mapped[str | None] = mapped_column(Text, nullable=True)  # its line of the output or error file
    failed: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())

    __table_args__ = (Index("ix_batch_lines_batch_status", "batch_id", "status"),)


class IdempotencyRecord(Base):
    """A request sent with an Idempotency-Key (per account), while it runs (`owner`: the gateway running it) and
    then with its response, kept until `expires_at` so that a retry gets it again."""

    __tablename__ = "idempotency_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), nullable=False)
    key: Mapped[str] = mapped_column(String(255), nullable=False)
    request_hash: Mapped[str] = mapped_column(String(64), nullable=False)  # SHA-256 of its path and JSON body
    status: Mapped[str] = mapped_column(String(16), nullable=False)  # running | done
    owner: Mapped[str | None] = mapped_column(String(32), nullable=True)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    stream: Mapped[bool] = mapped_column(Boolean, nullable=False)  # the response is SSE events
    response: Mapped[builtins.bytes | None] = mapped_column(LargeBinary, nullable=True)
    bytes: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)

    __table_args__ = (
        UniqueConstraint("account_id", "key", name="uq_idempotency_keys_account_key"),
        Index("ix_idempotency_keys_expires", "expires_at"),
    )
