"""The check every exactly-once test ends with: raw events = rollup = API."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

from meterline.lib.warehouse import Warehouse
from meterline.usage.report import usage_report


def consistent_totals(
    warehouse: Warehouse, accounts: Sequence[str]
) -> dict[str, tuple[int, str, str]]:
    """Per account (requests, cost, charge) as raw events, rollup and API each tell it;
    all must agree.

    Raw: the deduplicated events. Rollup: the minute rollup summed. API: the
    usage report over a minute-aligned range (whole minutes from the rollup)
    and over one that is not (the edges from raw events).
    """
    sums = "toString(sum(cost_usd)) AS cost, toString(sum(charge_usd)) AS charge"
    raw = {
        r["account_id"]: (int(r["n"]), r["cost"], r["charge"])
        for r in warehouse.query(
            f"SELECT account_id, count() AS n, {sums} "
            "FROM usage_events FINAL WHERE account_id IN {a:Array(String)} GROUP BY account_id",
            {"a": list(accounts)},
        )
    }
    rollup = {
        r["account_id"]: (int(r["n"]), r["cost"], r["charge"])
        for r in warehouse.query(
            f"SELECT account_id, sum(requests) AS n, {sums} "
            "FROM usage_minutely FINAL WHERE account_id IN {a:Array(String)} GROUP BY account_id",
            {"a": list(accounts)},
        )
    }
    aligned = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))
    ragged = (datetime(2000, 1, 1, 0, 0, 0, 1000, tzinfo=UTC), aligned[1])
    nothing = (0, "0", "0")
    for account in accounts:
        answers = [raw.get(account, nothing), rollup.get(account, nothing)]
        for start, end in (aligned, ragged):
            totals = usage_report(warehouse, account, start, end).totals
            answers.append((totals.requests, str(totals.cost_usd), str(totals.charge_usd)))
        normalized = {
            (n, str(Decimal(cost).normalize()), str(Decimal(charge).normalize()))
            for n, cost, charge in answers
        }
        assert len(normalized) == 1, f"{account}: raw, rollup, API aligned, API ragged: {answers}"
    return {
        a: (n, str(Decimal(cost).normalize()), str(Decimal(charge).normalize()))
        for a, (n, cost, charge) in ((a, raw.get(a, nothing)) for a in accounts)
    }


if __name__ == "__main__":  # `python -m support.consistency <chdb dir> <account>...`: as JSON
    import json
    import sys

    from meterline.lib.warehouse.chdb import ChdbWarehouse

    opened = ChdbWarehouse(sys.argv[1])
    print(json.dumps(consistent_totals(opened, sys.argv[2:])))
