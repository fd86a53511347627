"""Events reported over gRPC, through Kafka and the pipeline, priced in the warehouse."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

from conftest import Stack, event
from meterline.v1 import usage_pb2


async def test_seed_prices_gpt_4_1_mini_exactly(stack: Stack, account_id: str) -> None:
    stack.start_pipeline()
    response = await stack.report(
        # 1M input + 1M output at $0.40 / $1.60 per million: $2.00
        event(account_id, input_tokens=1_000_000, output_tokens=1_000_000),
        # 6,000 uncached at $0.40, 4,000 cache reads at $0.10, 2,000 output at $1.60
        event(account_id, input_tokens=10_000, cached_input_tokens=4_000, output_tokens=2_000),
        # without the vendor prefix, same price
        event(account_id, model="gpt-4.1-mini", input_tokens=1, output_tokens=1),
    )
    assert (response.accepted, response.rejected) == (3, 0)

    usage = await stack.wait_for_requests(account_id, 3)

    totals = usage["totals"]
    assert totals["requests"] == 3
    assert totals["input_tokens"] == 1_010_001
    assert totals["cached_input_tokens"] == 4_000
    assert totals["output_tokens"] == 1_002_001
    assert totals["unpriced_requests"] == 0
    # 2 + 0.006 + 0.0000004 + 0.0000016
    assert totals["cost_usd"] == "2.006002"


async def test_a_report_sent_twice_counts_once(stack: Stack, account_id: str) -> None:
    stack.start_pipeline()
    events = [event(account_id, input_tokens=100, output_tokens=10) for _ in range(5)]
    await stack.report(*events)
    await stack.wait_for_requests(account_id, 5)
    await stack.report(*events)  # the gateway retried: same event ids
    await stack.report(events[0])
    await asyncio.sleep(1.0)  # let the pipeline see and drop the replays

    usage = await stack.wait_for_requests(account_id, 6, timeout_s=1)

    assert usage["totals"]["requests"] == 5
    assert usage["totals"]["input_tokens"] == 500
    metrics = stack.pipelines[0][0].metrics
    await stack.eventually(lambda: metrics.duplicates == 6)


async def test_unknown_model_is_stored_unpriced(stack: Stack, account_id: str) -> None:
    stack.start_pipeline()
    await stack.report(
        event(
            account_id,
            model="acme/unknown-model-9",
            provider="acme",
            input_tokens=7,
            output_tokens=3,
        ),
        event(account_id, input_tokens=1_000_000, output_tokens=0),
    )

    usage = await stack.wait_for_requests(account_id, 2)

    assert usage["totals"]["requests"] == 2
    assert usage["totals"]["unpriced_requests"] == 1
    assert usage["totals"]["input_tokens"] == 1_000_007
    assert usage["totals"]["cost_usd"] == "0.4"
    metrics = stack.pipelines[0][0].metrics
    await stack.eventually(lambda: metrics.unpriced == 1)
    rows = stack.warehouse.query(
        "SELECT priced, price_id, toString(cost_usd) AS cost FROM usage_events "
        "WHERE account_id = {a:String} AND provider = 'acme'",
        {"a": account_id},
    )
    assert rows == [{"priced": 0, "price_id": "", "cost": "0"}]


async def test_malformed_records_go_to_the_dead_letter_topic(stack: Stack, account_id: str) -> None:
    settings = stack.settings
    bad_counts = event(account_id, input_tokens=10, cached_input_tokens=50)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.kafka.topic, b'{"not": "protobuf"}', key=account_id.encode()
        )
        await producer.send_and_wait(
            settings.kafka.topic, bad_counts.SerializeToString(), key=account_id.encode()
        )
        await producer.send_and_wait(settings.kafka.topic, b"", key=account_id.encode())
    finally:
        await producer.stop()
    stack.start_pipeline()
    await stack.report(event(account_id, input_tokens=1_000_000))  # after the bad ones

    usage = await stack.wait_for_requests(account_id, 1)
    assert usage["totals"]["cost_usd"] == "0.4"  # the pipeline kept going

    consumer = AIOKafkaConsumer(
        settings.kafka.dead_letter_topic,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        group_id=f"{settings.kafka.consumer_group}-dlq-reader",
    )
    await consumer.start()
    try:
        letters: list[ConsumerRecord[bytes, bytes]] = []
        while len(letters) < 3:
            batch = await consumer.getmany(timeout_ms=5000)
            assert batch, f"only {len(letters)} dead letters arrived"
            letters.extend(r for records in batch.values() for r in records)
    finally:
        await consumer.stop()
    reasons = sorted(dict(r.headers)["reason"].decode() for r in letters)
    assert reasons[0].startswith("cached and cache-write tokens (50) exceed input_tokens (10)")
    assert reasons[1].startswith("empty record")
    assert "meterline.v1.UsageEvent" in reasons[2]
    assert {dict(r.headers)["source.topic"].decode() for r in letters} == {settings.kafka.topic}
    metrics = stack.pipelines[0][0].metrics
    await stack.eventually(lambda: metrics.dead_lettered == 3)


async def test_ingest_rejects_bad_events_with_their_reasons(stack: Stack, account_id: str) -> None:
    now = datetime.now(UTC)
    cases = {
        "event_id is missing": event(account_id, event_id=" "),
        "account_id is missing": event(""),
        "input_tokens is negative (-5)": event(account_id, input_tokens=-5),
        "output_tokens is 1000000000, above the limit": event(
            account_id, output_tokens=1_000_000_000
        ),
        "exceed input_tokens": event(account_id, input_tokens=10, cached_input_tokens=11),
        "reasoning_tokens (9) exceed output_tokens (8)": event(
            account_id, output_tokens=8, reasoning_tokens=9
        ),
        "days in the past": event(account_id, occurred_at=now - timedelta(days=36)),
        "s in the future": event(account_id, occurred_at=now + timedelta(minutes=10)),
        "model is longer than 256 characters": event(account_id, model="m" * 300),
        "occurred_at is missing": usage_pb2.UsageEvent(
            event_id="e", account_id=account_id, model="gpt-4.1-mini", provider="openai"
        ),
    }
    good = event(account_id, input_tokens=1)

    response = await stack.report(*cases.values(), good)

    assert response.accepted == 1
    assert response.rejected == len(cases)
    for (expected, _), result in zip(cases.items(), response.results, strict=False):
        assert not result.accepted
        assert expected in result.reason, result.reason
    assert response.results[-1].accepted
    assert response.results[-1].reason == ""
    assert [r.index for r in response.results] == list(range(len(cases) + 1))


async def test_what_ingest_accepted_near_the_lateness_bound_is_billed_later(
    stack: Stack, account_id: str
) -> None:
    """Lateness is judged once, at ingest: a pipeline that runs later never refuses it."""
    stack.settings.events.max_past = timedelta(seconds=3)  # ingest and pipeline share the rules
    late = event(account_id, occurred_at=datetime.now(UTC) - timedelta(seconds=2), input_tokens=10)
    answer = await stack.report(late)
    assert answer.accepted == 1
    await asyncio.sleep(1.5)  # by the pipeline's own clock the event is now too old
    pipeline = stack.start_pipeline()

    usage = await stack.wait_for_requests(account_id, 1)
    assert usage["totals"]["requests"] == 1
    assert pipeline.metrics.dead_lettered == 0


async def test_a_batch_is_written_once_nothing_more_waits_not_at_the_longest_wait(
    stack: Stack, account_id: str
) -> None:
    """A lone event is stored in about a write's time, not after max_batch_wait_ms (here
    an hour); a burst still goes in a few batches, not one per event."""
    stack.settings.pipeline.max_batch_wait_ms = 3_600_000
    stack.settings.pipeline.min_batch_wait_ms = 50
    pipeline = stack.start_pipeline()
    await stack.report(event(account_id, input_tokens=10, output_tokens=1))
    body = await stack.wait_for_requests(account_id, 1, timeout_s=30)
    assert body["totals"]["requests"] == 1  # stored with an hour still to wait

    before = pipeline.metrics.flushes
    burst = [event(account_id, input_tokens=10, output_tokens=1) for _ in range(2_000)]
    await stack.report(*burst)
    body = await stack.wait_for_requests(account_id, 2_001, timeout_s=60)
    assert body["totals"]["requests"] == 2_001
    assert pipeline.metrics.flushes - before < 50  # batched: at most a few dozen writes
