"""The accounts slice's HTTP routes: accounts, and the keys that call the API.

Managing is for admin keys; an account's own record is for whoever may read
it (:func:`~meterline.accounts.http.reads_account`). :class:`Accounts` is
injected by name and its blocking store calls run in a worker thread. A
missing account or key (``AccountNotFound``, ``KeyNotFound``) is a 404, an
account that exists already a 409, a store that does not answer a 503: the
application's exception handlers answer them.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

from litestar import Controller, get, patch, post
from litestar.di import NamedDependency
from litestar.exceptions import (
    ClientException,
    NotFoundException,
    ServiceUnavailableException,
    ValidationException,
)
from litestar.params import FromPath, JSONBody, QueryParameter, SkipValidation
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_409_CONFLICT

from meterline.accounts.http import ACCESS_ERRORS, KEY_REQUIRED, admin_only, reads_account
from meterline.accounts.manage import Accounts
from meterline.accounts.model import (
    MAX_ACCOUNT_ID_LENGTH,
    AccountNotFound,
    KeyNotFound,
    account_id_problem,
)
from meterline.accounts.schemas import (
    AccountChange,
    AccountIn,
    AccountOut,
    AccountPage,
    IssuedKeyOut,
    KeyIn,
    KeyOut,
)
from meterline.accounts.store import AccountUpdate, page_of

__all__ = ["AccountController", "KeyController"]


class AccountConflict(ClientException):
    """Documents the 409 of ``AccountExists`` in the OpenAPI."""

    status_code = HTTP_409_CONFLICT


_ERRORS = [*ACCESS_ERRORS, ValidationException, NotFoundException, ServiceUnavailableException]

AccountsDependency = NamedDependency[SkipValidation[Accounts]]
AccountFilter = Annotated[
    str | None,
    QueryParameter(description="Only keys of this account.", max_length=MAX_ACCOUNT_ID_LENGTH),
]


class AccountController(Controller):
    """Accounts: create, read, list, change, suspend and reactivate."""

    path = "/v1/accounts"
    tags = ("accounts",)
    security = KEY_REQUIRED

    @post(
        "/",
        summary="Create an account",
        guards=[admin_only],
        status_code=HTTP_201_CREATED,
        raises=[*_ERRORS, AccountConflict],
    )
    async def create_account(
        self, accounts: AccountsDependency, data: JSONBody[AccountIn]
    ) -> AccountOut:
        account = await asyncio.to_thread(
            accounts.store.create_account,
            data.account_id,
            name=data.name,
            timezone=data.timezone,
            metadata=data.metadata,
        )
        return AccountOut.of(account)

    @get("/", summary="Accounts, a page at a time", guards=[admin_only], raises=_ERRORS)
    async def list_accounts(
        self,
        accounts: AccountsDependency,
        limit: Annotated[
            int, QueryParameter(description="Accounts per page.", ge=1, le=1000)
        ] = 100,
        after: Annotated[
            str | None,
            QueryParameter(
                description="The previous page's ``next``: accounts after this id.",
                max_length=MAX_ACCOUNT_ID_LENGTH,
            ),
        ] = None,
    ) -> AccountPage:
        """In id order, by keyset: no account that existed at the first page is skipped
        or shown twice, whatever is created meanwhile."""
        start = None if after is None else _query_account_id("after", after)
        read = await asyncio.to_thread(accounts.store.accounts, after=start, limit=limit + 1)
        page, following = page_of(read, limit)
        return AccountPage(accounts=[AccountOut.of(a) for a in page], next=following)

    @get("/{account_id:str}", summary="An account", guards=[reads_account], raises=_ERRORS)
    async def account(self, accounts: AccountsDependency, account_id: FromPath[str]) -> AccountOut:
        found = await asyncio.to_thread(accounts.store.account, _path_account_id(account_id))
        return AccountOut.of(found)

    @patch(
        "/{account_id:str}",
        summary="Change or suspend an account",
        guards=[admin_only],
        raises=_ERRORS,
    )
    async def change_account(
        self, accounts: AccountsDependency, account_id: FromPath[str], data: JSONBody[AccountChange]
    ) -> AccountOut:
        """Only the fields given change: ``"status": "suspended"`` suspends an account,
        ``"active"`` reactivates it."""
        change = AccountUpdate(
            name=data.name, status=data.status, timezone=data.timezone, metadata=data.metadata
        )
        changed = await asyncio.to_thread(
            accounts.store.update_account, _path_account_id(account_id), change
        )
        return AccountOut.of(changed)


class KeyController(Controller):
    """API keys: issue (the key is shown once), list, revoke."""

    path = "/v1/keys"
    tags = ("keys",)
    security = KEY_REQUIRED

    @post(
        "/",
        summary="Issue a key",
        guards=[admin_only],
        status_code=HTTP_201_CREATED,
        raises=_ERRORS,
    )
    async def issue_key(self, accounts: AccountsDependency, data: JSONBody[KeyIn]) -> IssuedKeyOut:
        """The answer holds the whole key, once: only its hash is stored.

        ``{"kind": "account", "account_id": "acme"}`` reads one account;
        ``{"kind": "service", "account_ids": ["acme"]}`` reports usage for
        those accounts (without ``account_ids``: every account).
        """
        try:
            issued = await asyncio.to_thread(
                accounts.issue_key,
                data.kind,
                name=data.name,
                account_id=data.account_id,
                account_ids=data.account_ids,
                expires_at=data.expires_at,
            )
        except AccountNotFound as exc:  # the body names it: the body is wrong, not the route
            raise ValidationException(
                f"account_id: {exc}",
                extra=[{"key": "account_id", "message": str(exc), "source": "body"}],
            ) from None
        return IssuedKeyOut.of(issued.key, datetime.now(UTC), key=issued.secret)

    @get("/", summary="Keys, without their secrets", guards=[admin_only], raises=_ERRORS)
    async def list_keys(
        self, accounts: AccountsDependency, account_id: AccountFilter = None
    ) -> list[KeyOut]:
        """Oldest first; ``account_id`` keeps the account keys of it and the service keys
        scoped to it."""
        scope = None if account_id is None else _query_account_id("account_id", account_id)
        keys = await asyncio.to_thread(accounts.store.api_keys, account_id=scope)
        now = datetime.now(UTC)
        return [KeyOut.of(k, now) for k in keys]

    @post(
        "/{key_id:str}/revoke",
        summary="Revoke a key",
        guards=[admin_only],
        status_code=HTTP_200_OK,
        raises=_ERRORS,
    )
    async def revoke_key(self, accounts: AccountsDependency, key_id: FromPath[str]) -> KeyOut:
        """At once on this replica, on the others within their key refresh; again is a no-op."""
        if not key_id.isprintable():  # names no key, and PostgreSQL refuses NUL
            raise KeyNotFound(f"no key {key_id[:64]!r}")
        revoked = await asyncio.to_thread(accounts.revoke_key, key_id)
        return KeyOut.of(revoked, datetime.now(UTC))


def _path_account_id(account_id: str) -> str:
    """An id no account can have is not found, rather than sent to the store."""
    if account_id_problem(account_id) is not None:
        raise AccountNotFound(f"no account {account_id[:MAX_ACCOUNT_ID_LENGTH]!r}")
    return account_id


def _query_account_id(name: str, value: str) -> str:
    problem = account_id_problem(value)
    if problem is not None:
        message = problem.replace("account_id", "an account id", 1)
        raise ValidationException(
            f"{name}: {message}", extra=[{"key": name, "message": message, "source": "query"}]
        )
    return value
