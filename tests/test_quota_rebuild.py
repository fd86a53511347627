"""Day and month counters rebuilt from the warehouse (the session's chDB) into this
machine's Redis, with settles arriving before, during and after the rebuild: every
event counts once."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
import redis.asyncio

from conftest import unique
from meterline.lib.settings import QuotaSettings
from meterline.lib.warehouse.chdb import ChdbWarehouse
from meterline.money import PICOS_PER_USD
from meterline.quotas.engine import NeedsRebuild, QuotaEngine, Settlement, WindowRef
from meterline.quotas.plans import Limits, PlanLimits, PlanVersion
from meterline.quotas.rebuild import WarehouseCounts, rebuild
from meterline.quotas.windows import Window
from meterline.usage.clickhouse import ClickHouseUsageStore
from meterline.usage.model import PricedEvent
from support.quotas import clear_of_midnight, priced

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
CENT = PICOS_PER_USD // 100

PLAN = PlanVersion(
    plan_id="rebuilt",
    limits=PlanLimits(
        tokens_per_day=10**9,
        spend_per_month_usd=Decimal(10_000),
        per_api_key=Limits(spend_per_day_usd=Decimal(1_000)),
        per_model={"gpt-4.1*": Limits(tokens_per_month=10**9)},
    ),
)


@pytest.fixture(autouse=True)
async def one_day() -> None:
    await clear_of_midnight("UTC")


@pytest.fixture
async def engine() -> AsyncIterator[QuotaEngine]:
    prefix = f"test:{uuid.uuid4().hex}:"
    client = redis.asyncio.Redis.from_url(LOCAL_REDIS)
    yield QuotaEngine(client, key_prefix=prefix, settings=QuotaSettings())
    keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def settlement(e: PricedEvent) -> tuple[Settlement, PlanVersion, str]:
    return (
        Settlement(
            e.account_id,
            e.event_id,
            e.api_key_id,
            e.model,
            e.usage.input_tokens,
            e.usage.output_tokens,
            e.charge_picos,
            e.occurred_at,
        ),
        PLAN,
        "UTC",
    )


async def used(
    engine: QuotaEngine, account: str, *, api_key_id: str, model: str
) -> dict[tuple[str, str], int]:
    states = await engine.usage(account, PLAN, "UTC", api_key_id=api_key_id, model=model)
    return {(s.scope, s.limit): s.used for s in states}


async def refs_to_rebuild(engine: QuotaEngine, account: str) -> list[WindowRef]:
    with pytest.raises(NeedsRebuild) as raised:
        await engine.usage(account, PLAN, "UTC", api_key_id="k1", model="gpt-4.1")
    return raised.value.windows


async def test_counters_are_rebuilt_from_the_warehouse_per_scope(
    engine: QuotaEngine, warehouse: ChdbWarehouse
) -> None:
    account = unique("rebuilt")
    events = [
        priced(account, tokens=100, cents=7),
        priced(account, tokens=50, cents=3, api_key_id="k2"),
        priced(account, tokens=10, cents=1, model="claude-sonnet-4"),
    ]
    ClickHouseUsageStore(warehouse).insert_priced(events)
    refs = await refs_to_rebuild(engine, account)
    assert {(r.scope, r.window) for r in refs} == {
        ("account", Window.DAY),
        ("account", Window.MONTH),
        ("api_key:k1", Window.DAY),
        ("model:gpt-4.1*", Window.MONTH),
    }
    assert await rebuild(engine, WarehouseCounts(warehouse), account, PLAN, refs) == 4
    assert await used(engine, account, api_key_id="k1", model="gpt-4.1") == {
        ("account", "tokens_per_day"): 320,
        ("account", "spend_per_month"): 11 * CENT,
        ("api_key:k1", "spend_per_day"): 8 * CENT,  # k1's two events, not k2's
        ("model:gpt-4.1*", "tokens_per_month"): 300,  # not claude's
    }
    # complete: a second rebuild changes nothing
    assert await rebuild(engine, WarehouseCounts(warehouse), account, PLAN, refs) == 0


async def test_settles_before_during_and_after_a_rebuild_count_each_event_once(
    engine: QuotaEngine, warehouse: ChdbWarehouse
) -> None:
    account = unique("racing")
    store = ClickHouseUsageStore(warehouse)
    old, during, unsettled, late, after = (
        priced(account, tokens=t, cents=t) for t in (1, 2, 4, 8, 16)
    )
    # stored and settled before Redis held the counters: the settle found nothing to add to
    store.insert_priced([old])
    assert await engine.settle([settlement(old)]) == 1
    refs = await refs_to_rebuild(engine, account)
    await engine.begin_rebuild(account, refs)
    # during the building: one stored before the warehouse is read and settled now
    # (so it is in both), one settled now but stored only after the read...
    store.insert_priced([during])
    await engine.settle([settlement(during)])
    await engine.settle([settlement(late)])
    # ... and one stored whose settle comes only after the rebuild
    store.insert_priced([unsettled])
    # the rebuild takes the building over (same instant) and completes it
    assert await rebuild(engine, WarehouseCounts(warehouse), account, PLAN, refs) == 4
    store.insert_priced([late])
    await engine.settle([settlement(unsettled), settlement(late), settlement(during)])
    store.insert_priced([after])
    await engine.settle([settlement(after)])
    total = 1 + 2 + 4 + 8 + 16
    assert await used(engine, account, api_key_id="k1", model="gpt-4.1") == {
        ("account", "tokens_per_day"): 2 * total,
        ("account", "spend_per_month"): total * CENT,
        ("api_key:k1", "spend_per_day"): total * CENT,
        ("model:gpt-4.1*", "tokens_per_month"): 2 * total,
    }
