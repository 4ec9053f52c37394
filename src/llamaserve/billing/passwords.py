"""Dashboard passwords (argon2id, argon2-cffi's defaults) and login-session tokens.

Unlike API keys, passwords are chosen by people and guessable, so they get a slow, memory-hard hash. Hashing
takes tens of milliseconds of CPU: callers on the event loop run these in a thread.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # argon2 takes any length; this only bounds the work one request can ask for
EMAIL_PATTERN = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")
_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified when the email is unknown, so that a miss costs as long as a wrong password (no timing oracle).
    Made at the first log-in, known email or not, rather than at import (0.1 s of every start)."""
    return _hasher.hash(secrets.token_hex(16))


def normalize_email(email: str) -> str:
    return email.strip().lower()


def check_email(email: str) -> str | None:
    """Why `email` is not acceptable, or None."""
    if len(email) > 254 or not EMAIL_PATTERN.match(email):
        return "enter an email address such as name@example.com"
    return None


def check_password(password: str) -> str | None:
    """Why `password` is not acceptable, or None."""
    if len(password) < MIN_PASSWORD:
        return f"a password needs at least {MIN_PASSWORD} characters"
    if len(password) > MAX_PASSWORD:
        return f"a password may have at most {MAX_PASSWORD} characters"
    return None


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password: str, password_hash: str | None) -> bool:
    """Whether `password` matches; a missing hash (an account without a login) never matches but costs the same."""
    dummy = _dummy_hash()
    try:
        return _hasher.verify(password_hash or dummy, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """Whether the hash was made with weaker parameters than today's (re-hash it at the next login)."""
    return _hasher.check_needs_rehash(password_hash)


def new_session_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the store keeps of a session token (256 random bits: a fast hash suffices)."""
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token(session_token: str) -> str:
    """The CSRF token of a session: derived from the session's secret token, so it needs no storage and cannot
    be computed by a page that cannot read the (HttpOnly) cookie."""
    return hmac.new(session_token.encode(), b"llamaserve csrf", hashlib.sha256).hexdigest()
