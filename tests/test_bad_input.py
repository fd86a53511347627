"""One bad record, price or outage never stops billing for the others, nor loses it."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from conftest import Stack, event, unique
from meterline.lib.metrics import serve_metrics
from meterline.lib.warehouse import WarehouseError
from pipelines.pricing.pipeline import DEAD_LETTER_MAX_BYTES, PricingPipeline


async def test_a_record_over_a_mebibyte_is_dead_lettered_cut_and_the_line_goes_on(
    stack: Stack, account_id: str
) -> None:
    settings = stack.settings
    huge = b"\x08" + b"x" * (3 << 20)  # 3 MiB that no UsageEvent parses
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, max_request_size=8 << 20
    )
    await producer.start()
    try:
        await producer.send_and_wait(settings.kafka.topic, huge, key=account_id.encode())
    finally:
        await producer.stop()
    pipeline = stack.start_pipeline()
    await stack.report(event(account_id, input_tokens=1_000_000))

    usage = await stack.wait_for_requests(account_id, 1)
    assert usage["totals"]["cost_usd"] == "0.4"  # billed after the oversize record
    await stack.eventually(lambda: pipeline.metrics.dead_lettered == 1)

    consumer = AIOKafkaConsumer(
        settings.kafka.dead_letter_topic,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        group_id=unique("dlq-reader"),
    )
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=10_000)
    finally:
        await consumer.stop()
    [letter] = [r for records in batch.values() for r in records]
    headers = {k: v.decode() for k, v in letter.headers}
    assert headers["truncated"] == "true"
    assert headers["original.size"] == str(len(huge))
    assert headers["original.sha256"] == hashlib.sha256(huge).hexdigest()
    assert letter.value == huge[:DEAD_LETTER_MAX_BYTES]
    assert "UsageEvent" in headers["reason"]


async def test_a_bad_stored_price_is_skipped_and_every_account_keeps_billing(
    stack: Stack, account_id: str
) -> None:
    """A version stored before the bounds existed (rate 1e30) must not stop billing."""
    model, price_id = unique("absurd"), "pv_" + unique("bad")
    stack.warehouse.insert(
        "price_versions",
        ("price_id", "model", "provider", "effective_from", "created_at", "source", "spec_json"),
        [
            (
                price_id,
                model,
                "acme",
                datetime(2025, 1, 1, tzinfo=UTC),
                datetime.now(UTC),
                "manual",
                json.dumps({"rates": {"input": "1e30", "output": "1"}, "tiers": []}),
            )
        ],
    )
    pipeline = stack.start_pipeline()
    await stack.report(
        event(account_id, model=model, provider="acme", input_tokens=1_000),
        event(account_id, input_tokens=1_000_000),
    )

    usage = await stack.wait_for_requests(account_id, 2)
    assert usage["totals"]["unpriced_requests"] == 1  # kept, re-priceable once a sane price exists
    assert usage["totals"]["cost_usd"] == "0.4"
    assert any(model in str(v) for v in pipeline.catalog.skipped)
    # other tests load the same catalog: leave it as it was
    stack.warehouse.command(
        "DELETE FROM price_versions WHERE price_id = {p:String}", {"p": price_id}
    )


async def test_stopping_while_the_warehouse_is_down_keeps_trying_then_writes_all(
    stack: Stack, account_id: str, monkeypatch: Any
) -> None:
    """What `meterline up` does on Ctrl-C with a broker that forgets: drain, through an outage."""
    pipeline = PricingPipeline(stack.settings, stack.warehouse, stack.settings.bootstrap_servers)
    store = pipeline.sink.store
    real_insert = store.insert_priced
    failures = 0

    def insert_priced(events: Any) -> None:
        nonlocal failures
        if failures < 3:
            failures += 1
            raise WarehouseError("Code: 210. DB::NetException: Connection refused")
        real_insert(events)

    monkeypatch.setattr(store, "insert_priced", insert_priced)
    monkeypatch.setattr(store, "reachable", lambda: False)  # an outage, not a refusal
    await stack.report(*(event(account_id, input_tokens=1_000_000) for _ in range(4)))
    stop = asyncio.Event()
    stop.set()  # asked to stop before the first batch is written
    await asyncio.wait_for(pipeline.run(stop, drain_s=30), timeout=60)

    usage = await stack.wait_for_requests(account_id, 4, timeout_s=1)
    assert usage["totals"]["requests"] == 4
    assert pipeline.metrics.write_retries == 3


async def test_the_pipeline_metrics_parse_as_prometheus_text(stack: Stack, account_id: str) -> None:
    registry = CollectorRegistry()
    pipeline = PricingPipeline(
        stack.settings, stack.warehouse, stack.settings.bootstrap_servers, registry=registry
    )
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop))
    server = serve_metrics(registry, "127.0.0.1", 0)
    try:
        await stack.report(event(account_id, input_tokens=10), event(account_id, model="nope"))
        await stack.eventually(lambda: pipeline.metrics.consumed == 2)

        def scrape() -> str:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as answer:
                return str(answer.read().decode())

        text = await asyncio.to_thread(scrape)
    finally:
        server.close()
        stop.set()
        await task
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("meterline_pipeline_events_total", (("outcome", "consumed"),))] == 2
    assert samples[("meterline_pipeline_events_total", (("outcome", "priced"),))] == 1
    assert samples[("meterline_pipeline_events_total", (("outcome", "unpriced"),))] == 1
    assert samples[("meterline_pipeline_flushes_total", ())] >= 1
    steps = {
        labels[0][1]
        for name, labels in samples
        if name == "meterline_pipeline_flush_step_seconds_count"
    }
    assert steps == {"decode", "price", "dedupe", "write", "handlers"}
