"""Prepaid credits: grants, ledger entries, and the burn order that says which grant a
debit draws from. Pure: the store (:mod:`.postgres`) keeps them, under each account's
lock, in PostgreSQL.

Money here is integer pico-dollars (``meterline.money``), stored as ``NUMERIC``: the
ledger is exact to the last digit and agrees with the warehouse's ``charge_usd``.

**Burn order** (:func:`burn_key`): the lowest priority number first; at equal priority
promotional credits before purchased ones; then the earliest expiry (never-expiring
last); then the oldest. A debit draws from the usable grants in that order; what no
grant covers is *owed*, and drawn from the next grant that comes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from meterline.money import PICOS_PER_USD

__all__ = [
    "MAX_GRANT_PICOS",
    "Balance",
    "CreditState",
    "Draw",
    "Entry",
    "EntryKind",
    "Grant",
    "GrantKind",
    "available",
    "burn_key",
    "credit_state",
    "draw",
]

#: The largest grant or adjustment: far above any account, and sums of a lifetime of
#: them stay well inside NUMERIC(38, 12).
MAX_GRANT_PICOS = 10**9 * PICOS_PER_USD


class GrantKind(StrEnum):
    PURCHASED = "purchased"
    PROMOTIONAL = "promotional"


class EntryKind(StrEnum):
    GRANT = "grant"
    DEBIT = "debit"
    ADJUSTMENT = "adjustment"
    VOID = "void"
    EXPIRY = "expiry"


@dataclass(frozen=True, slots=True)
class Grant:
    """Credits given to an account: their terms, and what is left of them."""

    grant_id: str
    account_id: str
    kind: GrantKind
    amount_picos: int
    remaining_picos: int
    priority: int
    effective_at: datetime
    expires_at: datetime | None
    #: when its remainder was released (voided or expired); None while open
    closed_at: datetime | None
    created_at: datetime
    created_by: str

    def usable_at(self, at: datetime) -> bool:
        """Whether a debit at ``at`` may draw from it."""
        return (
            self.closed_at is None
            and self.remaining_picos > 0
            and self.effective_at <= at
            and (self.expires_at is None or at < self.expires_at)
        )


@dataclass(frozen=True, slots=True)
class Entry:
    """One ledger entry; never changed. ``amount_picos`` is signed: + credits, - debits."""

    entry_id: int
    account_id: str
    kind: EntryKind
    amount_picos: int
    effective_at: datetime
    idempotency_key: str
    grant_id: str | None
    reason: str
    created_by: str
    created_at: datetime
    #: debits: how many events, and when the first and last occurred
    events: int | None = None
    usage_from: datetime | None = None
    usage_to: datetime | None = None


@dataclass(frozen=True, slots=True)
class Draw:
    """A part of a debit taken from one grant."""

    grant_id: str
    picos: int


@dataclass(frozen=True, slots=True)
class Balance:
    """An account's credits at an instant."""

    account_id: str
    #: the sum of its ledger entries
    balance_picos: int
    #: what its usable grants hold, less what it owes
    available_picos: int
    #: what its debits drew beyond its grants
    owed_picos: int
    #: its grants with something left, not closed, in burn order
    grants: list[Grant]


@dataclass(frozen=True, slots=True)
class CreditState:
    """What a prepaid account may spend, as the gate of its requests keeps it (Redis).

    ``version`` grows with every posting, so of two copies written in any order the
    newer one stays; ``changes_at`` is when the amount changes with no posting (a
    grant expires or takes effect), after which the copy is read again.
    """

    account_id: str
    #: what its usable grants hold less what it owes, never below zero
    spendable_picos: int
    version: int
    changes_at: datetime | None


def credit_state(
    account_id: str, grants: Sequence[Grant], owed_picos: int, version: int, at: datetime
) -> CreditState:
    """The account's :class:`CreditState` at ``at``, from its open grants."""
    moments = [
        moment
        for g in grants
        if g.closed_at is None and g.remaining_picos > 0
        for moment in (g.effective_at, g.expires_at)
        if moment is not None and moment > at
    ]
    return CreditState(
        account_id,
        max(available(grants, owed_picos, at), 0),
        version,
        min(moments, default=None),
    )


def burn_key(grant: Grant) -> tuple[int, int, float, datetime, str]:
    """Sort key of the burn order (see the module's docstring)."""
    expiry = grant.expires_at.timestamp() if grant.expires_at is not None else float("inf")
    promotional_first = 0 if grant.kind is GrantKind.PROMOTIONAL else 1
    return (grant.priority, promotional_first, expiry, grant.effective_at, grant.grant_id)


def draw(grants: Iterable[Grant], picos: int, at: datetime) -> tuple[list[Draw], int]:
    """``picos`` drawn from the grants usable at ``at``, in burn order: the draws, and what
    none of them covered."""
    if picos < 0:
        raise ValueError("a draw is of a non-negative amount")
    draws: list[Draw] = []
    left = picos
    for grant in sorted((g for g in grants if g.usable_at(at)), key=burn_key):
        if left == 0:
            break
        taken = min(left, grant.remaining_picos)
        draws.append(Draw(grant.grant_id, taken))
        left -= taken
    return draws, left


def available(grants: Sequence[Grant], owed_picos: int, at: datetime) -> int:
    """What the account may still spend at ``at``: its usable grants, less what it owes."""
    return sum(g.remaining_picos for g in grants if g.usable_at(at)) - owed_picos
