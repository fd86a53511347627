"""The fast lane (checks and prices in the engine) stores exactly what the Python lane would.

Each test runs the same Kafka records through both: the pipeline's Python
lane (decode, validate, price per record) into a reference table, and the
pipeline's real write (engine first, Python for what the engine leaves)
into ``usage_events``; then compares the two tables row for row and the
dead letters reason for reason.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import ConsumerRecord
from google.protobuf.timestamp_pb2 import Timestamp

from conftest import unique
from meterline.catalog import Catalog, parse_price
from meterline.lib.settings import Settings
from meterline.lib.warehouse import USAGE_EVENT_COLUMNS, Warehouse
from meterline.lib.warehouse.chdb import ChdbWarehouse
from meterline.lib.warehouse.clickhouse import ClickHouseWarehouse
from meterline.v1 import usage_pb2
from pipelines.pricing.in_warehouse import WarehouseLane
from pipelines.pricing.pipeline import PricingPipeline

NOW = datetime.now(UTC).replace(microsecond=0)
PRICE_CHANGE = NOW - timedelta(days=3, microseconds=1)  # events straddle it to the microsecond
MAX_TOKENS = Settings().events.max_tokens
PARTITIONS = itertools.count(10_000)  # a partition per batch: its rows are found by it


def price(model: str, provider: str, start: datetime, rates: dict, tiers=()) -> object:
    return parse_price(
        {
            "model": model,
            "provider": provider,
            "effective_from": start.isoformat(),
            "rates": rates,
            "tiers": list(tiers),
        }
    )


AWKWARD_MODEL = "o'brien\\{x}%s"
CATALOG = Catalog(
    [
        price(
            "openai/gpt-4.1-mini",
            "openai",
            NOW - timedelta(days=400),
            {"input": "0.40", "output": "1.60", "cache_read": "0.10"},
        ),
        price(
            "openai/gpt-4.1-mini",
            "openai",
            PRICE_CHANGE,
            {"input": "0.35", "output": "1.40", "cache_read": "0.0375"},
        ),
        # two versions starting together: the catalog's tie-break must hold in the engine too
        price("gpt-4.1-mini", "azure", NOW - timedelta(days=400), {"input": "1", "output": "2"}),
        price("gpt-4.1-mini", "azure", NOW - timedelta(days=400), {"input": "3", "output": "4"}),
        price(
            "tiered-model",
            "acme",
            NOW - timedelta(days=100),
            {
                "input": "1.25",
                "output": "10",
                "cache_read": "0.125",
                "cache_write_5m": "1.5625",
                "cache_write_1h": "2.5",
                "reasoning": "12.000001",
                "request": "0.000123",
            },
            [
                {"above_input_tokens": 200_000, "rates": {"input": "2.5", "output": "15"}},
                {"above_input_tokens": 1_000_000, "rates": {"input": "5", "output": "20"}},
            ],
        ),
        price(
            "dated-model",
            "acme",
            NOW - timedelta(days=100),
            {"input": "0.000001", "output": "999.999999"},
        ),
        price("modèle-français", "acme", NOW - timedelta(days=100), {"input": "2", "output": "3"}),
        # quotes, backslashes, braces, percent: the engine's price table is SQL text
        price(AWKWARD_MODEL, "acme", NOW - timedelta(days=100), {"input": "5", "output": "7"}),
    ]
)
MODELS = [
    ("openai/gpt-4.1-mini", "openai"),
    ("gpt-4.1-mini", "openai"),
    ("GPT-4.1-MINI", "openai"),
    ("gpt-4.1-mini", "azure"),
    ("tiered-model", "acme"),
    ("tiered-model", "ACME"),
    ("dated-model-2025-01-01", "acme"),
    ("modèle-français", "acme"),  # valid, not ASCII: the Python lane's
    (AWKWARD_MODEL, "acme"),
    ("unknown-model", "acme"),  # stored unpriced
    ("  ", "acme"),  # blank: dead-lettered
    ("tab\tmodel", "acme"),  # control character: dead-lettered
]


def mostly(rng: random.Random, usual: object, *odd: object) -> object:
    """``usual`` nine times in ten, else one of ``odd``: most events stay valid."""
    return usual if rng.random() < 0.9 else rng.choice(odd)


def tokens(rng: random.Random) -> int:
    return rng.choice([0, 1, 7, 1024, 199_999, 200_000, 200_001, 1_000_001, MAX_TOKENS])


def random_event(rng: random.Random, accounts: list[str], ids: list[str]) -> usage_pb2.UsageEvent:
    model, provider = rng.choice(MODELS) if rng.random() < 0.3 else MODELS[rng.randrange(5)]
    input_tokens = tokens(rng) if rng.random() < 0.5 else rng.randrange(0, 300_000)
    cached, write_5m, write_1h = (rng.randrange(0, input_tokens + 1) // 3 for _ in range(3))
    output = tokens(rng) if rng.random() < 0.3 else rng.randrange(0, 5_000)
    reasoning = rng.choice([0, output // 2, output])
    if rng.random() < 0.05:  # a broken count: negative, too large, or a subset above its total
        which = rng.choice(["input", "cached", "output", "reasoning"])
        bad = rng.choice([-1, MAX_TOKENS + 1, input_tokens + output + 1])
        input_tokens, cached, output, reasoning = (
            bad if which == name else value
            for name, value in (
                ("input", input_tokens),
                ("cached", cached),
                ("output", output),
                ("reasoning", reasoning),
            )
        )
    occurred = mostly(
        rng,
        NOW - timedelta(seconds=rng.randrange(0, 3_000_000)),
        *[
            PRICE_CHANGE,
            PRICE_CHANGE - timedelta(microseconds=1),
            NOW - timedelta(days=35, seconds=-1),
            NOW - timedelta(days=36),  # too old
            NOW + timedelta(minutes=4),
            NOW + timedelta(minutes=6),  # too far ahead
        ],
    )
    ts = Timestamp(
        seconds=int(occurred.timestamp()) // 1,
        nanos=occurred.microsecond * 1000 + rng.choice([0, 999]),
    )
    event_id = rng.choice(ids) if ids and rng.random() < 0.03 else unique("ev")
    if rng.random() < 0.02:
        event_id = rng.choice(["", " ", "x" * 129])
    ids.append(event_id)
    latency = mostly(rng, rng.randrange(300, 5_000), 0, 1, 86_400_000, 86_400_001, -1)
    ttft = mostly(rng, min(latency, 300), 0, latency, latency + 1)
    return usage_pb2.UsageEvent(
        event_id=event_id,
        occurred_at=ts,
        account_id=rng.choice(accounts),
        api_key_id=mostly(rng, "key-1", "", "kéy", "key\x07"),
        model=model,
        provider=provider,
        input_tokens=input_tokens,
        cached_input_tokens=cached,
        cache_write_5m_tokens=write_5m,
        cache_write_1h_tokens=write_1h,
        output_tokens=output,
        reasoning_tokens=reasoning,
        latency_ms=latency,
        ttft_ms=ttft,
        status=mostly(rng, 1, 0, 2, 3, 7),
        provider_usage_json=mostly(rng, "", '{"prompt_tokens": 12}', "é" * 9_000, "x" * 16_385),
    )


def records(
    values: list[bytes], partition: int, first_offset: int = 0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Records of a partition no other test uses: the rows a test wrote are found by it."""
    now_ms = int(NOW.timestamp() * 1000) + 123
    return [
        ConsumerRecord(
            "usage.events", partition, first_offset + i, now_ms, 0, b"k", v, None, 0, 0, []
        )
        for i, v in enumerate(values)
    ]


