"""The accounts slice's port: accounts and keys, in the domain's verbs.

:class:`~meterline.accounts.postgres.PostgresAccountStore` is the adapter.
Blocking: async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from meterline.accounts.model import Account, AccountStatus, ApiKey, KeyKind

__all__ = ["AccountStore", "AccountUpdate", "StoredKey"]


class StoredKey(NamedTuple):
    """A key with its hash: what each process keeps in memory to authenticate."""

    key: ApiKey
    secret_hash: bytes


class AccountUpdate(NamedTuple):
    """What an update changes; None leaves a field as it is."""

    name: str | None = None
    status: AccountStatus | None = None
    timezone: str | None = None
    metadata: Mapping[str, Any] | None = None


class AccountStore(Protocol):
    def create_account(
        self,
        account_id: str,
        *,
        name: str = "",
        timezone: str = "UTC",
        metadata: Mapping[str, Any] | None = None,
        registered_by: str = "api",
    ) -> Account:
        """Raises AccountExists."""
        ...

    def account(self, account_id: str) -> Account:
        """Raises AccountNotFound."""
        ...

    def accounts(self, *, after: str | None = None, limit: int = 100) -> list[Account]:
        """Accounts in id order, from the one after ``after``: pages that never skip."""
        ...

    def update_account(self, account_id: str, change: AccountUpdate) -> Account:
        """Raises AccountNotFound."""
        ...

    def register(self, account_ids: Collection[str]) -> list[str]:
        """Create the accounts that do not exist yet (from usage); returns those created."""
        ...

    def known(self, account_ids: Collection[str]) -> set[str]:
        """Those of ``account_ids`` that exist."""
        ...

    def create_key(
        self,
        key_id: str,
        secret_hash: bytes,
        *,
        kind: KeyKind,
        name: str = "",
        account_id: str | None = None,
        account_ids: Collection[str] | None = None,
        expires_at: datetime | None = None,
    ) -> StoredKey:
        """Raises AccountNotFound for an account key of an unknown account."""
        ...

    def revoke_key(self, key_id: str, at: datetime) -> StoredKey:
        """Raises KeyNotFound; revoking again keeps the first revocation's time."""
        ...

    def api_keys(self, *, account_id: str | None = None) -> list[ApiKey]: ...

    def keys_since(self, generation: int) -> tuple[int, list[StoredKey]]:
        """The ring's generation now, and every key changed after ``generation``."""
        ...

    def touch_keys(self, last_used: Mapping[str, datetime]) -> None:
        """Move ``last_used_at`` forward, one statement for all the keys."""
        ...

    def answers(self) -> bool:
        """Whether the store can be reached now (readiness)."""
        ...

    def check_secret(self, check: bytes) -> bool:
        """Whether the keys were hashed under the secret whose check this is (the
        first process to ask records it)."""
        ...


def page_of(accounts: Sequence[Account], limit: int) -> tuple[list[Account], str | None]:
    """A page and the cursor of the next, from ``limit + 1`` accounts read."""
    page = list(accounts[:limit])
    return page, (page[-1].account_id if len(accounts) > limit and page else None)
