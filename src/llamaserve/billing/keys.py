"""API keys: `ls-<prefix>_<secret>`. The prefix is public (it finds the key's row); only a hash of the secret is
stored. The secret is 192 random bits, so a fast hash suffices (nothing to brute-force, unlike a password)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

KEY_PATTERN = re.compile(r"^ls-([a-z0-9]{10})_([A-Za-z0-9]{32})$")
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_SECRET_ALPHABET = _ALPHABET + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class NewKey:
    prefix: str
    secret_hash: str
    full: str  # shown once, never stored


def generate_key() -> NewKey:
    prefix = "".join(secrets.choice(_ALPHABET) for _ in range(10))
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(32))
    return NewKey(prefix, hash_secret(secret), f"ls-{prefix}_{secret}")


def parse_key(full: str) -> tuple[str, str] | None:
    """(prefix, secret) of a well-formed key, else None."""
    match = KEY_PATTERN.match(full)
    return (match.group(1), match.group(2)) if match else None


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), secret_hash)
