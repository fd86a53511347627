"""Does the ledger agree with the warehouse? For an account and a period: the usage the
ledger debited against the ``charge_usd`` of the account's priced events stored under
a prepaid plan, to the last digit; and, when they differ, which events."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from meterline.credits.postgres import PostgresLedger
from meterline.lib.warehouse import Warehouse
from meterline.money import usd_to_picos
from meterline.quotas.store import PlanStore

__all__ = ["LedgerCheck", "check_ledger"]

#: Events named in a report of differences, at most (of each kind).
LISTED = 100

_PREPAID_EVENTS = """
SELECT event_id, toString(charge_usd) AS charge FROM usage_events FINAL
WHERE account_id = {account:String}
  AND occurred_at >= {start:DateTime64(3, 'UTC')} AND occurred_at < {end:DateTime64(3, 'UTC')}
  AND charge_usd > 0
  AND (plan_id, plan_version) IN (
      SELECT p.1, p.2 FROM (SELECT arrayJoin(arrayZip({plans:Array(String)},
                                                      {versions:Array(UInt32)})) AS p))
"""


@dataclass(frozen=True)
class LedgerCheck:
    account_id: str
    start: datetime
    end: datetime
    ledger_events: int
    ledger_picos: int
    warehouse_events: int
    warehouse_picos: int
    #: priced under a prepaid plan, not debited
    missing: list[str] = field(default_factory=list)
    #: debited, not in the warehouse (or not prepaid there)
    extra: list[str] = field(default_factory=list)
    #: debited at another charge than the warehouse's (re-priced since)
    differing: list[str] = field(default_factory=list)

    @property
    def agrees(self) -> bool:
        return (self.ledger_events, self.ledger_picos) == (
            self.warehouse_events,
            self.warehouse_picos,
        ) and not (self.missing or self.extra or self.differing)


def check_ledger(
    ledger: PostgresLedger,
    warehouse: Warehouse,
    plans: PlanStore,
    account_id: str,
    start: datetime,
    end: datetime,
) -> LedgerCheck:
    """Blocking: one read of each store."""
    history = plans.histories([account_id]).get(account_id, ())
    prepaid = sorted({(p.plan_id, p.version) for _, p in history if p.billing == "prepaid"})
    stored: dict[str, int] = {}
    if prepaid:
        rows = warehouse.query(
            _PREPAID_EVENTS,
            {
                "account": account_id,
                "start": start,
                "end": end,
                "plans": [p for p, _ in prepaid],
                "versions": [v for _, v in prepaid],
            },
        )
        stored = {row["event_id"]: usd_to_picos(Decimal(row["charge"])) for row in rows}
    debited = ledger.debited(account_id, start, end)
    return LedgerCheck(
        account_id,
        start,
        end,
        ledger_events=len(debited),
        ledger_picos=sum(debited.values()),
        warehouse_events=len(stored),
        warehouse_picos=sum(stored.values()),
        missing=sorted(stored.keys() - debited.keys())[:LISTED],
        extra=sorted(debited.keys() - stored.keys())[:LISTED],
        differing=sorted(e for e in stored.keys() & debited.keys() if stored[e] != debited[e])[
            :LISTED
        ],
    )
