"""Time the parts of one pipeline flush, alone: no Kafka, no overlap.

Run by hand. Builds batches of ``simulate`` events as Kafka records, then
times, each as the median of ``--repeats``:

* decode and validate, per event (the checks ingest runs too);
* ``_prepare``: decode, validate, in-batch dedupe and pricing, per event;
* the dedupe lookup in ``event_keys`` (of new events, the usual case) and
  the insert, per batch, into a chDB that already holds ``--stored`` batches.

``pipeline_throughput.py`` says how fast the whole runs; this says where a
batch's time goes, so a change to one part can be measured on its own.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

from aiokafka import ConsumerRecord

from meterline.catalog import PriceBook
from meterline.config import Settings
from meterline.events import decode, validate
from meterline.pipelines.pricing.pipeline import PricingPipeline
from meterline.simulate import Gateway
from meterline.warehouse import USAGE_EVENT_COLUMNS
from meterline.warehouse.chdb import ChdbWarehouse
from meterline.warehouse.schema import migrate


def median_s(repeats: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(size: int, repeats: int, stored: int) -> None:
    gateway = Gateway(accounts=200, seed=1, run_tag="parts")
    offsets = iter(range(0, 1 << 40, size))

    def records() -> list[ConsumerRecord[bytes, bytes]]:
        first, now_ms = next(offsets), int(time.time() * 1000)
        values = [gateway.event().SerializeToString() for _ in range(size)]
        return [
            ConsumerRecord("usage", i % 6, first + i, now_ms, 0, None, v, None, len(v), 0, [])
            for i, v in enumerate(values)
        ]

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp))
        warehouse = ChdbWarehouse(Path(tmp) / "chdb")
        migrate(warehouse)
        PriceBook(warehouse).seed_if_empty()
        pipeline = PricingPipeline(settings, warehouse, "unused:9092")
        pipeline.catalog = pipeline.price_book.load()
        prepare = pipeline._prepare
        for _ in range(stored):
            warehouse.insert("usage_events", USAGE_EVENT_COLUMNS, prepare(records())[0])
        batch = records()
        now, rules = datetime.now(UTC), settings.events
        events = [decode(r.value) for r in batch]
        per_event = 1e6 / size
        decoding = median_s(repeats, lambda: [decode(r.value) for r in batch])
        checking = median_s(repeats, lambda: [validate(e, now=now, rules=rules) for e in events])
        preparing = median_s(repeats, lambda: prepare(batch))
        fresh_rows = [prepare(records())[0] for _ in range(repeats)]
        # the lookup alone: _write with an insert that does nothing
        pipeline.warehouse = SimpleNamespace(query=warehouse.query, insert=lambda *_: None)  # type: ignore[assignment]
        looking_up = median_s(repeats, lambda: pipeline._write(fresh_rows[0]))
        fresh = iter(fresh_rows)
        inserting = median_s(
            repeats, lambda: warehouse.insert("usage_events", USAGE_EVENT_COLUMNS, next(fresh))
        )
        warehouse.close()
    print(f"batch: {size} events, repeats: {repeats}, already stored: {stored * size}")
    print(f"decode:         {decoding * per_event:6.1f} µs/event")
    print(f"validate:       {checking * per_event:6.1f} µs/event")
    print(f"_prepare:       {preparing * per_event:6.1f} µs/event ({preparing * 1000:.0f} ms)")
    print(f"dedupe lookup:  {looking_up * 1000:6.1f} ms/batch")
    print(f"insert:         {inserting * 1000:6.1f} ms/batch")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stored", type=int, default=10, help="batches stored beforehand")
    args = parser.parse_args()
    main(args.batch, args.repeats, args.stored)
