"""The production warehouse path: clickhouse-connect against the ClickHouse engine.

The engine is chDB behind ClickHouse's HTTP interface (tests/support/chdb_http.py);
clickhouse-connect itself does the talking, as it would to a server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from conftest import unique
from meterline.catalog import PriceBook
from meterline.lib.kafka import EmbeddedBroker, ensure_topics, start_producer
from meterline.lib.settings import Settings
from meterline.lib.warehouse import Warehouse, WarehouseError, migrate
from meterline.lib.warehouse.clickhouse import ClickHouseWarehouse
from meterline.usage.report import usage_report
from services.simulate import Gateway, token_usage


@pytest.fixture
def clickhouse(clickhouse_url: str) -> Iterator[ClickHouseWarehouse]:
    wh = ClickHouseWarehouse(clickhouse_url)
    yield wh
    wh.close()


def test_values_round_trip_exactly(clickhouse: ClickHouseWarehouse) -> None:
    table = unique("t").replace("-", "_")
    clickhouse.command(
        f"CREATE TABLE {table} (k String, at DateTime64(3, 'UTC'), cost Decimal(38, 12), "
        "n UInt64, p LowCardinality(String), s Int8) ENGINE = MergeTree ORDER BY k"
    )
    at = datetime(2026, 11, 2, 9, 15, 30, 123000, tzinfo=UTC)
    clickhouse.insert(
        table,
        ("k", "at", "cost", "n", "p", "s"),
        [
            ("a", at, Decimal("0.000000037500"), 2**63, "openai", -1),
            ("b", at.replace(tzinfo=None), Decimal("1.25"), 7, "azure", 1),
        ],
    )
    rows = clickhouse.query(
        f"SELECT k, at, toString(cost) AS cost, n, p, s FROM {table} "
        "WHERE at >= {t:DateTime64(3, 'UTC')} ORDER BY k",
        {"t": at},
    )
    assert [(r["k"], r["cost"], r["n"], r["p"], r["s"]) for r in rows] == [
        ("a", "0.0000000375", 2**63, "openai", -1),
        ("b", "1.25", 7, "azure", 1),
    ]
    assert all(r["at"].replace(tzinfo=UTC) == at for r in rows)
    total = clickhouse.query(f"SELECT toString(sum(cost)) AS total FROM {table}")
    assert total == [{"total": "1.2500000375"}]


def test_engine_errors_come_back_with_the_engines_message(
    clickhouse: ClickHouseWarehouse,
) -> None:
    with pytest.raises(WarehouseError, match=r"UNKNOWN_TABLE|Unknown table"):
        clickhouse.query("SELECT * FROM no_such_table")


def test_schema_catalog_and_usage_read_the_same_on_both_connections(
    clickhouse: ClickHouseWarehouse, warehouse: Warehouse
) -> None:
    assert migrate(clickhouse) == []  # the same, already migrated, engine
    via_http = PriceBook(clickhouse).load()
    assert {v.price_id for v in via_http.versions} == {
        v.price_id for v in PriceBook(warehouse).load().versions
    }
    start, end = datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)
    accounts = warehouse.query("SELECT DISTINCT account_id FROM usage_events LIMIT 5")
    for row in accounts:
        a = usage_report(warehouse, row["account_id"], start, end, ["model", "day"])
        b = usage_report(clickhouse, row["account_id"], start, end, ["model", "day"])
        assert a.to_json() == b.to_json()


def _rows(warehouse: Warehouse, accounts: list[str]) -> dict[str, object]:
    return warehouse.query(
        "SELECT count() AS n, uniqExact(account_id, event_id) AS distinct_events, "
        "toString(sum(cost_usd)) AS cost FROM usage_events "
        "WHERE account_id IN {accounts:Array(String)}",
        {"accounts": accounts},
    )[0]


async def test_a_pipeline_process_killed_with_sigkill_loses_and_doubles_nothing(
    broker: EmbeddedBroker,
    clickhouse_url: str,
    warehouse: Warehouse,
    settings: Settings,
    tmp_path: Path,
) -> None:
    await ensure_topics(settings.bootstrap_servers, settings.kafka)
    gateway = Gateway(accounts=20, seed=5, run_tag=unique("kill"))
    catalog = PriceBook(warehouse).load()  # the prices the pipeline will use
    producer = await start_producer(settings.bootstrap_servers, settings.kafka)
    expected_picos, total = 0, 6_000
    try:
        for _ in range(total):
            e = gateway.event()
            price = catalog.price_for(e.model, e.provider, datetime.now(UTC))
            expected_picos += price.cost(token_usage(e)).picos if price else 0
            await producer.send(
                settings.kafka.topic, e.SerializeToString(), key=e.account_id.encode()
            )
        await producer.flush()
    finally:
        await producer.stop()

    env = os.environ | {
        "METERLINE_KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "METERLINE_KAFKA_TOPIC": settings.kafka.topic,
        "METERLINE_KAFKA_DEAD_LETTER_TOPIC": settings.kafka.dead_letter_topic,
        "METERLINE_KAFKA_CONSUMER_GROUP": settings.kafka.consumer_group,
        "METERLINE_CLICKHOUSE_URL": clickhouse_url,
        "METERLINE_PIPELINE_MAX_BATCH_EVENTS": "300",
        "METERLINE_PIPELINE_MAX_BATCH_WAIT_MS": "50",
    }
    command = [sys.executable, "-m", "services.cli", "pipeline"]
    accounts = gateway.accounts

    log = tmp_path / "pipeline.log"
    with log.open("wb") as output:  # the child keeps its own copy of the descriptor
        first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=output)
    deadline = time.monotonic() + 60
    while int(_rows(warehouse, accounts)["n"]) == 0:  # type: ignore[call-overload]
        if first.poll() is not None:
            raise AssertionError(f"the pipeline exited:\n{log.read_text()[-3000:]}")
        assert time.monotonic() < deadline, "the pipeline wrote nothing"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)  # mid-stream: no flush, no commit, no leaving the group
    first.wait()
    written_before_kill = int(_rows(warehouse, accounts)["n"])  # type: ignore[call-overload]
    assert 0 < written_before_kill < total

    second = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while int(_rows(warehouse, accounts)["n"]) < total:  # type: ignore[call-overload]
            assert time.monotonic() < deadline, _rows(warehouse, accounts)
            time.sleep(0.1)
        time.sleep(1.0)  # anything replayed twice would show up now
    finally:
        second.send_signal(signal.SIGTERM)
        _, err = second.communicate(timeout=60)
    assert second.returncode == 0, err.decode()[-2000:]
    assert _rows(warehouse, accounts) == {
        "n": total,
        "distinct_events": total,
        "cost": str(Decimal(expected_picos).scaleb(-12).normalize()),
    }