def running(connection: Warehouse) -> Iterator[PricingPipeline]:
    pipeline = PricingPipeline(Settings(), connection, "localhost:1")  # never connects
    pipeline.catalog = CATALOG
    for lane in pipeline.lanes:
        lane.create()
    yield pipeline
    for lane in pipeline.lanes:
        lane.drop()


@pytest.fixture(params=["chdb", "clickhouse-connect"])
def pipeline(
    request: pytest.FixtureRequest, warehouse: ChdbWarehouse, clickhouse_url: str
) -> Iterator[PricingPipeline]:
    if request.param == "chdb":
        yield from running(warehouse)
        return
    connection = ClickHouseWarehouse(clickhouse_url)
    yield from running(connection)
    connection.close()


@pytest.fixture
def embedded_pipeline(warehouse: ChdbWarehouse) -> Iterator[PricingPipeline]:
    """chDB only: for tests of many small batches (the HTTP path reads them alike)."""
    yield from running(warehouse)


def both_lanes(
    pipeline: PricingPipeline, batch: list[ConsumerRecord[bytes, bytes]]
) -> tuple[list[dict], list[dict], list[str], list[str]]:
    """(rows stored by the pipeline, rows of the Python lane, their dead-letter reasons)."""
    warehouse = pipeline.warehouse
    reference = unique("python_lane").replace("-", "_")
    warehouse.command(f"CREATE TABLE {reference} AS usage_events ENGINE = Memory")
    rows, dead = pipeline._prepare_rows(batch)
    warehouse.insert(reference, USAGE_EVENT_COLUMNS, rows)

    written = pipeline._write(batch, pipeline._prepare(batch), pipeline.lanes[0])

    columns = ", ".join(
        f"toString({c}) AS {c}" if c == "cost_usd" else c for c in USAGE_EVENT_COLUMNS
    )
    where = "kafka_partition = {p:Int32} AND kafka_offset IN {offsets:Array(Int64)}"
    params = {"p": batch[0].partition, "offsets": [r.offset for r in batch]}
    order = " ORDER BY kafka_offset"
    stored = warehouse.query(f"SELECT {columns} FROM usage_events WHERE {where}{order}", params)
    expected = warehouse.query(f"SELECT {columns} FROM {reference} WHERE {where}{order}", params)
    warehouse.command(f"DROP TABLE {reference}")
    assert written.events == len(stored)
    return stored, expected, [d.reason for d in written.dead], [d.reason for d in dead]


