"""Real pipeline processes killed and frozen at random: 0 lost, 0 doubled, raw = rollup = API.

Two paths. The ClickHouse-server path: two `meterline pipeline` processes
share the consumer group and write through clickhouse-connect to the
ClickHouse engine (chDB behind ClickHouse's HTTP interface); each round one
is SIGKILLed and restarted, or SIGSTOPped past its session timeout, so its
partitions move while it holds a batch, and SIGCONTed to finish that write
beside the instance that took over. The embedded path: one process with
chDB in its own data directory, killed and frozen the same way.

A few rounds run in the suite; `make soak` runs the same with
METERLINE_SOAK_ROUNDS and METERLINE_SOAK_EVENTS set high and prints figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from conftest import event, unique
from meterline.accounts.manage import Accounts
from meterline.catalog import Catalog, PriceBook, seed_versions
from meterline.credits.check import check_ledger
from meterline.credits.model import GrantKind
from meterline.credits.postgres import PostgresLedger
from meterline.lib.kafka import ensure_topics, start_producer
from meterline.lib.postgres import Database
from meterline.lib.settings import Settings
from meterline.lib.warehouse import Warehouse
from meterline.quotas.plans import PlanTerms, PlanVersion
from meterline.quotas.postgres import PostgresPlanStore
from meterline.v1 import usage_pb2
from services.simulate import Gateway, token_usage
from support.chaos import SESSION_TIMEOUT_S, PipelineFleet, drained, env_for, havoc
from support.consistency import consistent_totals

ROUNDS = int(os.environ.get("METERLINE_SOAK_ROUNDS", "5"))
EVENTS = int(os.environ.get("METERLINE_SOAK_EVENTS", "6000"))


class Expected:
    """What was sent, per account: requests, cost and charge in pico-dollars, priced as
    the pipeline will (``plans``: the accounts on a plan, all of the run)."""

    def __init__(self, catalog: Catalog, plans: Mapping[str, PlanVersion] | None = None) -> None:
        self.catalog = catalog
        self.plans = dict(plans or {})
        self.requests: dict[str, int] = defaultdict(int)
        self.picos: dict[str, int] = defaultdict(int)
        self.charged: dict[str, int] = defaultdict(int)

    def add(self, e: usage_pb2.UsageEvent) -> None:
        price = self.catalog.price_for(e.model, e.provider, e.occurred_at.ToDatetime(UTC))
        cost = price.cost(token_usage(e)).picos if price else 0
        plan = self.plans.get(e.account_id)
        self.requests[e.account_id] += 1
        self.picos[e.account_id] += cost
        self.charged[e.account_id] += plan.charge_picos(cost) if plan and price else cost

    def totals(self) -> dict[str, tuple[int, str, str]]:
        def usd(picos: int) -> str:
            return str(Decimal(picos).scaleb(-12).normalize())

        return {a: (n, usd(self.picos[a]), usd(self.charged[a])) for a, n in self.requests.items()}


async def produce(settings: Settings, gateway: Gateway, expected: Expected, count: int) -> None:
    producer = await start_producer(settings.bootstrap_servers, settings.kafka)
    try:
        for _ in range(count):
            e = gateway.event()
            expected.add(e)
            await producer.send(
                settings.kafka.topic, e.SerializeToString(), key=e.account_id.encode()
            )
        await producer.flush()
    finally:
        await producer.stop()


async def run_havoc(
    settings: Settings,
    env: dict[str, str],
    instances: int,
    tmp_path: Path,
    expected: Expected,
    gateway: Gateway,
) -> PipelineFleet:
    """Start the fleet, wreak havoc while a second wave is produced, drain, stop."""
    await ensure_topics(settings.bootstrap_servers, settings.kafka)
    await produce(settings, gateway, expected, EVENTS * 2 // 3)
    fleet = PipelineFleet(env, instances, tmp_path)
    fleet.start_all()
    rng = random.Random(int(os.environ.get("METERLINE_SOAK_SEED", "7")))
    chaos = asyncio.create_task(
        asyncio.to_thread(havoc, fleet, rounds=ROUNDS, session_timeout_s=SESSION_TIMEOUT_S, rng=rng)
    )
    await produce(settings, gateway, expected, EVENTS - EVENTS * 2 // 3)
    tally = await chaos
    await drained(settings, fleet, 120 + EVENTS / 2000)
    codes = fleet.stop_all()
    assert codes == [0] * instances, fleet.logs()
    print(
        f"{instances} instance(s), {EVENTS} events: {tally.kills} kills, "
        f"{tally.freezes} freezes over {tally.rounds} rounds: {'; '.join(tally.log)}"
    )
    return fleet


async def test_instances_killed_and_frozen_on_the_server_path_count_each_event_once(
    clickhouse_url: str,
    warehouse: Warehouse,
    settings: Settings,
    tmp_path: Path,
    accounts: Accounts,
    database: Database,
) -> None:
    gateway = Gateway(accounts=12, seed=11, run_tag=unique("havoc"))
    # the busiest account pays a sell price from prepaid credits: its charge, and its
    # debits, must survive the havoc too
    planned = gateway.accounts[0]
    accounts.store.create_account(planned)
    store = PostgresPlanStore(database)
    plan = store.add_version(
        PlanTerms(
            plan_id=unique("havoc"),
            price_multiplier="1.333333",
            request_fee_usd="0.0001",
            billing="prepaid",
        )
    )
    ledger = PostgresLedger(database)
    ledger.grant(
        planned, amount_picos=10**6 * 10**12, kind=GrantKind.PURCHASED, idempotency_key="havoc"
    )
    store.assign(planned, plan.plan_id, plan.version, datetime(2000, 1, 1, tzinfo=UTC), "test")
    expected = Expected(PriceBook(warehouse).load(), {planned: plan})
    env = env_for(settings, METERLINE_CLICKHOUSE_URL=clickhouse_url)

    await run_havoc(settings, env, 2, tmp_path, expected, gateway)

    assert consistent_totals(warehouse, gateway.accounts) == expected.totals()
    # every charge debited once: the ledger = the warehouse = what was sent
    whole = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))
    check = check_ledger(ledger, warehouse, store, planned, *whole)
    assert check.agrees, check
    assert check.ledger_picos == expected.charged[planned]
    assert ledger.balance(planned).balance_picos == 10**18 - expected.charged[planned]


async def test_an_embedded_instance_killed_and_frozen_counts_each_event_once(
    settings: Settings, tmp_path: Path
) -> None:
    gateway = Gateway(accounts=6, seed=12, run_tag=unique("havoc"))
    data_dir = tmp_path / "data"
    expected = Expected(Catalog(seed_versions()))  # a new data directory is seeded with these
    env = env_for(settings, METERLINE_DATA_DIR=str(data_dir))

    await run_havoc(settings, env, 1, tmp_path, expected, gateway)

    counted = subprocess.run(
        [sys.executable, "-m", "support.consistency", str(data_dir / "chdb"), *gateway.accounts],
        env=os.environ | {"PYTHONPATH": str(Path(__file__).parent)},
        capture_output=True,
        check=True,
        timeout=120,
    )
    totals = {a: (n, cost, charge) for a, (n, cost, charge) in json.loads(counted.stdout).items()}
    assert totals == expected.totals()


def test_expected_totals_follow_the_catalog() -> None:
    """The expectation itself: gpt-4.1-mini at $0.40 in, $1.60 out, $0.10 cache read."""
    expected = Expected(Catalog(seed_versions()))
    expected.add(event("a", input_tokens=1_000_000, cached_input_tokens=500_000, output_tokens=10))
    assert expected.totals() == {"a": (1, "0.250016", "0.250016")}
