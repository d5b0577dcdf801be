"""Passwords (hashlib.scrypt), the session's user, and the CSRF token every form carries."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

# scrypt at n=2**14, r=8, p=1 (16 MiB, tens of ms a check): the parameters OWASP lists for scrypt.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD_LENGTH = 8
CSRF_FIELD = "csrf_token"
CSRF_SESSION_KEY = "csrf"
USER_SESSION_KEY = "user"


def hash_password(password: str) -> str:
    """A salted scrypt hash: scrypt$n$r$p$salt_hex$hash_hex."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches a hash made by hash_password (constant-time comparison)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=len(digest) // 2
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(computed.hex(), digest)


# A hash of a random password: a login with an unknown user name costs the same as one with a wrong password.
DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


def csrf_token(session: dict[str, Any]) -> str:
    """The session's CSRF token (the synchronizer token pattern), made on first use."""
    token = session.get(CSRF_SESSION_KEY)
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        session[CSRF_SESSION_KEY] = token
    return token


def csrf_ok(session: dict[str, Any], submitted: object) -> bool:
    """Whether a form's token is the session's."""
    expected = session.get(CSRF_SESSION_KEY)
    if not isinstance(expected, str) or not expected or not isinstance(submitted, str):
        return False
    return hmac.compare_digest(expected.encode(), submitted.encode())
