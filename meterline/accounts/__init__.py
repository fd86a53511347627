"""Accounts, API keys and who may ask what (see :mod:`.model`)."""

from meterline.accounts.auth import Authenticator, KeyRing, OpenDoor, Unauthenticated, bearer_token
from meterline.accounts.model import (
    Account,
    AccountExists,
    AccountNotFound,
    AccountStatus,
    ApiKey,
    KeyKind,
    KeyNotFound,
    Principal,
)
from meterline.accounts.store import AccountStore, AccountUpdate, StoredKey

__all__ = [
    "Account",
    "AccountExists",
    "AccountNotFound",
    "AccountStatus",
    "AccountStore",
    "AccountUpdate",
    "ApiKey",
    "Authenticator",
    "KeyKind",
    "KeyNotFound",
    "KeyRing",
    "OpenDoor",
    "Principal",
    "StoredKey",
    "Unauthenticated",
    "bearer_token",
]
