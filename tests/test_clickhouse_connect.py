"""The production warehouse path: clickhouse-connect against the ClickHouse engine.

The engine is chDB behind ClickHouse's HTTP interface (tests/support/chdb_http.py);
clickhouse-connect itself does the talking, as it would to a server.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from conftest import unique
from meterline.catalog import PriceBook
from meterline.lib.warehouse import Warehouse, WarehouseError, migrate
from meterline.lib.warehouse.clickhouse import ClickHouseWarehouse
from meterline.usage.report import usage_report


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
