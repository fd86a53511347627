"""API key texts: how they are made, read and hashed.

A key reads ``mlk_<key id>_<secret>``: the key id (12 characters) is public,
it is how a key is found and listed; the secret is 32 random bytes. Only
HMAC-SHA256(server secret, whole key) is stored, so a copy of the database
holds nothing a client could present; for random keys of this length a
keyed hash is enough (a slow password hash buys nothing).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import string
from pathlib import Path

__all__ = ["KEY_PREFIX", "KeyHasher", "new_key", "read_key_id", "server_secret"]

KEY_PREFIX = "mlk_"
_KEY_ID_LENGTH = 12
_KEY_ID_ALPHABET = string.ascii_lowercase + string.digits
#: the whole key: prefix, key id, "_", 43 characters of URL-safe base64
_KEY_LENGTH = len(KEY_PREFIX) + _KEY_ID_LENGTH + 1 + 43
_SECRET_CHECK_TEXT = b"meterline key ring"


def new_key() -> tuple[str, str]:
    """A new (key id, whole key)."""
    key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(_KEY_ID_LENGTH))
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def read_key_id(key: str) -> str | None:
    """The key id of something shaped like a key, else None."""
    start, end = len(KEY_PREFIX), len(KEY_PREFIX) + _KEY_ID_LENGTH
    if len(key) != _KEY_LENGTH or not key.startswith(KEY_PREFIX) or key[end] != "_":
        return None
    return key[start:end]


class KeyHasher:
    """Hashes keys under the server secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the server secret must have at least 16 bytes")
        self._secret = secret

    def hash(self, key: str) -> bytes:
        return hmac.new(self._secret, key.encode(), hashlib.sha256).digest()

    def matches(self, key: str, stored: bytes) -> bool:
        """Constant-time comparison of a presented key with a stored hash."""
        return hmac.compare_digest(self.hash(key), stored)

    def secret_check(self) -> bytes:
        """A value stored beside the keys: a process with another secret can tell."""
        return hmac.new(self._secret, _SECRET_CHECK_TEXT, hashlib.sha256).digest()


def server_secret(configured: str, data_dir: Path) -> bytes:
    """The configured secret, or the one kept in ``data_dir/auth-secret`` (made once, 0600)."""
    if configured:
        return configured.encode()
    path = data_dir / "auth-secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32) + "\n")
    return path.read_text().strip().encode()
