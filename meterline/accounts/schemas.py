"""The accounts slice's HTTP edge: accounts and keys as clients send and read them.

Bodies are checked here for shape and bounds, each problem named by its
field; an account id follows :func:`~meterline.accounts.model.account_id_problem`,
the rule usage events follow too, and a timezone must be one the tz
database knows. A key is listed without its secret or hash: the whole key
appears once, in the answer that issued it (:class:`IssuedKeyOut`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from meterline.accounts.model import (
    MAX_ACCOUNT_ID_LENGTH,
    MAX_ACCOUNT_NAME_LENGTH,
    Account,
    AccountStatus,
    ApiKey,
    KeyKind,
    account_id_problem,
    check_timezone,
)
from meterline.catalog.schemas import Instant

__all__ = [
    "MAX_METADATA_BYTES",
    "MAX_METADATA_DEPTH",
    "AccountChange",
    "AccountIn",
    "AccountOut",
    "AccountPage",
    "IssuedKeyOut",
    "KeyIn",
    "KeyOut",
]

#: An account's metadata, as compact JSON: labels for the operator, not a document store.
MAX_METADATA_BYTES = 16 * 1024
MAX_METADATA_DEPTH = 32
#: Accounts one service key may be scoped to.
MAX_KEY_ACCOUNTS = 1000
#: Longest IANA timezone name taken (the longest real one has 32 characters).
_MAX_TIMEZONE_LENGTH = 64

_DateTime = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


def _account_id(value: str) -> str:
    problem = account_id_problem(value)
    if problem is not None:
        raise PydanticCustomError("account_id", problem)
    return value


def _printable(value: str) -> str:
    if not value.isprintable():
        raise PydanticCustomError("printable", "Input should not contain control characters")
    return value


def _timezone(value: str) -> str:
    try:
        return check_timezone(value)
    except ValueError as exc:
        raise PydanticCustomError("timezone", str(exc)) from None


def _metadata(value: dict[str, Any]) -> dict[str, Any]:
    # depth first, iteratively: the size is measured by an encoder that recurses
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list) and depth > MAX_METADATA_DEPTH:
            raise PydanticCustomError(
                "metadata_depth", f"Input should nest at most {MAX_METADATA_DEPTH} levels"
            )
        if isinstance(item, dict):
            pending += [(k, depth) for k in item] + [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list):
            pending += [(v, depth + 1) for v in item]
        elif isinstance(item, str) and "\x00" in item:  # PostgreSQL's jsonb cannot hold it
            raise PydanticCustomError("metadata_nul", "Input should not contain NUL characters")
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise PydanticCustomError(
            "metadata_size", f"Input should be at most {MAX_METADATA_BYTES} bytes of JSON"
        )
    return value


#: An account's id, as usage events name it.
AccountId = Annotated[
    str, Field(min_length=1, max_length=MAX_ACCOUNT_ID_LENGTH), AfterValidator(_account_id)
]
#: A display name of an account or a key; may be empty.
DisplayName = Annotated[str, Field(max_length=MAX_ACCOUNT_NAME_LENGTH), AfterValidator(_printable)]
Timezone = Annotated[
    str,
    Field(min_length=1, max_length=_MAX_TIMEZONE_LENGTH, examples=["Europe/Berlin"]),
    AfterValidator(_timezone),
]
Metadata = Annotated[
    dict[str, Any],
    Field(
        description=f"A JSON object, at most {MAX_METADATA_BYTES} bytes "
        f"and {MAX_METADATA_DEPTH} levels deep."
    ),
    AfterValidator(_metadata),
]


class _Body(BaseModel):
    """A request body: unknown fields are refused (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid")


class AccountIn(_Body):
    """A new account: POST /v1/accounts."""

    account_id: AccountId
    name: DisplayName = ""
    timezone: Timezone = Field("UTC", description="IANA name; its days and months bill.")
    metadata: Metadata = Field(default_factory=dict)


class AccountChange(_Body):
    """PATCH /v1/accounts/{account_id}: what is given changes, the rest stays.

    ``status`` suspends (``"suspended"``) or reactivates (``"active"``);
    ``metadata`` replaces the whole object.
    """

    name: DisplayName | None = None
    status: AccountStatus | None = None
    timezone: Timezone | None = None
    metadata: Metadata | None = None


class AccountOut(BaseModel):
    account_id: str
    name: str
    status: AccountStatus
    timezone: str
    currency: str
    metadata: dict[str, Any]
    registered_by: str = Field(description='"api", "cli", or "first_event" (by its usage).')
    created_at: _DateTime
    updated_at: _DateTime

    @classmethod
    def of(cls, account: Account) -> Self:
        return cls(
            account_id=account.account_id,
            name=account.name,
            status=account.status,
            timezone=account.timezone,
            currency=account.currency,
            metadata=dict(account.metadata),
            registered_by=account.registered_by,
            created_at=account.created_at.isoformat(),
            updated_at=account.updated_at.isoformat(),
        )


class AccountPage(BaseModel):
    """Accounts in id order; ``next`` is the ``after`` of the following page, null at the end."""

    accounts: list[AccountOut]
    next: str | None


class KeyIn(_Body):
    """A new key: POST /v1/keys.

    An ``account`` key names its ``account_id``; a ``service`` key may list
    ``account_ids`` (absent: every account); an ``admin`` key has neither.
    """

    kind: KeyKind
    name: DisplayName = ""
    account_id: AccountId | None = None
    account_ids: Annotated[list[AccountId], Field(max_length=MAX_KEY_ACCOUNTS)] | None = None
    expires_at: Instant | None = None


class KeyOut(BaseModel):
    """A key as listed: never its secret nor its hash."""

    key_id: str
    kind: KeyKind
    name: str
    account_id: str | None
    account_ids: list[str] | None = Field(description="Service keys: null is every account.")
    state: str = Field(description='"active", "revoked" or "expired".')
    created_at: _DateTime
    expires_at: _DateTime | None
    revoked_at: _DateTime | None
    last_used_at: _DateTime | None = Field(
        description="Written every little while by each replica, not at every request."
    )

    @classmethod
    def of(cls, api_key: ApiKey, now: datetime, **extra: Any) -> Self:
        scope = api_key.account_ids
        fields: Mapping[str, Any] = {
            "key_id": api_key.key_id,
            "kind": api_key.kind,
            "name": api_key.name,
            "account_id": api_key.account_id,
            "account_ids": None if scope is None else sorted(scope),
            "state": api_key.state(now),
            "created_at": api_key.created_at.isoformat(),
            "expires_at": _iso(api_key.expires_at),
            "revoked_at": _iso(api_key.revoked_at),
            "last_used_at": _iso(api_key.last_used_at),
        }
        return cls.model_validate({**fields, **extra})


class IssuedKeyOut(KeyOut):
    """The key just issued, with the whole key: shown this once, only its hash is kept."""

    key: str = Field(description="Send as Authorization: Bearer <key>. Not shown again.")


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
