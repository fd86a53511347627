"""Price events that were stored unpriced, once their model has a price.

An explicit, audited job: it prices each event with the same
:func:`~meterline.usage.model.price_event` the pipeline uses and stores it
through the same :meth:`UsageStore.insert_priced`, which replaces the stored
event by identity (the newer ``priced_at`` wins) and recounts its rollup
minutes. It charges them through the pipeline's plan book too (the plan in
force at each event's time). Each run is recorded in ``repricing_runs``. Running it twice, or
beside the pipeline, prices nothing twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from meterline.catalog import PriceBook
from meterline.lib.warehouse import Warehouse
from meterline.money import format_usd, picos_to_usd
from meterline.usage.clickhouse import ClickHouseUsageStore
from meterline.usage.model import PlanBook, price_event


@dataclass(frozen=True)
class RepricingResult:
    run_id: str
    examined: int
    repriced: int
    cost_added_usd: str
    charge_added_usd: str


def reprice_unpriced(
    warehouse: Warehouse,
    start: datetime,
    end: datetime,
    accounts: Sequence[str] = (),
    *,
    plans: PlanBook | None = None,
) -> RepricingResult:
    """Price the unpriced events of [start, end) that the catalog can price now.

    ``accounts`` limits the run to those accounts; empty means all of them.
    ``plans`` charges them as the pipeline does (None: charge = cost).
    """
    catalog = PriceBook(warehouse).load()
    store = ClickHouseUsageStore(warehouse)
    unpriced = store.unpriced(start, end, accounts)
    if plans is not None and unpriced:
        plans.load({e.account_id for e in unpriced})
    repriced = [e for e in (price_event(e, catalog, plans) for e in unpriced) if e.priced]
    store.insert_priced(repriced)
    total = sum(e.cost_picos for e in repriced)
    result = RepricingResult(
        "rp_" + uuid.uuid4().hex[:12],
        len(unpriced),
        len(repriced),
        format_usd(total),
        format_usd(sum(e.charge_picos for e in repriced)),
    )
    warehouse.insert(
        "repricing_runs",
        ("run_id", "ran_at", "range_start", "range_end", "examined", "repriced", "cost_added_usd"),
        [
            (
                result.run_id,
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
