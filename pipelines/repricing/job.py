"""Price events that were stored unpriced, once their model has a price.

Rows are never updated in place. For each event priced now, one insert
writes a reversal of the unpriced row (``sign = -1``) and the priced row
(``sign = +1``), so every sum stays right at every moment and the history of
what changed, and when (``inserted_at``), stays in ``usage_events``. Each run
is recorded in ``repricing_runs``. Run one job at a time.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from meterline.catalog import PriceBook
from meterline.lib.warehouse import USAGE_EVENT_COLUMNS, Warehouse
from meterline.lib.warehouse.schema import TOKEN_COLUMNS
from meterline.money import format_usd, picos_to_usd
from meterline.tokens import TokenUsage

_UNPRICED_EVENTS = f"""
SELECT {
    ", ".join(
        c if c != "cost_usd" else "toString(cost_usd) AS cost_usd" for c in USAGE_EVENT_COLUMNS
    )
}
FROM usage_events
WHERE priced = 0 AND sign = 1 {{account_filter}}
  AND occurred_at >= {{start:DateTime64(3, 'UTC')}} AND occurred_at < {{end:DateTime64(3, 'UTC')}}
  AND (account_id, event_id) IN (
      SELECT account_id, event_id FROM usage_events
      WHERE occurred_at >= {{start:DateTime64(3, 'UTC')}} {{account_filter}}
        AND occurred_at < {{end:DateTime64(3, 'UTC')}}
      GROUP BY account_id, event_id
      HAVING sum(sign) = 1 AND sum(sign * priced) = 0
  )
"""


@dataclass(frozen=True)
class RepricingResult:
    run_id: str
    examined: int
    repriced: int
    cost_added_usd: str


def _parse_time(value: object) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)


def reprice_unpriced(
    warehouse: Warehouse,
    start: datetime,
    end: datetime,
    accounts: Sequence[str] = (),
) -> RepricingResult:
    """Price the unpriced events of [start, end) that the catalog can price now.

    ``accounts`` limits the run to those accounts; empty means all of them.
    """
    catalog = PriceBook(warehouse).load()
    account_filter = "AND account_id IN {accounts:Array(String)}" if accounts else ""
    rows = warehouse.query(
        _UNPRICED_EVENTS.replace("{account_filter}", account_filter),
        {"start": start, "end": end, "accounts": list(accounts)},
    )
    column = {name: i for i, name in enumerate(USAGE_EVENT_COLUMNS)}
    out: list[tuple[object, ...]] = []
    total = 0
    for row in rows:
        occurred_at = _parse_time(row["occurred_at"])
        price = catalog.price_for(row["model"], row["provider"], occurred_at)
        if price is None:
            continue
        usage = TokenUsage(**{c: int(row[c]) for c in TOKEN_COLUMNS})
        cost = price.cost(usage)
        total += cost.picos
        original = [row[c] for c in USAGE_EVENT_COLUMNS]
        original[column["occurred_at"]] = occurred_at
        original[column["received_at"]] = _parse_time(row["received_at"])
        original[column["cost_usd"]] = Decimal(row["cost_usd"])
        reversal = list(original)
        reversal[column["sign"]] = -1
        priced = list(original)
        priced[column["priced"]] = 1
        priced[column["price_id"]] = cost.price_id
        priced[column["price_tier"]] = cost.tier
        priced[column["cost_usd"]] = picos_to_usd(cost.picos)
        out += [tuple(reversal), tuple(priced)]
    run_id = "rp_" + uuid.uuid4().hex[:12]
    warehouse.insert("usage_events", USAGE_EVENT_COLUMNS, out)  # type: ignore[arg-type]
    result = RepricingResult(run_id, len(rows), len(out) // 2, format_usd(total))
    warehouse.insert(
        "repricing_runs",
        ("run_id", "ran_at", "range_start", "range_end", "examined", "repriced", "cost_added_usd"),
        [
            (
                run_id,
                datetime.now(UTC),
                start,
                end,
                result.examined,
                result.repriced,
                picos_to_usd(total),
            )
        ],
    )
    return result
