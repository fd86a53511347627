"""Drain a pre-filled usage topic into ClickHouse; compare with a raw consume.

Run by hand (``make bench``), not in CI. One run starts a Tansu broker and a
fresh chDB directory, produces N usage events, then in the same run measures:

* raw: an aiokafka consumer reading the topic to the end (bytes only), and
* pipeline: the pricing pipeline, from its first fetch to the last commit,
  with decode, validation, pricing, dedupe, the ClickHouse insert and the
  rollup recount,

and, for the pipeline, the process's CPU time per event and the time of
each flush step per event (the steps run on one worker thread, so their
time is what that thread spent, engine calls included). Each is repeated;
the medians and their ratio are printed. The machine is shared and noisy,
so the ratio is the figure to compare between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from prometheus_client import CollectorRegistry

from meterline.catalog import PriceBook
from meterline.lib.kafka import EmbeddedBroker, ensure_topics, free_port, start_producer
from meterline.lib.settings import KafkaSettings, PipelineSettings, Settings
from meterline.lib.warehouse.chdb import ChdbWarehouse
from meterline.lib.warehouse.schema import migrate
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


async def raw_consume(settings: Settings, events: int) -> float:
    """Seconds to read the topic to the end."""
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
            seen += sum(len(records) for records in fetched.values())
        return time.perf_counter() - started
    finally:
        await consumer.stop()


@dataclass
class Drain:
    seconds: float
    cpu_us_per_event: float
    step_us_per_event: dict[str, float]


async def pipeline_drain(settings: Settings, warehouse: ChdbWarehouse, events: int) -> Drain:
    group = f"pricing-{uuid.uuid4().hex[:6]}"
    run_settings = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"consumer_group": group})}
    )
    # A fresh group re-reads the same events: dedupe would skip them all, so
    # each run clears the warehouse to measure the full write path.
    for table in ("usage_events", "dedupe_keys", "usage_minutely"):
        warehouse.command(f"TRUNCATE TABLE {table}")
    registry = CollectorRegistry()
    pipeline = PricingPipeline(
        run_settings, warehouse, settings.bootstrap_servers, registry=registry
    )
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop))
    while pipeline._consumer is None or not pipeline._consumer.assignment():
        await asyncio.sleep(0.01)
    started, cpu_started = time.perf_counter(), time.process_time()
    while pipeline.metrics.consumed < events:
        await asyncio.sleep(0.005)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    stop.set()
    await task
    rows = warehouse.query("SELECT count() AS n FROM usage_events FINAL")[0]["n"]
    assert int(rows) == events, f"{rows} rows for {events} events"
    steps = {
        sample.labels["step"]: sample.value * 1e6 / events
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "meterline_pipeline_flush_step_seconds_sum"
    }
    return Drain(elapsed, cpu * 1e6 / events, steps)


async def main(events: int, repeats: int, batch: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(free_port()) as broker:
        settings = Settings(
            data_dir=Path(tmp),
            kafka=KafkaSettings(bootstrap_servers=broker.bootstrap_servers, partitions=6),
            pipeline=PipelineSettings(max_batch_events=batch) if batch else PipelineSettings(),
        )
        warehouse = ChdbWarehouse(Path(tmp) / "chdb")
        migrate(warehouse)
        PriceBook(warehouse).seed_if_empty()
        await ensure_topics(settings.bootstrap_servers, settings.kafka)
        await fill(settings, events)
        raw: list[float] = []
        drains: list[Drain] = []
        for _ in range(repeats):
            raw.append(await raw_consume(settings, events))
            drains.append(await pipeline_drain(settings, warehouse, events))
        raw_rate = events / statistics.median(raw)
        pipe_rate = events / statistics.median(d.seconds for d in drains)
        print(f"events: {events}, repeats: {repeats}, batch: {settings.pipeline.max_batch_events}")
        print(f"raw aiokafka consume:   {raw_rate:,.0f} events/s (median)")
        print(f"pricing pipeline:       {pipe_rate:,.0f} events/s (median)")
        print(f"ratio pipeline/raw:     {pipe_rate / raw_rate:.2f}")
        cpu = statistics.median(d.cpu_us_per_event for d in drains)
        print(f"pipeline process CPU:   {cpu:.1f} µs an event (median; broker not included)")
        for step in drains[0].step_us_per_event:
            us = statistics.median(d.step_us_per_event.get(step, 0.0) for d in drains)
            print(f"  flush step {step:<9} {us:5.1f} µs an event")
        warehouse.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, help="max_batch_events (default: the setting's)")
    args = parser.parse_args()
    asyncio.run(main(args.events, args.repeats, args.batch))
    sys.exit(0)
