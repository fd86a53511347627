"""Both warehouse connections carry any text and number exactly, both ways."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from conftest import unique
from meterline.lib.warehouse import Warehouse
from meterline.lib.warehouse.chdb import ChdbWarehouse
from meterline.lib.warehouse.clickhouse import ClickHouseWarehouse

AWKWARD_TEXTS = [
    "plain",
    "line\nbreak",
    "tab\there",
    "back\\slash",
    "\\n is not a newline",
    "quote ' and \" both",
    "nul \0 byte",
    "carriage\rreturn",
    "naïve — 日本語 🙂",
    "",
]


@pytest.fixture(params=["chdb", "clickhouse-connect"])
def connection(
    request: pytest.FixtureRequest, warehouse: ChdbWarehouse, clickhouse_url: str
) -> Iterator[Warehouse]:
    if request.param == "chdb":
        yield warehouse
        return
    wh = ClickHouseWarehouse(clickhouse_url)
    yield wh
    wh.close()


@pytest.mark.parametrize("text", AWKWARD_TEXTS)
def test_string_parameters_arrive_as_sent(connection: Warehouse, text: str) -> None:
    rows = connection.query(
        "SELECT {text:String} AS text, {texts:Array(String)} AS texts",
        {"text": text, "texts": [text, "x"]},
    )
    assert rows == [{"text": text, "texts": [text, "x"]}]


def test_arrow_and_json_inserts_store_the_same_values(
    warehouse: ChdbWarehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chDB inserts as Arrow when it can, as JSON otherwise: the rows must not differ."""
    table = unique("t").replace("-", "_")
    warehouse.command(
        f"CREATE TABLE {table} (path String, at DateTime64(3, 'UTC'), cost Decimal(38, 12), "
        "n UInt64, s Int8, p LowCardinality(String)) ENGINE = MergeTree ORDER BY path"
    )
    moments = [
        datetime(2026, 11, 2, 9, 15, 30, 123999, tzinfo=UTC),
        datetime(2026, 11, 2, 10, 15, 30, 5, tzinfo=timezone(timedelta(hours=1))),
        datetime(1999, 12, 31, 23, 59, 59, 999999),  # naive: UTC
    ]
    costs = [Decimal("0.000000037500"), Decimal("12345678901234567890123456.000000000001")]
    rows = [
        (moments[i % 3], costs[i % 2], [0, 2**64 - 1, 7][i % 3], -1 + i % 3, text)
        for i, text in enumerate(AWKWARD_TEXTS)
    ]
    columns = ("path", "at", "cost", "n", "s", "p")
    types = ["String", "DateTime64(3, 'UTC')", "Decimal(38, 12)", "UInt64", "Int8"]
    arrow_rows = [("arrow", *r) for r in rows]
    assert ChdbWarehouse._arrow_stream(columns, [*types, "LowCardinality(String)"], arrow_rows)

    warehouse.insert(table, columns, arrow_rows)
    monkeypatch.setattr(ChdbWarehouse, "_arrow_stream", staticmethod(lambda *_: None))
    warehouse.insert(table, columns, [("json", *r) for r in rows])

    stored = warehouse.query(
        f"SELECT path, toString(at) AS at, toString(cost) AS cost, n, s, p FROM {table}"
    )
    by_path = {
        path: sorted(
            (r["at"], r["cost"], r["n"], r["s"], r["p"]) for r in stored if r["path"] == path
        )
        for path in ("arrow", "json")
    }
    assert len(by_path["arrow"]) == len(rows)
    assert by_path["arrow"] == by_path["json"]
    assert {r[4] for r in by_path["arrow"]} == set(AWKWARD_TEXTS)
    assert ("2026-11-02 09:15:30.123", "0.0000000375") in {r[:2] for r in by_path["arrow"]}
