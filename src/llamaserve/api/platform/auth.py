"""Dashboard logins: sign-up, log-in and log-out with email and password, sessions in cookies, CSRF protection.

- Sessions: a random token in the `ls_session` cookie (Secure, HttpOnly, SameSite=Strict); the store keeps only
  its SHA-256. Browsers accept Secure cookies from http://localhost and 127.0.0.1; anywhere else, serve the
  dashboard over HTTPS (a TLS proxy in front).
- CSRF: every state-changing call (POST, PATCH, PUT, DELETE) must send the `X-CSRF-Token` header. With a session
  it is derived from the session's token (HMAC), before log-in it must equal the `ls_csrf` cookie (double submit);
  `GET /auth/session` hands it out. A custom header cannot be sent cross-site without a CORS preflight, which this
  server never grants, and a page elsewhere cannot read the token. A foreign `Origin` is refused as well.
- Log-in attempts: 5 failures per email and client address per 5 minutes, then 429 until the oldest expires.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request, Response, Security
from fastapi.security import APIKeyCookie, APIKeyHeader
from pydantic import BaseModel, Field

from llamaserve.api.platform.attempts import LOGIN_FAILURES, LOGIN_WINDOW, MemoryWindowLimiter, WindowLimiter
from llamaserve.api.platform.keys import platform_of
from llamaserve.billing.models import Account, WebSession
from llamaserve.billing.passwords import (
    check_email,
    check_password,
    csrf_token,
    hash_password,
    needs_rehash,
    normalize_email,
    verify_password,
)
from llamaserve.billing.store import StoreError
from llamaserve.protocol.common import StrictModel
from llamaserve.protocol.errors import APIError, invalid
from llamaserve.protocol.validation import StoredText, Text

SESSION_COOKIE = "ls_session"
PRESESSION_COOKIE = "ls_csrf"
CSRF_HEADER = "X-CSRF-Token"
SESSION_SECONDS = 24 * 3600
SIGNUP_PLAN = "free"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}

session_cookie = APIKeyCookie(
    name=SESSION_COOKIE,
    scheme_name="session",
    auto_error=False,
    description="Dashboard session, set by POST /auth/login or /auth/signup.",
)
csrf_header = APIKeyHeader(
    name=CSRF_HEADER,
    scheme_name="csrf",
    auto_error=False,
    description="CSRF token from GET /auth/session; needed by every POST/PATCH.",
)


@dataclass
class DashboardSettings:
    signup: bool  # anyone may create an account
    starter_credits: int  # micro-credits of each new account
    logins: WindowLimiter = field(default_factory=lambda: MemoryWindowLimiter(LOGIN_FAILURES, LOGIN_WINDOW))
    signups: WindowLimiter | None = None  # sign-ups per client address; None: no limit
    max_keys: int | None = None  # active keys an account may create from the dashboard; None: no limit

    async def close(self) -> None:
        await self.logins.close()
        if self.signups is not None:
            await self.signups.close()


@dataclass(frozen=True)
class LoggedIn:
    token: str
    session: WebSession
    account: Account

    @property
    def csrf(self) -> str:
        return csrf_token(self.token)


def settings_of(request: Request) -> DashboardSettings:
    return request.app.state.dashboard


# --- checks ---------------------------------------------------------------------------------------------------
def _check_origin(request: Request) -> None:
    """A browser names the page that sent a request in Origin; one from another site is refused outright."""
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise APIError(403, f"cross-origin request from {origin} refused", type="permission_error", code="csrf_failed")


def check_csrf(request: Request, expected: str | None) -> None:
    """State-changing requests must carry the expected CSRF token in the X-CSRF-Token header."""
    if request.method in SAFE_METHODS:
        return
    _check_origin(request)
    sent = request.headers.get(CSRF_HEADER, "")
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise APIError(
            403,
            f"missing or wrong CSRF token: send the {CSRF_HEADER} header that GET /auth/session returns",
            type="permission_error",
            code="csrf_failed",
        )


async def session_of(request: Request) -> LoggedIn | None:
    """The request's valid session, if any (looked up once per request)."""
    if hasattr(request.state, "logged_in"):
        return request.state.logged_in
    token = request.cookies.get(SESSION_COOKIE)
    found = await platform_of(request).store.session(token) if token else None
    request.state.logged_in = LoggedIn(token, *found) if token and found else None
    return request.state.logged_in


async def require_session(
    request: Request,
    _cookie: Annotated[str | None, Security(session_cookie)],
    _csrf: Annotated[str | None, Security(csrf_header)],
) -> LoggedIn:
    """FastAPI dependency: the logged-in account (401 without a valid session); CSRF-checked unless the method is
    safe."""
    logged_in = await session_of(request)
    if logged_in is None:
        message = "not logged in (or the session expired)"
        raise APIError(401, message, type="authentication_error", code="not_logged_in")
    check_csrf(request, logged_in.csrf)
    return logged_in


SessionDep = Annotated[LoggedIn, Depends(require_session)]


