"""The plans slice's port: plan versions and who is on which, in the domain's verbs.

:class:`~meterline.quotas.postgres.PostgresPlanStore` is the adapter.
Blocking: async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from meterline.quotas.plans import PlanTerms, PlanVersion

__all__ = ["Assignment", "PlanHistory", "PlanNotFound", "PlanStore", "in_force"]


class PlanNotFound(LookupError):
    """No such plan, or no such version of it (404)."""


@dataclass(frozen=True, slots=True)
class Assignment:
    """An account on a plan version from ``effective_from`` until its next assignment."""

    account_id: str
    plan_id: str
    version: int
    effective_from: datetime
    assigned_at: datetime
    #: "cli", or "api:<key id>": who put the account on the plan
    assigned_by: str


#: An account's assignments, each with its plan version, oldest ``effective_from`` first.
PlanHistory = Sequence[tuple[Assignment, PlanVersion]]


def in_force(history: PlanHistory, at: datetime) -> tuple[Assignment, PlanVersion] | None:
    """The assignment in force at ``at``: the latest one from ``at`` or before; None
    before the first. The one definition: the store and every cache of it pick so."""
    index = bisect.bisect_right(history, at, key=lambda entry: entry[0].effective_from)
    return history[index - 1] if index else None


class PlanStore(Protocol):
    def add_version(self, plan: PlanTerms) -> PlanVersion:
        """Store ``plan`` as the next version of its ``plan_id`` (1 for a new plan).

        Numbers are taken atomically: adds made at once get distinct, gapless
        numbers. A :class:`PlanVersion`'s own ``version`` and ``created_at``
        are not kept; the answer has those the store gave.
        """
        ...

    def version(self, plan_id: str, version: int) -> PlanVersion:
        """Raises PlanNotFound."""
        ...

    def versions(self, plan_id: str) -> list[PlanVersion]:
        """Every version of the plan, oldest first. Raises PlanNotFound: a plan with
        no version does not exist."""
        ...

    def plans(self) -> list[PlanVersion]:
        """The latest version of each plan, in plan_id order."""
        ...

    def assign(
        self,
        account_id: str,
        plan_id: str,
        version: int | None,
        effective_from: datetime,
        assigned_by: str,
    ) -> Assignment:
        """Put the account on the plan's ``version`` (None: its latest) from
        ``effective_from`` on.

        Assigning again at the same instant replaces that assignment, so a
        retried call changes nothing and a scheduled change can be corrected.
        Raises AccountNotFound or PlanNotFound.
        """
        ...

    def plan_of(self, account_id: str, at: datetime) -> tuple[Assignment, PlanVersion] | None:
        """The assignment in force at ``at`` and its plan version; None before the
        account's first assignment (or for an account that does not exist)."""
        ...

    def histories(self, account_ids: Collection[str]) -> dict[str, PlanHistory]:
        """Each account's assignments with their plan versions, in one round trip;
        an account never assigned has an empty history."""
        ...

    def assignments(self, account_id: str) -> list[Assignment]:
        """The account's assignments, past and scheduled, oldest ``effective_from`` first."""
        ...
