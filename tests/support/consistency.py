"""The check every exactly-once test ends with: raw events = rollup = API."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

from meterline.lib.warehouse import Warehouse
from meterline.usage.report import usage_report


def consistent_totals(warehouse: Warehouse, accounts: Sequence[str]) -> dict[str, tuple[int, str]]:
    """Per account (requests, cost) as raw events, rollup and API each tell it; all must agree.

    Raw: the deduplicated events. Rollup: the minute rollup summed. API: the
    usage report over a minute-aligned range (whole minutes from the rollup)
    and over one that is not (the edges from raw events).
    """
    raw = {
        r["account_id"]: (int(r["n"]), r["cost"])
        for r in warehouse.query(
            "SELECT account_id, count() AS n, toString(sum(cost_usd)) AS cost "
            "FROM usage_events FINAL WHERE account_id IN {a:Array(String)} GROUP BY account_id",
            {"a": list(accounts)},
        )
    }
    rollup = {
        r["account_id"]: (int(r["n"]), r["cost"])
        for r in warehouse.query(
            "SELECT account_id, sum(requests) AS n, toString(sum(cost_usd)) AS cost "
            "FROM usage_minutely FINAL WHERE account_id IN {a:Array(String)} GROUP BY account_id",
            {"a": list(accounts)},
        )
    }
    aligned = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))
    ragged = (datetime(2000, 1, 1, 0, 0, 0, 1000, tzinfo=UTC), aligned[1])
    for account in accounts:
        answers = [raw.get(account, (0, "0")), rollup.get(account, (0, "0"))]
        for start, end in (aligned, ragged):
            totals = usage_report(warehouse, account, start, end).totals
            answers.append((totals.requests, str(totals.cost_usd.normalize())))
        normalized = {(n, str(Decimal(cost).normalize())) for n, cost in answers}
        assert len(normalized) == 1, f"{account}: raw, rollup, API aligned, API ragged: {answers}"
    return {a: raw.get(a, (0, "0")) for a in accounts}


if __name__ == "__main__":  # `python -m support.consistency <chdb dir> <account>...`: as JSON
    import json
    import sys

    from meterline.lib.warehouse.chdb import ChdbWarehouse

    opened = ChdbWarehouse(sys.argv[1])
    print(json.dumps(consistent_totals(opened, sys.argv[2:])))
