"""Managing accounts' keys: issuing (the key is shown once), revoking, the first keys.

:class:`Accounts` is what the HTTP routes and the CLI use: the store, and
the key ring of this process so that its own changes take effect at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from meterline.accounts.auth import KeyRing
from meterline.accounts.keys import KeyHasher, new_key
from meterline.accounts.model import ApiKey, KeyKind
from meterline.accounts.store import AccountStore

__all__ = ["Accounts", "IssuedKey", "first_keys"]


@dataclass(frozen=True)
class IssuedKey:
    key: ApiKey
    #: the whole key, shown this once; only its hash is stored
    secret: str


class Accounts:
    """The accounts store with the means to issue keys."""

    def __init__(self, store: AccountStore, hasher: KeyHasher, ring: KeyRing | None = None) -> None:
        self.store = store
        self.hasher = hasher
        self.ring = ring

    def issue_key(
        self,
        kind: KeyKind,
        *,
        name: str = "",
        account_id: str | None = None,
        account_ids: Collection[str] | None = None,
        expires_at: datetime | None = None,
        now: datetime | None = None,
    ) -> IssuedKey:
        """A new key. Raises ValueError for a scope that does not fit its kind,
        AccountNotFound for an account key of an unknown account."""
        now = now or datetime.now(UTC)
        if kind is KeyKind.ACCOUNT and account_id is None:
            raise ValueError("an account key needs account_id: the account it reads")
        if kind is not KeyKind.ACCOUNT and account_id is not None:
            raise ValueError(f"a {kind} key has no account_id (account keys have)")
        if kind is not KeyKind.SERVICE and account_ids is not None:
            raise ValueError(f"a {kind} key has no account_ids (service keys may have)")
        if account_ids is not None and not account_ids:
            raise ValueError("account_ids, when given, lists at least one account")
        if expires_at is not None and expires_at <= now:
            raise ValueError("expires_at is in the past")
        key_id, secret = new_key()
        stored = self.store.create_key(
            key_id,
            self.hasher.hash(secret),
            kind=kind,
            name=name,
            account_id=account_id,
            account_ids=account_ids,
            expires_at=expires_at,
        )
        if self.ring is not None:
            self.ring.remember(stored)
        return IssuedKey(stored.key, secret)

    def revoke_key(self, key_id: str, *, now: datetime | None = None) -> ApiKey:
        """Raises KeyNotFound. In effect here at once, on other replicas within a refresh."""
        stored = self.store.revoke_key(key_id, now or datetime.now(UTC))
        if self.ring is not None:
            self.ring.remember(stored)
        return stored.key


def first_keys(accounts: Accounts, path: Path) -> list[IssuedKey]:
    """On a store without any key: an admin key and a service key, written to ``path``
    (readable by its owner only). Returns them, to be shown once; [] if keys exist."""
    if accounts.store.api_keys():
        return []
    issued = [
        accounts.issue_key(KeyKind.ADMIN, name="first admin key"),
        accounts.issue_key(KeyKind.SERVICE, name="first service key"),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({f"{k.key.kind}_key": k.secret for k in issued}, out, indent=2)
        out.write("\n")
    os.chmod(path, 0o600)  # also when the file was there with other permissions
    return issued
