"""The ingest gRPC service: streaming reports, keying, health and reflection."""

from __future__ import annotations

import grpc
from aiokafka import AIOKafkaConsumer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import Stack, event, unique
from meterline.v1 import ingest_pb2


async def test_stream_usage_answers_for_every_event_in_order(stack: Stack, account_id: str) -> None:
    batches = [
        [event(account_id, input_tokens=1), event(account_id, input_tokens=-1)],
        [event(account_id, input_tokens=2)],
    ]

    async def requests():  # type: ignore[no-untyped-def]
        for events in batches:
            yield ingest_pb2.StreamUsageRequest(events=events)

    response = await stack.ingest.StreamUsage(requests())

    assert (response.accepted, response.rejected) == (2, 1)
    assert [(r.index, r.accepted) for r in response.results] == [(0, True), (1, False), (2, True)]
    assert [r.event_id for r in response.results] == [e.event_id for b in batches for e in b]
    assert response.results[1].reason == "input_tokens is negative (-1)"


async def test_a_report_over_the_size_limit_is_refused_whole(stack: Stack, account_id: str) -> None:
    limit = stack.settings.grpc.max_events_per_request
    too_many = [event(account_id)] * (limit + 1)
    try:
        await stack.report(*too_many)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"the limit is {limit}" in (exc.details() or "")
    else:
        raise AssertionError("an oversize report was accepted")


async def test_one_accounts_events_stay_on_one_partition(stack: Stack) -> None:
    accounts = [unique("acct") for _ in range(8)]
    await stack.report(*(event(a) for a in accounts for _ in range(5)))
    consumer = AIOKafkaConsumer(
        stack.settings.kafka.topic,
        bootstrap_servers=stack.settings.bootstrap_servers,
        auto_offset_reset="earliest",
        group_id=unique("reader"),
    )
    await consumer.start()
    partitions: dict[str, set[int]] = {}
    try:
        while sum(len(p) for p in partitions.values()) < 8 or len(partitions) < 8:
            batch = await consumer.getmany(timeout_ms=5000)
            assert batch, "the reported events did not arrive"
            for records in batch.values():
                for r in records:
                    partitions.setdefault(r.key.decode(), set()).add(r.partition)
    finally:
        await consumer.stop()
    assert set(partitions) == set(accounts)
    assert all(len(p) == 1 for p in partitions.values())
    assert len({p for ps in partitions.values() for p in ps}) > 1  # and accounts spread out


async def test_health_and_reflection_are_served(stack: Stack) -> None:
    health = health_pb2_grpc.HealthStub(stack.channel)
    status = await health.Check(health_pb2.HealthCheckRequest(service="meterline.v1.IngestService"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(stack.channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    async for response in responses:
        names = {s.name for s in response.list_services_response.service}
        assert "meterline.v1.IngestService" in names
        assert "grpc.health.v1.Health" in names
        break
