"""Which plan prices an account's usage at an instant, without a round trip an event.

The pricing pipeline asks :class:`ChargeBook` for the plan of every event it
prices. The book keeps each account's assignments (with their plan versions)
in memory, loaded in one query for all the accounts of a batch that it does
not hold or holds for longer than ``refresh_s``, and picks the one in force
with :func:`~meterline.quotas.store.in_force`, the store's own rule. An
assignment made elsewhere so takes effect here within ``refresh_s``.

Blocking (PostgreSQL): the pipeline calls it from its worker thread. When
PostgreSQL does not answer the book raises and charges nothing: the batch is
retried, never billed without its plan.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from datetime import datetime

from meterline.quotas.plans import PlanVersion
from meterline.quotas.store import PlanHistory, PlanStore, in_force

__all__ = ["PLANS_REFRESH_S", "ChargeBook"]

#: How long an account's assignments are used before they are asked for again.
PLANS_REFRESH_S = 5.0


class ChargeBook:
    """The plan version in force per (account, instant), from a cached :class:`PlanStore`."""

    def __init__(
        self,
        plans: PlanStore,
        *,
        refresh_s: float = PLANS_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plans = plans
        self.refresh_s = refresh_s
        self._clock = clock
        #: account -> (when loaded, its history)
        self._held: dict[str, tuple[float, PlanHistory]] = {}
        self._lock = threading.Lock()

    def load(self, account_ids: Collection[str]) -> None:
        """Ask the store, in one query, for the accounts not held or held too long.

        Raises the store's error (``PostgresError``) when it does not answer.
        """
        now = self._clock()
        with self._lock:
            stale = [
                a
                for a in set(account_ids)
                if (held := self._held.get(a)) is None or now - held[0] >= self.refresh_s
            ]
        if not stale:
            return
        found = self.plans.histories(stale)
        with self._lock:
            for account_id in stale:
                self._held[account_id] = (now, found.get(account_id, ()))

    def plan_at(self, account_id: str, occurred_at: datetime) -> PlanVersion | None:
        """The plan version pricing the account's usage at ``occurred_at``; None: no plan."""
        held = self._held.get(account_id)
        if held is None or self._clock() - held[0] >= self.refresh_s:
            self.load((account_id,))
            held = self._held[account_id]
        found = in_force(held[1], occurred_at)
        return None if found is None else found[1]
