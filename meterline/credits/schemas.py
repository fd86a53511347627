"""The credits slice's HTTP edge: grants, adjustments and voids as admins post them, the
balance and the ledger as clients read them. Money is a decimal string both ways."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator

from meterline.catalog.schemas import Instant
from meterline.credits.model import MAX_GRANT_PICOS, Balance, Entry, Grant, GrantKind
from meterline.money import PICOS_PER_USD, format_usd, to_decimal, usd_to_picos

__all__ = ["AdjustmentIn", "BalanceOut", "EntryOut", "GrantIn", "GrantOut", "VoidIn", "picos_of"]

IdempotencyKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        pattern=r"^[\x21-\x7e]+$",
        description="Chosen by the caller (an order id, a payment id): the same key again "
        "returns what it posted, never posts twice.",
    ),
]
_MAX_USD = MAX_GRANT_PICOS // PICOS_PER_USD


def picos_of(value: object, *, what: str, signed: bool) -> int:
    """A decimal-string USD amount of a body as pico-dollars, within the ledger's bounds."""
    if isinstance(value, float):
        raise ValueError(f'{what} is a decimal string such as "25.00", not a float')
    if not isinstance(value, str | int):
        raise ValueError(f'{what} is a decimal string such as "25.00"')
    text = str(value).strip()
    negative = signed and text.startswith("-")
    picos = usd_to_picos(to_decimal(text[1:] if negative else text, what=what), what=what)
    picos = -picos if negative else picos
    if picos == 0 or (picos < 0 and not signed) or abs(picos) > MAX_GRANT_PICOS:
        bound = (
            f"between -{_MAX_USD:,} and {_MAX_USD:,}, not 0"
            if signed
            else (f"above 0 and at most {_MAX_USD:,}")
        )
        raise ValueError(f"{what} is {bound}")
    return picos


class GrantIn(BaseModel):
    """POST /v1/accounts/{account_id}/grants: credits bought or given."""

    model_config = ConfigDict(extra="forbid")

    amount_usd: int = Field(
        json_schema_extra={"type": "string", "example": "25.00"},
        description="Decimal USD, up to 12 places.",
    )
    kind: GrantKind = GrantKind.PURCHASED
    priority: Annotated[int, Field(ge=0, le=1000)] = Field(
        10,
        description="Lower is spent first (then promotional before purchased, then the "
        "earliest expiry, then the oldest).",
    )
    effective_at: Instant | None = Field(None, description="Default: now.")
    expires_at: Instant | None = Field(None, description="Default: never.")
    idempotency_key: IdempotencyKey

    @field_validator("amount_usd", mode="before")
    @classmethod
    def _amount(cls, value: object) -> int:
        return picos_of(value, what="amount_usd", signed=False)


class AdjustmentIn(BaseModel):
    """POST /v1/accounts/{account_id}/adjustments: a correction, credit or debit."""

    model_config = ConfigDict(extra="forbid")

    amount_usd: int = Field(
        json_schema_extra={"type": "string", "example": "-1.50"},
        description="Decimal USD: positive credits the account, negative debits it.",
    )
    reason: Annotated[str, Field(min_length=1, max_length=1024)]
    idempotency_key: IdempotencyKey

    @field_validator("amount_usd", mode="before")
    @classmethod
    def _amount(cls, value: object) -> int:
        return picos_of(value, what="amount_usd", signed=True)


class VoidIn(BaseModel):
    """POST /v1/accounts/{account_id}/grants/{grant_id}/void: release what is left."""

    model_config = ConfigDict(extra="forbid")

    idempotency_key: IdempotencyKey
    reason: Annotated[str, Field(max_length=1024)] = ""


def _time(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


class GrantOut(BaseModel):
    grant_id: str
    kind: str
    amount_usd: str
    remaining_usd: str
    priority: int
    effective_at: str
    expires_at: str | None
    closed_at: str | None

    @classmethod
    def of(cls, grant: Grant) -> Self:
        return cls(
            grant_id=grant.grant_id,
            kind=grant.kind.value,
            amount_usd=format_usd(grant.amount_picos),
            remaining_usd=format_usd(grant.remaining_picos),
            priority=grant.priority,
            effective_at=grant.effective_at.isoformat(),
            expires_at=_time(grant.expires_at),
            closed_at=_time(grant.closed_at),
        )


class BalanceOut(BaseModel):
    """GET /v1/accounts/{account_id}/balance."""

    account_id: str
    balance_usd: str = Field(description="The sum of the ledger's entries.")
    available_usd: str = Field(
        description="What the account may spend now: its usable grants, less what it owes."
    )
    reserved_usd: str | None = Field(
        description="What requests in flight hold of it (their estimated charges), until "
        "their usage is debited; null when it cannot be read (Redis does not answer)."
    )
    owed_usd: str = Field(
        description="What usage drew beyond the grants; the next grant pays it first."
    )
    grants: list[GrantOut] = Field(description="Open grants, in the order they are spent.")

    @classmethod
    def of(cls, balance: Balance, *, reserved_picos: int | None = 0) -> Self:
        return cls(
            account_id=balance.account_id,
            balance_usd=format_usd(balance.balance_picos),
            available_usd=format_usd(balance.available_picos),
            reserved_usd=None if reserved_picos is None else format_usd(reserved_picos),
            owed_usd=format_usd(balance.owed_picos),
            grants=[GrantOut.of(g) for g in balance.grants],
        )


class EntryOut(BaseModel):
    entry_id: int
    kind: str
    amount_usd: str
    effective_at: str
    idempotency_key: str
    grant_id: str | None
    reason: str
    created_by: str
    created_at: str
    events: int | None = Field(None, description="Debits: how many priced events.")
    usage_from: str | None = None
    usage_to: str | None = None

    @classmethod
    def of(cls, entry: Entry) -> Self:
        return cls(
            entry_id=entry.entry_id,
            kind=entry.kind.value,
            amount_usd=format_usd(entry.amount_picos),
            effective_at=entry.effective_at.isoformat(),
            idempotency_key=entry.idempotency_key,
            grant_id=entry.grant_id,
            reason=entry.reason,
            created_by=entry.created_by,
            created_at=entry.created_at.isoformat(),
            events=entry.events,
            usage_from=_time(entry.usage_from),
            usage_to=_time(entry.usage_to),
        )
