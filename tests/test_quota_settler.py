"""Settling quota reservations after each stored batch, against this machine's Redis
(127.0.0.1:6379) and the run's PostgreSQL. Each test has its own key prefix, deleted
after it."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from conftest import Stack, event, unique
from meterline.accounts.manage import Accounts
from meterline.accounts.model import Account
from meterline.accounts.postgres import PostgresAccountStore
from meterline.lib.kafka import free_port
from meterline.lib.postgres import Database
from meterline.lib.redis_server import EmbeddedRedis
from meterline.lib.settings import QuotaSettings
from meterline.money import PICOS_PER_USD
from meterline.quotas.charges import ChargeBook
from meterline.quotas.engine import LimitState, NeedsRebuild, QuotaEngine, WindowTotals
from meterline.quotas.plans import PlanLimits, PlanTerms, PlanVersion
from meterline.quotas.postgres import PostgresPlanStore
from meterline.quotas.settler import QuotaSettler
from meterline.quotas.windows import Window
from meterline.tokens import TokenUsage
from meterline.usage.model import PricedEvent
from support.quotas import clear_of_midnight

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
FEE_PICOS = PICOS_PER_USD // 1000  # the plans' request fee, $0.001


class Recorder:
    """A flush handler that keeps what it hears. Handlers run in order, so one after
    the settler hears a batch once it is settled."""

    name = "recorder"

    def __init__(self) -> None:
        self.events: list[PricedEvent] = []

    def on_flush(self, events: Sequence[PricedEvent]) -> None:
        self.events.extend(events)


class CountingAccounts(PostgresAccountStore):
    """The real account store, counting the accounts it is asked for."""

    def __init__(self, database: Database) -> None:
        super().__init__(database)
        self.asked: list[str] = []

    def account(self, account_id: str) -> Account:
        self.asked.append(account_id)
        return super().account(account_id)


@pytest.fixture(autouse=True)
async def one_day() -> None:
    await clear_of_midnight("UTC", "Asia/Tokyo")


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted after it."""
    value = f"test:{uuid.uuid4().hex}:"
    yield value
    client = redis.asyncio.Redis.from_url(LOCAL_REDIS)
    keys = [k async for k in client.scan_iter(match=f"{value}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def engine(prefix: str) -> AsyncIterator[QuotaEngine]:
    """An engine of the test's own on the same keys, to read what was settled."""
    client = redis.asyncio.Redis.from_url(LOCAL_REDIS)
    yield QuotaEngine(client, key_prefix=prefix, settings=QuotaSettings())
    await client.aclose()


@pytest.fixture
def book(database: Database) -> ChargeBook:
    return ChargeBook(PostgresPlanStore(database))


@pytest.fixture
def make_settler(
    prefix: str, book: ChargeBook, accounts: Accounts
) -> Iterator[Callable[..., QuotaSettler]]:
    """Settlers on the test's prefix, closed after the test."""
    made: list[QuotaSettler] = []

    def make(url: str = LOCAL_REDIS, **options: Any) -> QuotaSettler:
        options.setdefault("accounts", accounts.store)
        settler = QuotaSettler(
            url, key_prefix=prefix, settings=QuotaSettings(), plans=book, **options
        )
        made.append(settler)
        return settler

    yield make
    for settler in made:
        settler.close()


def planned_account(
    accounts: Accounts, database: Database, *, timezone: str = "UTC"
) -> tuple[str, PlanVersion]:
    """A new account on a new plan capping tokens and spend a day, from a day ago on."""
    plans = PostgresPlanStore(database)
    account = unique("settled")
    accounts.store.create_account(account, timezone=timezone)
    plan = plans.add_version(
        PlanTerms(
            plan_id=unique("plan"),
            limits=PlanLimits(tokens_per_day=10_000_000, spend_per_day_usd=Decimal(1000)),
            request_fee_usd=Decimal("0.001"),
        )
    )
    plans.assign(account, plan.plan_id, plan.version, datetime.now(UTC) - timedelta(days=1), "t")
    return account, plan


async def seed_day(engine: QuotaEngine, account: str, plan: PlanVersion, timezone: str) -> None:
    """Today's counters at zero: absent ones are not zero, they need a rebuild."""
    await engine.set_window_totals(
        account, plan, timezone, Window.DAY, datetime.now(UTC), {"account": WindowTotals()}
    )


async def day_used(
    engine: QuotaEngine, account: str, plan: PlanVersion, timezone: str
) -> dict[str, int]:
    states: list[LimitState] = await engine.usage(account, plan, timezone)
    return {s.limit: s.used for s in states}


def priced(
    account: str, *, input_tokens: int, output_tokens: int, charge_picos: int
) -> PricedEvent:
    """A stored event as the pipeline hands it over, occurring now."""
    now = datetime.now(UTC)
    return PricedEvent(
        account_id=account,
        event_id=str(uuid.uuid4()),
        api_key_id="key-1",
        model="openai/gpt-4.1-mini",
        provider="openai",
        occurred_at=now,
        received_at=now,
        status="ok",
        usage=TokenUsage(input_tokens=input_tokens, output_tokens=output_tokens),
        latency_ms=900,
        ttft_ms=300,
        price_id="p" if charge_picos else "",
        price_tier="",
        cost_picos=charge_picos,
        provider_usage_json="",
        kafka_partition=0,
        kafka_offset=0,
        charge_picos=charge_picos,
    )


async def test_a_pipeline_run_settles_the_events_exact_totals(
    stack: Stack,
    accounts: Accounts,
    database: Database,
    book: ChargeBook,
    engine: QuotaEngine,
    make_settler: Callable[..., QuotaSettler],
) -> None:
    timezone = "Asia/Tokyo"  # the day counted is the account's
    account, plan = planned_account(accounts, database, timezone=timezone)
    await seed_day(engine, account, plan, timezone)
    recorder = Recorder()  # after the settler: hears a batch once it is settled
    stack.start_pipeline(handlers=[make_settler(), recorder], plans=book)
    await stack.report(
        # 1,000 × $0.40 + 100 × $1.60 per million: $0.00056, plus the fee
        event(account, input_tokens=1_000, output_tokens=100),
        event(account, input_tokens=2_000, output_tokens=300),
        event(account, model="acme/unknown", provider="acme", input_tokens=5),  # unpriced
    )
    await stack.eventually(lambda: len(recorder.events) >= 3)

    charges = sorted(e.charge_picos for e in recorder.events)
    # unpriced: nothing; $0.00056 + $0.001; $0.0008 + $0.00048 + $0.001
    assert charges == [0, 560_000_000 + FEE_PICOS, 1_280_000_000 + FEE_PICOS]
    used = await day_used(engine, account, plan, timezone)
    assert used == {
        "tokens_per_day": 1_100 + 2_300 + 5,
        "spend_per_day": sum(charges),
    }


async def test_a_replayed_batch_changes_nothing(
    accounts: Accounts,
    database: Database,
    engine: QuotaEngine,
    make_settler: Callable[..., QuotaSettler],
) -> None:
    account, plan = planned_account(accounts, database)
    await seed_day(engine, account, plan, "UTC")
    settler = make_settler()
    batch = [
        priced(account, input_tokens=700, output_tokens=50, charge_picos=123_456_789),
        priced(account, input_tokens=10, output_tokens=0, charge_picos=0),
    ]
    await asyncio.to_thread(settler.on_flush, batch)
    first = await day_used(engine, account, plan, "UTC")
    await asyncio.to_thread(settler.on_flush, batch)  # the pipeline retried the batch

    assert first == {"tokens_per_day": 760, "spend_per_day": 123_456_789}
    assert await day_used(engine, account, plan, "UTC") == first


async def test_events_of_an_account_without_a_plan_are_skipped(
    accounts: Accounts,
    database: Database,
    engine: QuotaEngine,
    prefix: str,
    make_settler: Callable[..., QuotaSettler],
) -> None:
    planned, plan = planned_account(accounts, database)
    unplanned = unique("unplanned")
    accounts.store.create_account(unplanned)
    await seed_day(engine, planned, plan, "UTC")
    settler = make_settler()
    await asyncio.to_thread(
        settler.on_flush,
        [
            priced(unplanned, input_tokens=1_000, output_tokens=1_000, charge_picos=5),
            priced(planned, input_tokens=3, output_tokens=4, charge_picos=5),
        ],
    )

    assert await day_used(engine, planned, plan, "UTC") == {
        "tokens_per_day": 7,
        "spend_per_day": 5,
    }
    client = redis.asyncio.Redis.from_url(LOCAL_REDIS)
    try:
        written = [k async for k in client.scan_iter(match=f"{prefix}{{a:{unplanned}}}*")]
    finally:
        await client.aclose()
    assert written == []


async def test_settlements_wait_while_redis_is_down_and_pricing_goes_on(
    accounts: Accounts,
    database: Database,
    make_settler: Callable[..., QuotaSettler],
    tmp_path: Path,
) -> None:
    account, plan = planned_account(accounts, database)
    port = free_port()
    now = [0.0]
    # retry_s: the settler's own retries wait for the test's clock, not the wall's
    settler = make_settler(f"redis://127.0.0.1:{port}/0", retry_s=1_000, clock=lambda: now[0])

    def batch() -> list[PricedEvent]:
        return [priced(account, input_tokens=100, output_tokens=10, charge_picos=5)]

    await asyncio.to_thread(settler.on_flush, batch())  # nothing listens: no error
    assert len(settler.pending) == 1
    async with redis_back(port, tmp_path, settler) as engine:
        await seed_day(engine, account, plan, "UTC")
        now[0] = 500.0  # before the next attempt: the batch only waits
        await asyncio.to_thread(settler.on_flush, batch())
        assert len(settler.pending) == 2
        assert (await day_used(engine, account, plan, "UTC"))["tokens_per_day"] == 0
        now[0] = 1_001.0
        await asyncio.to_thread(settler.on_flush, batch())
        assert settler.pending == []
        assert await day_used(engine, account, plan, "UTC") == {
            "tokens_per_day": 3 * 110,
            "spend_per_day": 3 * 5,
        }


async def test_settlements_dropped_past_the_bound_make_their_counters_rebuilt(
    accounts: Accounts,
    database: Database,
    make_settler: Callable[..., QuotaSettler],
    tmp_path: Path,
) -> None:
    account, plan = planned_account(accounts, database)
    port = free_port()
    now = [0.0]
    settler = make_settler(
        f"redis://127.0.0.1:{port}/0", retry_s=1_000, max_pending=2, clock=lambda: now[0]
    )
    for _ in range(3):
        batch = [priced(account, input_tokens=1, output_tokens=1, charge_picos=1)]
        await asyncio.to_thread(settler.on_flush, batch)
    assert len(settler.pending) == 2 and settler.forgotten == {account}
    async with redis_back(port, tmp_path, settler) as engine:
        await seed_day(engine, account, plan, "UTC")
        now[0] = 1_001.0
        await asyncio.to_thread(settler.on_flush, [])
        await asyncio.to_thread(
            settler.on_flush, [priced(account, input_tokens=1, output_tokens=1, charge_picos=1)]
        )
        assert settler.pending == [] and settler.forgotten == set()
        # the counters that missed a settlement are gone: rebuilt from the warehouse
        with pytest.raises(NeedsRebuild):
            await engine.usage(account, plan, "UTC")


@contextlib.asynccontextmanager
async def redis_back(
    port: int, data_dir: Path, settler: QuotaSettler
) -> AsyncIterator[QuotaEngine]:
    """Redis starting, empty, on the port the settler was given: an engine on its keys."""
    with EmbeddedRedis(port, data_dir=data_dir) as server:
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            yield QuotaEngine(client, key_prefix=settler.key_prefix, settings=QuotaSettings())
        finally:
            await client.aclose()


async def test_a_time_zone_is_read_once_per_account_per_refresh(
    accounts: Accounts,
    database: Database,
    engine: QuotaEngine,
    make_settler: Callable[..., QuotaSettler],
) -> None:
    account, plan = planned_account(accounts, database)
    await seed_day(engine, account, plan, "UTC")
    store = CountingAccounts(database)
    now = [0.0]
    settler = make_settler(accounts=store, timezone_refresh_s=5.0, clock=lambda: now[0])
    for step in (0.0, 1.0, 10.0):
        now[0] = step
        await asyncio.to_thread(
            settler.on_flush,
            [priced(account, input_tokens=1, output_tokens=1, charge_picos=0) for _ in range(3)],
        )

    assert store.asked == [account, account]  # at 0 s, and again after the refresh at 10 s
    assert (await day_used(engine, account, plan, "UTC"))["tokens_per_day"] == 18
