"""Accounts, API keys, and who is asking (a :class:`Principal`).

An account is what gateways already name in each usage event
(``account_id``); its timezone says which calendar days and months its
quotas and statements use. A key is one of three kinds:

- **admin**: everything;
- **service** (a gateway): reports usage, and reads usage, for every account
  or for a listed set;
- **account**: reads one account's own usage, balance, quotas, statements.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "MAX_ACCOUNT_ID_LENGTH",
    "Account",
    "AccountExists",
    "AccountNotFound",
    "AccountStatus",
    "ApiKey",
    "KeyKind",
    "KeyNotFound",
    "Principal",
    "account_id_problem",
    "check_timezone",
]

#: Longest account id: the same bound ingest puts on an event's account_id.
MAX_ACCOUNT_ID_LENGTH = 128
MAX_ACCOUNT_NAME_LENGTH = 256


class AccountStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


class KeyKind(StrEnum):
    ADMIN = "admin"
    SERVICE = "service"
    ACCOUNT = "account"


class AccountNotFound(LookupError):
    """No account with that id (answered 404 to an admin)."""


class AccountExists(ValueError):
    """An account with that id exists already (409)."""


class KeyNotFound(LookupError):
    """No key with that id (404)."""


def account_id_problem(account_id: str) -> str | None:
    """Why ``account_id`` cannot name an account, or None: the rule events follow too."""
    if not account_id.strip():
        return "account_id is missing"
    if len(account_id) > MAX_ACCOUNT_ID_LENGTH:
        return f"account_id is longer than {MAX_ACCOUNT_ID_LENGTH} characters ({len(account_id)})"
    if not account_id.isprintable():
        return "account_id contains control characters"
    return None


def check_timezone(name: str) -> str:
    """An IANA timezone name, as given, if this machine's tz database knows it."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"timezone {name[:64]!r} is not an IANA timezone name") from None
    return name


@dataclass(frozen=True, slots=True)
class Account:
    account_id: str
    name: str
    status: AccountStatus
    timezone: str
    currency: str
    metadata: Mapping[str, Any]
    #: "api", "cli", or "first_event": registered by its first usage event
    registered_by: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as stored and listed: everything but its secret."""

    key_id: str
    kind: KeyKind
    name: str
    #: kind account: the account it reads
    account_id: str | None
    #: kind service: the accounts it acts for; None means every account
    account_ids: frozenset[str] | None
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def principal(self) -> Principal:
        return Principal(self.key_id, self.kind, self.account_id, self.account_ids)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from: the key's kind and what it is scoped to."""

    key_id: str
    kind: KeyKind
    account_id: str | None = None
    account_ids: frozenset[str] | None = field(default=None)

    @property
    def is_admin(self) -> bool:
        return self.kind is KeyKind.ADMIN

    def may_read(self, account_id: str) -> bool:
        """Whether this key may see ``account_id``'s usage, balance, quotas."""
        if self.kind is KeyKind.ACCOUNT:
            return account_id == self.account_id
        return self.may_act_for(account_id)

    def may_act_for(self, account_id: str) -> bool:
        """Whether this key may report usage (and, later, ask quotas) for ``account_id``."""
        if self.kind is KeyKind.ADMIN:
            return True
        if self.kind is KeyKind.SERVICE:
            return self.account_ids is None or account_id in self.account_ids
        return False


#: Who asks when authentication is off (METERLINE_AUTH=off, local development only).
ANYONE = Principal("auth-off", KeyKind.ADMIN)