def test_the_engine_prices_and_checks_as_the_python_lane(pipeline: PricingPipeline) -> None:
    rng = random.Random(20261123)
    accounts = [unique("lane") for _ in range(5)]
    ids: list[str] = []
    values = [random_event(rng, accounts, ids).SerializeToString() for _ in range(3_000)]
    batch = records(values, next(PARTITIONS))

    rechecked = pipeline.lanes[1].stage(pipeline._prepare(batch))
    stored, expected, dead, expected_dead = both_lanes(pipeline, batch)

    assert stored == expected
    assert dead == expected_dead
    # the test means something only if both lanes did real work
    assert len(stored) > 1_000 and len(dead) > 100
    assert len(batch) * 0.3 < len(batch) - len(rechecked)
    assert {r["price_tier"] for r in stored} >= {"base", ">200000", ">1000000", ""}
    assert len({r["price_id"] for r in stored}) == 8  # 7 versions in force, "" unpriced


def test_records_the_engine_cannot_parse_are_judged_by_python(
    embedded_pipeline: PricingPipeline,
) -> None:
    """Damaged bytes, one record a batch: same row or same reason as the Python lane."""
    pipeline = embedded_pipeline
    rng = random.Random(7)
    accounts = [unique("mangled")]
    good = [random_event(rng, accounts, []) for _ in range(150)]
    partition = next(PARTITIONS)
    for i, event in enumerate(good):
        value = bytearray(event.SerializeToString())
        for _ in range(rng.choice([1, 1, 2, 3])):
            position = rng.randrange(len(value))
            value[position] = rng.choice([0, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        if rng.random() < 0.2:
            value = value[: rng.randrange(len(value))]
        stored, expected, dead, expected_dead = both_lanes(
            pipeline, records([bytes(value)], partition, first_offset=i)
        )
        assert (stored, dead) == (expected, expected_dead), bytes(value)


#: field 50, varint 1: what a gateway on a newer contract may send; protobuf sets it
#: aside, so these records go to the Python lane, whose rows must be found on replay too
NEWER_FIELD = bytes([50 << 3 & 0x7F | 0x80, 50 << 3 >> 7, 1])


@pytest.mark.parametrize("extra", [b"", NEWER_FIELD], ids=["contract", "newer-contract"])
def test_replayed_records_are_duplicates_not_new_rows(
    pipeline: PricingPipeline, extra: bytes
) -> None:
    rng = random.Random(3)
    accounts = [unique("replay")]
    values = [random_event(rng, accounts, []).SerializeToString() + extra for _ in range(200)]
    batch = records(values, next(PARTITIONS))
    first = pipeline._write(batch, pipeline._prepare(batch), pipeline.lanes[0])
    again = pipeline._write(batch, pipeline._prepare(batch), pipeline.lanes[0])
    stored = pipeline.warehouse.query(
        "SELECT count() AS n FROM usage_events WHERE account_id = {a:String}", {"a": accounts[0]}
    )
    assert first.events > 100 and again.events == 0
    assert stored == [{"n": first.events}]
    assert len(again.dead) == len(first.dead)


def test_staging_schema_follows_the_contract() -> None:
    from pipelines.pricing.in_warehouse import KAFKA_FIELDS, STAGING_SCHEMA

    event = usage_pb2.UsageEvent.DESCRIPTOR
    for field in event.fields:
        assert f" {field.name} = {field.number};" in STAGING_SCHEMA
    taken = {f.number for f in event.fields}
    assert not taken & {number for _, number, _ in KAFKA_FIELDS}


def scratch_tables(warehouse: Warehouse) -> dict[str, str]:
    rows = warehouse.query(
        "SELECT name, comment FROM system.tables"
        " WHERE database = currentDatabase() AND name LIKE 'pipeline%'"
    )
    return {row["name"]: row["comment"] for row in rows}


async def test_scratch_tables_left_behind_are_dropped_and_live_ones_kept(
    pipeline: PricingPipeline,
) -> None:
    warehouse = pipeline.warehouse
    # an instance killed long ago, and one of a release before the comment
    killed = WarehouseLane(warehouse, Settings().events)
    killed.create()
    for table in killed.tables:
        warehouse.command(
            f"ALTER TABLE {table} MODIFY COMMENT"
            " 'meterline pipeline scratch table, alive at 2026-01-02 03:04:05 UTC'"
        )
    legacy = f"pipeline_{uuid.uuid4().hex[:12]}_fresh"
    warehouse.command(f"CREATE TABLE {legacy} AS usage_events ENGINE = Memory")
    # not a scratch table, whatever its name says
    bystander = unique("pipeline_notes").replace("-", "_")
    warehouse.command(f"CREATE TABLE {bystander} (note String) ENGINE = Memory")
    # this instance's own, after a silence that outlived them
    warehouse.command(
        f"ALTER TABLE {pipeline.lanes[1].staged} MODIFY COMMENT"
        " 'meterline pipeline scratch table, alive at 2026-01-02 03:04:05 UTC'"
    )

    await pipeline._tend_scratch(force=True)

    tables = scratch_tables(warehouse)
    assert not set(killed.tables) & set(tables)
    assert legacy not in tables
    assert bystander in tables
    own = [t for lane in pipeline.lanes for t in lane.tables]
    assert set(own) <= set(tables)
    assert all("2026-01-02" not in tables[t] for t in own)  # said alive again
    warehouse.command(f"DROP TABLE {bystander}")


def test_a_lane_whose_tables_were_dropped_makes_them_again(pipeline: PricingPipeline) -> None:
    """An instance silent past the limit loses its scratch tables, not its engine lane."""
    lane = pipeline.lanes[0]
    lane.drop()
    rng = random.Random(11)
    values = [random_event(rng, [unique("dropped")], []).SerializeToString() for _ in range(300)]
    batch = records(values, next(PARTITIONS))

    rechecks = lane.stage(pipeline._prepare(batch))

    assert len(rechecks) < 150  # the engine checked the batch: its tables are back
    assert set(lane.tables) <= set(scratch_tables(pipeline.warehouse))
