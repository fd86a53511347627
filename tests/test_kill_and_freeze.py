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
import time
from collections import defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from conftest import event, unique
from meterline.accounts.manage import Accounts
from meterline.catalog import Catalog, PriceBook, seed_versions
from meterline.lib.kafka import ensure_topics, start_producer
from meterline.lib.postgres import Database
from meterline.lib.settings import Settings
from meterline.lib.warehouse import Warehouse
from meterline.quotas.plans import PlanTerms, PlanVersion
from meterline.quotas.postgres import PostgresPlanStore
from meterline.v1 import usage_pb2
from services.simulate import Gateway, token_usage
from support.chaos import PipelineFleet, havoc
from support.consistency import consistent_totals

ROUNDS = int(os.environ.get("METERLINE_SOAK_ROUNDS", "5"))
EVENTS = int(os.environ.get("METERLINE_SOAK_EVENTS", "6000"))
SESSION_TIMEOUT_S = 3.0


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


async def uncommitted(settings: Settings) -> int:
    """Records of the topic the group has not committed: 0 once all are stored.

    The partitions' ends are read from a fetch's high watermark: the embedded
    broker's ListOffsets gives the start of the last record batch instead.
    """
    kafka = settings.kafka
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=kafka.consumer_group,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(kafka.topic, p) for p in range(kafka.partitions)]
        consumer.assign(partitions)
        committed = {tp: await consumer.committed(tp) or 0 for tp in partitions}
        for tp in partitions:
            consumer.seek(tp, max(0, committed[tp] - 1))
        for _ in range(20):
            await consumer.getmany(timeout_ms=100)
            if all(consumer.highwater(tp) is not None for tp in partitions):
                break
        return sum(max(0, (consumer.highwater(tp) or 0) - committed[tp]) for tp in partitions)
    finally:
        await consumer.stop()


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
    deadline = time.monotonic() + 120 + EVENTS / 2000
    while (left := await uncommitted(settings)) > 0:
        fleet.check_alive()
        assert time.monotonic() < deadline, f"{left} records never committed\n{fleet.logs()}"
        await asyncio.sleep(0.5)
    codes = fleet.stop_all()
    assert codes == [0] * instances, fleet.logs()
    print(
        f"{instances} instance(s), {EVENTS} events: {tally.kills} kills, "
        f"{tally.freezes} freezes over {tally.rounds} rounds: {'; '.join(tally.log)}"
    )
    return fleet


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    kafka = settings.kafka
    return {
        "METERLINE_KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "METERLINE_KAFKA_TOPIC": kafka.topic,
        "METERLINE_KAFKA_DEAD_LETTER_TOPIC": kafka.dead_letter_topic,
        "METERLINE_KAFKA_CONSUMER_GROUP": kafka.consumer_group,
        "METERLINE_KAFKA_SESSION_TIMEOUT_MS": str(int(SESSION_TIMEOUT_S * 1000)),
        "METERLINE_PIPELINE_MAX_BATCH_EVENTS": "400",
        "METERLINE_PIPELINE_MAX_BATCH_WAIT_MS": "50",
        "METERLINE_METRICS_PORT": "0",
        "METERLINE_POSTGRES_URL": settings.postgres.url,
        # quota settles go to this machine's Redis, under the test's own prefix
        "METERLINE_REDIS_URL": "redis://127.0.0.1:6379/0",
        "METERLINE_REDIS_KEY_PREFIX": f"{kafka.consumer_group}:",
        "METERLINE_KEYS_SECRET": settings.keys.secret.get_secret_value(),
        **extra,
    }


async def test_instances_killed_and_frozen_on_the_server_path_count_each_event_once(
    clickhouse_url: str,
    warehouse: Warehouse,
    settings: Settings,
    tmp_path: Path,
    accounts: Accounts,
    database: Database,
) -> None:
    gateway = Gateway(accounts=12, seed=11, run_tag=unique("havoc"))
    # the busiest account pays a sell price: its charge must survive the havoc too
    planned = gateway.accounts[0]
    accounts.store.create_account(planned)
    store = PostgresPlanStore(database)
    plan = store.add_version(
        PlanTerms(plan_id=unique("havoc"), price_multiplier="1.333333", request_fee_usd="0.0001")
    )
    store.assign(planned, plan.plan_id, plan.version, datetime(2000, 1, 1, tzinfo=UTC), "test")
    expected = Expected(PriceBook(warehouse).load(), {planned: plan})
    env = env_for(settings, METERLINE_CLICKHOUSE_URL=clickhouse_url)

    await run_havoc(settings, env, 2, tmp_path, expected, gateway)

    assert consistent_totals(warehouse, gateway.accounts) == expected.totals()


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