# --- cookies --------------------------------------------------------------------------------------------------
def _set_cookie(response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", secure=True, httponly=True, samesite="strict")


def _presession_token(request: Request, response: Response) -> str:
    """The pre-login CSRF token: the ls_csrf cookie's value, set now if the browser has none."""
    token = request.cookies.get(PRESESSION_COOKIE)
    if not token or len(token) > 100:
        token = secrets.token_urlsafe(32)
        _set_cookie(response, PRESESSION_COOKIE, token, SESSION_SECONDS)
    return token


# --- API ------------------------------------------------------------------------------------------------------
def client_address(request: Request) -> str:
    """The client's address: the peer's, or a configured proxy's X-Forwarded-For (--forwarded-allow-ips)."""
    return request.client.host if request.client else ""


def _too_many(wait: float | None, what: str, code: str) -> None:
    if wait is not None:
        raise APIError(
            429,
            f"{what}; try again in {wait:.0f} s",
            type="rate_limit_error",
            code=code,
            headers={"Retry-After": str(max(1, round(wait)))},
        )


class Credentials(StrictModel):
    email: Annotated[StoredText, Field(max_length=254)]
    password: Annotated[Text, Field(max_length=1024)]


class SessionInfo(BaseModel):
    authenticated: bool
    csrf_token: str = Field(description=f"Send it as {CSRF_HEADER} with every POST/PATCH.")
    signup_enabled: bool
    account: str | None = None
    email: str | None = None
    plan: str | None = None
    is_admin: bool = False


router = APIRouter(prefix="/auth", tags=["dashboard: log-in"])


def _info(request: Request, logged_in: LoggedIn) -> SessionInfo:
    a = logged_in.account
    return SessionInfo(
        authenticated=True,
        csrf_token=logged_in.csrf,
        signup_enabled=settings_of(request).signup,
        account=a.name,
        email=a.email,
        plan=a.plan,
        is_admin=a.is_admin,
    )


async def _log_in(request: Request, response: Response, account: Account) -> SessionInfo:
    token = await platform_of(request).store.create_session(account.id, dt.timedelta(seconds=SESSION_SECONDS))
    _set_cookie(response, SESSION_COOKIE, token, SESSION_SECONDS)
    found = await platform_of(request).store.session(token)
    assert found is not None
    return _info(request, LoggedIn(token, *found))


@router.get("/session", response_model=SessionInfo)
async def get_session(request: Request, response: Response) -> SessionInfo:
    """Who is logged in, and the CSRF token for the next state-changing call (before log-in too)."""
    response.headers["Cache-Control"] = "no-store"
    logged_in = await session_of(request)
    if logged_in is not None:
        return _info(request, logged_in)
    token = _presession_token(request, response)
    return SessionInfo(authenticated=False, csrf_token=token, signup_enabled=settings_of(request).signup)


@router.post("/signup", response_model=SessionInfo, status_code=201)
async def signup(
    body: Credentials,
    request: Request,
    response: Response,
    _csrf: Annotated[str | None, Security(csrf_header)],
) -> SessionInfo:
    """Create an account (plan `free`, the server's starter credits) and log in to it."""
    settings = settings_of(request)
    check_csrf(request, request.cookies.get(PRESESSION_COOKIE))
    if not settings.signup:
        message = "sign-up is turned off here; an admin creates accounts"
        raise APIError(403, message, type="permission_error", code="signup_disabled")
    email = normalize_email(body.email)
    if problem := check_email(email):
        raise invalid(problem, "email")
    if problem := check_password(body.password):
        raise invalid(problem, "password")
    if settings.signups is not None:  # counted when tried: a burst of concurrent sign-ups cannot all pass
        wait = await settings.signups.acquire(client_address(request))
        _too_many(wait, "too many sign-ups from this address", "too_many_signups")
    hashed = await asyncio.to_thread(hash_password, body.password)
    name = email if len(email) <= 64 else f"{email[:40]}-{secrets.token_hex(6)}"
    try:
        account = await platform_of(request).store.create_account(
            name, SIGNUP_PLAN, settings.starter_credits, email=email, password_hash=hashed
        )
    except StoreError as e:
        message = "an account with this email exists already; log in"
        raise APIError(409, message, param="email", code="email_taken") from e
    return await _log_in(request, response, account)


@router.post("/login", response_model=SessionInfo)
async def login(
    body: Credentials,
    request: Request,
    response: Response,
    _csrf: Annotated[str | None, Security(csrf_header)],
) -> SessionInfo:
    """Log in; 401 for a wrong email or password (which one is not said), 429 after 5 failures in 5 minutes."""
    check_csrf(request, request.cookies.get(PRESESSION_COOKIE))
    store = platform_of(request).store
    limiter = settings_of(request).logins
    email = normalize_email(body.email)
    who = f"{email}\0{client_address(request)}"
    _too_many(await limiter.retry_after(who), "too many failed log-ins", "too_many_login_attempts")
    account = await store.account_by_email(email)
    if account is not None and account.status != "active":
        # Whatever the password: answering a right one otherwise than a wrong one would confirm it.
        message = f"account {account.name!r} is {account.status}"
        raise APIError(403, message, type="permission_error", code="account_suspended")
    hashed = account.password_hash if account else None
    if account is None or not await asyncio.to_thread(verify_password, body.password, hashed):
        await limiter.record(who)
        raise APIError(401, "wrong email or password", type="authentication_error", code="invalid_credentials")
    await limiter.clear(who)
    if hashed and needs_rehash(hashed):
        await store.update_account(account.name, password_hash=await asyncio.to_thread(hash_password, body.password))
    return await _log_in(request, response, account)


@router.post("/logout", response_model=SessionInfo)
async def logout(request: Request, response: Response, logged_in: SessionDep) -> SessionInfo:
    """End the session (its cookie stops working everywhere) and revoke its playground key."""
    platform = platform_of(request)
    await platform.store.end_session(logged_in.token)
    platform.auth_cache.clear()  # the playground key stops working now, not in a few seconds
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    token = _presession_token(request, response)
    return SessionInfo(authenticated=False, csrf_token=token, signup_enabled=settings_of(request).signup)
