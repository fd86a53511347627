"""What the account pays: each priced event's ``charge_usd``, set by the plan in force
at the event's time, through ingest, the pipeline, the warehouse and the HTTP API."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from conftest import Stack, bearer, event, unique
from meterline.accounts import KeyRing
from meterline.accounts.manage import Accounts, IssuedKey
from meterline.lib.postgres import Database, PostgresError
from meterline.lib.warehouse import Warehouse
from meterline.money import (
    MAX_EVENT_PICOS,
    PICOS_PER_USD,
    WAREHOUSE_INTEGER_DIGITS,
    picos_to_sql_decimal,
)
from meterline.quotas.charges import ChargeBook
from meterline.quotas.plans import MAX_CHARGE_PICOS, MAX_MULTIPLIER, PlanTerms, PlanVersion
from meterline.quotas.postgres import PostgresPlanStore
from meterline.quotas.store import PlanHistory, in_force
from meterline.tokens import TokenUsage
from meterline.usage.clickhouse import ClickHouseUsageStore
from meterline.usage.model import PricedEvent
from meterline.usage.report import usage_report
from pipelines.repricing.job import reprice_unpriced
from services.api.app import create_app


class Recorder:
    """A flush handler that keeps what it hears."""

    name = "recorder"

    def __init__(self) -> None:
        self.events: list[PricedEvent] = []

    def on_flush(self, events: Sequence[PricedEvent]) -> None:
        self.events.extend(events)


class CountingPlans(PostgresPlanStore):
    """The real plan store, counting its round trips; ``down`` of them fail as an
    unreachable PostgreSQL does."""

    def __init__(self, database: Database, *, down: int = 0) -> None:
        super().__init__(database)
        self.asked: list[set[str]] = []
        self.down = down

    def histories(self, account_ids: Collection[str]) -> dict[str, PlanHistory]:
        self.asked.append(set(account_ids))
        if self.down:
            self.down -= 1
            raise PostgresError("PostgreSQL at 127.0.0.1:5432/test does not answer")
        return super().histories(account_ids)


@pytest.fixture
def plans(database: Database) -> PostgresPlanStore:
    return PostgresPlanStore(database)


def planned_account(accounts: Accounts, plans: PostgresPlanStore, **terms: Any) -> str:
    """A new account on a new plan of ``terms`` from a day ago on."""
    account = unique("planned")
    accounts.store.create_account(account)
    plan = plans.add_version(PlanTerms(plan_id=unique("plan"), **terms))
    plans.assign(account, plan.plan_id, plan.version, datetime.now(UTC) - timedelta(days=1), "t")
    return account


async def test_a_plan_sets_the_charge_end_to_end(
    stack: Stack,
    database: Database,
    plans: PostgresPlanStore,
    accounts: Accounts,
    key_ring: KeyRing,
    admin_key: IssuedKey,
) -> None:
    planned = planned_account(accounts, plans, price_multiplier="1.25", request_fee_usd="0.001")
    unplanned = unique("acct")
    handler = Recorder()
    stack.start_pipeline(handlers=[handler], plans=ChargeBook(PostgresPlanStore(database)))
    for account in (planned, unplanned):
        await stack.report(
            # 1,000 × $0.40 + 100 × $1.60 per million: $0.00056
            event(account, input_tokens=1_000, output_tokens=100),
            event(account, model="gpt-4.1-mini", input_tokens=1_000_000),  # $0.40
            event(account, model="acme/unknown", provider="acme", input_tokens=5),  # unpriced
        )
    for account in (planned, unplanned):
        await stack.wait_for_requests(account, 3)

    heard = {(e.account_id, e.cost_picos): e for e in handler.events}
    # $0.00056 × 1.25 + $0.001 and $0.40 × 1.25 + $0.001
    assert heard[planned, 560_000_000].charge_picos == 1_700_000_000
    assert heard[planned, 400_000_000_000].charge_picos == 501_000_000_000
    assert heard[planned, 0].charge_picos == 0  # no price: nothing charged, no fee
    assert {e.plan_id for e in heard.values() if e.account_id == planned and e.priced} != {""}
    assert all(
        (e.charge_picos, e.plan_id, e.plan_version) == (e.cost_picos, "", 0)
        for e in heard.values()
        if e.account_id == unplanned
    )
    app = create_app(stack.warehouse, auth=key_ring, accounts=accounts, plans=plans)
    async with AsyncTestClient(app=app) as client:
        client.headers.update(bearer(admin_key))
        answers = {
            account: (
                await client.get(
                    f"/v1/accounts/{account}/usage",
                    params={"from": "2000-01-01T00:00:00Z", "group_by": "model"},
                )
            ).json()
            for account in (planned, unplanned)
        }
    assert (answers[planned]["totals"]["cost_usd"], answers[planned]["totals"]["charge_usd"]) == (
        "0.40056",
        "0.5027",
    )
    assert [(g["model"], g["charge_usd"]) for g in answers[planned]["groups"]] == [
        ("acme/unknown", "0"),
        ("gpt-4.1-mini", "0.501"),
        ("openai/gpt-4.1-mini", "0.0017"),
    ]
    assert answers[unplanned]["totals"]["charge_usd"] == "0.40056"  # no plan: the cost


async def test_a_plan_change_applies_from_its_instant_on(
    stack: Stack, database: Database, plans: PostgresPlanStore, accounts: Accounts
) -> None:
    """Effective-dated by occurred_at: an event before the change keeps the old price."""
    account = unique("changing")
    accounts.store.create_account(account)
    plan_id = unique("plan")
    plans.add_version(PlanTerms(plan_id=plan_id, price_multiplier="2"))
    plans.add_version(PlanTerms(plan_id=plan_id, price_multiplier="3"))
    change = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    plans.assign(account, plan_id, 1, change - timedelta(days=1), "t")
    plans.assign(account, plan_id, 2, change, "t")
    handler = Recorder()
    stack.start_pipeline(handlers=[handler], plans=ChargeBook(PostgresPlanStore(database)))
    # reported in one batch, the later one first: only occurred_at decides
    await stack.report(
        event(account, event_id="after", occurred_at=change, input_tokens=1_000),
        event(
            account,
            event_id="before",
            occurred_at=change - timedelta(milliseconds=1),
            input_tokens=1_000,
        ),
    )
    usage = await stack.wait_for_requests(account, 2)

    charged = {e.event_id: (e.charge_picos, e.plan_version) for e in handler.events}
    assert charged == {"before": (800_000_000, 1), "after": (1_200_000_000, 2)}  # $0.0004 × 2, × 3
    assert (usage["totals"]["cost_usd"], usage["totals"]["charge_usd"]) == ("0.0008", "0.002")


async def test_the_charge_rounds_half_up_to_the_pico(
    stack: Stack, database: Database, plans: PostgresPlanStore, accounts: Accounts
) -> None:
    account = planned_account(accounts, plans, price_multiplier="1.000001")
    handler = Recorder()
    stack.start_pipeline(handlers=[handler], plans=ChargeBook(PostgresPlanStore(database)))
    await stack.report(
        # 1 uncached input at $0.40 and 1 cache read at $0.10 per million: 500,000 picos
        event(account, event_id="half", input_tokens=2, cached_input_tokens=1),
        event(account, event_id="below-half", input_tokens=1),  # 400,000 picos
    )
    usage = await stack.wait_for_requests(account, 2)

    charged = {e.event_id: (e.cost_picos, e.charge_picos) for e in handler.events}
    # 500,000.5 rounds up, 400,000.4 down
    assert charged == {"half": (500_000, 500_001), "below-half": (400_000, 400_000)}
    assert usage["totals"]["charge_usd"] == "0.000000900001"


async def test_plans_are_read_once_per_account_per_refresh(
    database: Database, plans: PostgresPlanStore, accounts: Accounts
) -> None:
    account = planned_account(accounts, plans, price_multiplier="2")
    unplanned = unique("acct")
    counting = CountingPlans(database)
    now = [0.0]
    book = ChargeBook(counting, refresh_s=5.0, clock=lambda: now[0])
    at = datetime.now(UTC)

    book.load([account, unplanned])
    for _ in range(100):
        found = book.plan_at(account, at)
        assert found is not None and found.price_multiplier == 2
        assert book.plan_at(unplanned, at) is None
    assert counting.asked == [{account, unplanned}]  # one query for both, then memory

    plan_id = unique("plan")
    plans.add_version(PlanTerms(plan_id=plan_id, price_multiplier="4"))
    plans.assign(account, plan_id, 1, at - timedelta(seconds=1), "t")
    now[0] = 4.9
    assert book.plan_at(account, at).price_multiplier == 2  # type: ignore[union-attr]
    now[0] = 5.0  # refreshed: the new assignment is in force
    assert book.plan_at(account, at).price_multiplier == 4  # type: ignore[union-attr]
    assert counting.asked[1:] == [{account}]
    # the book and the store pick the assignment in force by the same rule
    history = counting.histories([account])[account]
    for moment in (at - timedelta(days=2), at - timedelta(seconds=1), at):
        stored = plans.plan_of(account, moment)
        assert stored == in_force(history, moment)
        held = book.plan_at(account, moment)
        assert (None if stored is None else stored[1]) == held


async def test_a_plan_store_outage_retries_the_batch_never_charging_0(
    stack: Stack, database: Database, plans: PostgresPlanStore, accounts: Accounts
) -> None:
    account = planned_account(accounts, plans, price_multiplier="1.5")
    flaky = CountingPlans(database, down=2)
    handler = Recorder()
    pipeline = stack.start_pipeline(handlers=[handler], plans=ChargeBook(flaky))
    await stack.report(event(account, input_tokens=1_000_000))  # $0.40

    usage = await stack.wait_for_requests(account, 1, timeout_s=30)

    assert usage["totals"]["charge_usd"] == "0.6"
    assert [e.charge_picos for e in handler.events] == [600_000_000_000]  # heard once, charged
    assert pipeline.metrics.write_retries >= 2 and flaky.down == 0


async def test_repricing_charges_through_the_plan(
    stack: Stack, database: Database, plans: PostgresPlanStore, accounts: Accounts
) -> None:
    from meterline.catalog import PriceBook, parse_price

    account = planned_account(accounts, plans, price_multiplier="2", request_fee_usd="0.01")
    model = unique("later-model")
    book = ChargeBook(PostgresPlanStore(database))
    stack.start_pipeline(plans=book)
    await stack.report(event(account, model=model, provider="acme", input_tokens=1_000_000))
    before = await stack.wait_for_requests(account, 1)
    assert (before["totals"]["unpriced_requests"], before["totals"]["charge_usd"]) == (1, "0")
    PriceBook(stack.warehouse).add(
        [
            parse_price(
                {
                    "model": model,
                    "provider": "acme",
                    "effective_from": "2025-01-01T00:00:00Z",
                    "rates": {"input": "0.25", "output": "1"},
                }
            )
        ]
    )
    now = datetime.now(UTC)
    result = reprice_unpriced(
        stack.warehouse, now - timedelta(days=1), now + timedelta(days=1), [account], plans=book
    )

    after = await stack.wait_for_requests(account, 1)
    assert (result.cost_added_usd, result.charge_added_usd) == ("0.25", "0.51")
    assert (after["totals"]["cost_usd"], after["totals"]["charge_usd"]) == ("0.25", "0.51")


def test_the_dearest_charge_fits_every_store(warehouse: Warehouse) -> None:
    dearest = PlanVersion(
        plan_id="dearest", price_multiplier=MAX_MULTIPLIER, request_fee_usd="1000"
    )
    worst = dearest.charge_picos(MAX_EVENT_PICOS)
    assert worst == MAX_CHARGE_PICOS == 2_001_001_000 * PICOS_PER_USD  # $2,001,001,000
    whole = picos_to_sql_decimal(10**12 * worst).split(".")[0]  # a trillion of them
    assert len(whole) == 22 <= WAREHOUSE_INTEGER_DIGITS
    # two such events, stored, read back and summed, from the rollup and from raw events
    account, at = unique("dearest"), datetime(2026, 11, 5, 12, 0, 30, tzinfo=UTC)
    stored = PricedEvent(
        account, "e", "", "m", "p", at, at, "ok", TokenUsage(), 0, 0, "pv_x", "",
        MAX_EVENT_PICOS, "", 0, 0, worst, "dearest", 1,
    )  # fmt: skip
    store = ClickHouseUsageStore(warehouse)
    store.insert_priced([stored, stored._replace(event_id="f", occurred_at=at.replace(second=0))])
    assert store.stored({(account, "e")})[account, "e"] == stored
    minute = at.replace(second=0)
    for end, source in ((60_000, "usage_minutely"), (59_999, "usage_events")):
        report = usage_report(warehouse, account, minute, minute + timedelta(milliseconds=end))
        assert report.source == source
        assert (report.totals.cost_usd, report.totals.charge_usd) == (
            Decimal(2 * MAX_EVENT_PICOS).scaleb(-12),
            Decimal(2 * worst).scaleb(-12),
        )
