"""Drain a pre-filled usage topic into ClickHouse; compare with a raw consume.

Run by hand (``make bench``), not in CI. One run starts a Tansu broker and a
fresh chDB directory, produces N usage events, then in the same run measures:

* raw: an aiokafka consumer reading the topic to the end (bytes only), and
* pipeline: the pricing pipeline, from start to the last commit, with
  decode, validation, dedupe, pricing and the ClickHouse inserts, and
* Python's share: the same consume plus the pipeline's per-record work in
  this process (checking and framing each value for the engine), with the
  warehouse left out: the most the pipeline can reach in one process, where
  ever ClickHouse runs.

Each is repeated; the medians and their ratio are printed. The machine is
shared and noisy, so the ratio is the figure to compare between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from meterline.catalog import PriceBook
from meterline.lib.kafka import EmbeddedBroker, ensure_topics, free_port, start_producer
from meterline.lib.settings import KafkaSettings, PipelineSettings, Settings
from meterline.lib.warehouse.chdb import ChdbWarehouse
from meterline.lib.warehouse.schema import migrate
from pipelines.pricing.in_warehouse import encode_records
from pipelines.pricing.pipeline import PricingPipeline
from services.simulate import Gateway


async def fill(settings: Settings, events: int) -> None:
    gateway = Gateway(accounts=200, seed=1, run_tag="bench")
    producer = await start_producer(settings.bootstrap_servers, settings.kafka)
    try:
        sends = []
        for _ in range(events):
            e = gateway.event()
            sends.append(
                await producer.send(
                    settings.kafka.topic, key=e.account_id.encode(), value=e.SerializeToString()
                )
            )
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def raw_consume(settings: Settings, events: int, *, frame: bool = False) -> float:
    """Seconds to read the topic to the end; with ``frame``, also encode each batch."""
    consumer = AIOKafkaConsumer(
        settings.kafka.topic,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=f"raw-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 << 20,
        fetch_max_bytes=32 << 20,
    )
    await consumer.start()
    try:
        # Wait for the assignment, so both measurements exclude the group join.
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
        await consumer.seek_to_beginning()
        started, seen = time.perf_counter(), 0
        while seen < events:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=5000)
            if frame:
                records = [r for rs in fetched.values() for r in rs]
                encode_records(records)
                seen += len(records)
            else:
                seen += sum(len(records) for records in fetched.values())
        return time.perf_counter() - started
    finally:
        await consumer.stop()


async def pipeline_drain(settings: Settings, warehouse: ChdbWarehouse, events: int) -> float:
    group = f"pricing-{uuid.uuid4().hex[:6]}"
    run_settings = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"consumer_group": group})}
    )
    # A fresh group re-reads the same events: dedupe would skip them all, so
    # each run clears the warehouse to measure the full write path.
    for table in ("usage_events", "dedupe_keys", "usage_hourly"):
        warehouse.command(f"TRUNCATE TABLE {table}")
    pipeline = PricingPipeline(run_settings, warehouse, settings.bootstrap_servers)
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop))
    while pipeline._consumer is None or not pipeline._consumer.assignment():
        await asyncio.sleep(0.01)
    started = time.perf_counter()
    while pipeline.metrics.consumed < events:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    rows = warehouse.query("SELECT count() AS n FROM usage_events")[0]["n"]
    assert int(rows) == events, f"{rows} rows for {events} events"
    return elapsed


async def main(events: int, repeats: int, batch: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(free_port()) as broker:
        settings = Settings(
            data_dir=Path(tmp),
            kafka=KafkaSettings(bootstrap_servers=broker.bootstrap_servers, partitions=6),
            pipeline=PipelineSettings(**({"max_batch_events": batch} if batch else {})),
        )
        warehouse = ChdbWarehouse(Path(tmp) / "chdb")
        migrate(warehouse)
        PriceBook(warehouse).seed_if_empty()
        await ensure_topics(settings.bootstrap_servers, settings.kafka)
        await fill(settings, events)
        raw, piped, framed = [], [], []
        for _ in range(repeats):
            raw.append(await raw_consume(settings, events))
            piped.append(await pipeline_drain(settings, warehouse, events))
            framed.append(await raw_consume(settings, events, frame=True))
        raw_rate, pipe_rate, framed_rate = (
            events / statistics.median(runs) for runs in (raw, piped, framed)
        )
        print(f"events: {events}, repeats: {repeats}, batch: {settings.pipeline.max_batch_events}")
        print(f"raw aiokafka consume:       {raw_rate:,.0f} events/s (median)")
        print(f"pricing pipeline:           {pipe_rate:,.0f} events/s (median)")
        print(f"ratio pipeline/raw:         {pipe_rate / raw_rate:.2f}")
        print(f"consume + check and frame:  {framed_rate:,.0f} events/s (median, no warehouse)")
        print(f"ratio of that to raw:       {framed_rate / raw_rate:.2f} (the one-process ceiling)")
        warehouse.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, help="max_batch_events (default: the setting's)")
    args = parser.parse_args()
    asyncio.run(main(args.events, args.repeats, args.batch))
    sys.exit(0)
