"""Unpriced events are priced later by an explicit, recorded job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from conftest import Stack, event, unique
from meterline.catalog import PriceBook, parse_price
from pipelines.repricing.job import reprice_unpriced


async def test_unpriced_events_are_priced_once_a_price_exists(
    stack: Stack, account_id: str
) -> None:
    model = unique("new-model")
    stack.start_pipeline()
    await stack.report(
        event(
            account_id,
            model=f"acme/{model}",
            provider="acme",
            input_tokens=2_000_000,
            output_tokens=1_000_000,
        ),
        event(account_id, input_tokens=1_000_000),  # gpt-4.1-mini: $0.40
    )
    before = await stack.wait_for_requests(account_id, 2)
    assert before["totals"]["unpriced_requests"] == 1
    assert before["totals"]["cost_usd"] == "0.4"

    PriceBook(stack.warehouse).add(
        [
            parse_price(
                {
                    "model": model,
                    "provider": "acme",
                    "effective_from": "2025-01-01T00:00:00Z",
                    "rates": {"input": "0.25", "output": "1.25"},
                }
            )
        ]
    )
    now = datetime.now(UTC)
    window = (now - timedelta(days=1), now + timedelta(days=1))
    result = reprice_unpriced(stack.warehouse, *window, accounts=[account_id])
    again = reprice_unpriced(stack.warehouse, *window, accounts=[account_id])

    after = await stack.wait_for_requests(account_id, 2)
    assert result.repriced == 1
    assert result.cost_added_usd == "1.75"  # 2 × $0.25 + 1 × $1.25
    assert again.repriced == 0  # already priced: nothing to do
    assert after["totals"]["requests"] == 2
    assert after["totals"]["unpriced_requests"] == 0
    assert after["totals"]["input_tokens"] == 3_000_000
    assert after["totals"]["cost_usd"] == "2.15"
    stored = stack.warehouse.query(
        "SELECT priced, price_id FROM usage_events FINAL "
        "WHERE account_id = {a:String} AND provider = 'acme'",
        {"a": account_id},
    )
    assert [r["priced"] for r in stored] == [1]  # the event once, with its new price
    assert stored[0]["price_id"].startswith("pv_")
    runs = stack.warehouse.query(
        "SELECT repriced, toString(cost_added_usd) AS added FROM repricing_runs "
        "WHERE run_id = {r:String}",
        {"r": result.run_id},
    )
    assert runs == [{"repriced": 1, "added": "1.75"}]
