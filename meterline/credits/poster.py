"""Each stored batch debits the prepaid accounts' credits with what they were charged.

A flush handler of the pricing pipeline: the events of an account whose plan in force
at their time is prepaid (the same :class:`~meterline.quotas.charges.ChargeBook` the
pipeline charged with) become ONE debit per account and batch, never a row update per
request. The ledger remembers every event it debited, so a replayed batch (the
pipeline killed after the debit, before its commit) posts only what it has new: each
charge is debited exactly once. Events charged nothing are not debited. PostgreSQL
down raises: the pipeline retries the batch.

After posting, each account's credits as the ledger now says them go to
``credits_to`` (the quota settler, a later handler of the same batch), which writes
them to Redis with the settles that free the requests' holds, so that the gate of the
next requests sees the debit and no longer the hold at one instant. A replayed batch
sends them too: its first attempt may have posted and stopped before the settle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from meterline.credits.model import CreditState
from meterline.credits.postgres import PostgresLedger, UsageCharge
from meterline.quotas.charges import ChargeBook
from meterline.usage.model import PricedEvent

__all__ = ["LedgerPoster"]

log = logging.getLogger(__name__)


class LedgerPoster:
    """:class:`~meterline.usage.store.FlushHandler` that posts usage debits."""

    name = "credits"

    def __init__(
        self,
        ledger: PostgresLedger,
        plans: ChargeBook,
        *,
        credits_to: Callable[[Sequence[CreditState]], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.plans = plans
        self.credits_to = credits_to

    def on_flush(self, events: Sequence[PricedEvent]) -> None:
        charged = [e for e in events if e.charge_picos]
        if not charged:
            return
        self.plans.load({e.account_id for e in charged})
        by_account: dict[str, list[UsageCharge]] = {}
        for e in charged:
            plan = self.plans.plan_at(e.account_id, e.occurred_at)
            if plan is not None and plan.billing == "prepaid":
                charge = UsageCharge(e.event_id, e.occurred_at, e.charge_picos)
                by_account.setdefault(e.account_id, []).append(charge)
        for account_id, charges in by_account.items():
            entry = self.ledger.post_usage(account_id, charges)
            if entry is not None:
                log.debug("credits: %s debited %d events", account_id, entry.events or 0)
        if self.credits_to is not None and by_account:
            self.credits_to([self.ledger.credit(account_id) for account_id in by_account])
