"""The ingest gRPC service: streaming reports, keying, health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TypedDict, Unpack

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from conftest import Stack, event, unique
from meterline.accounts import Authenticator, KeyRing
from meterline.accounts.directory import AccountDirectory
from meterline.accounts.grpc import key_channel
from meterline.accounts.manage import IssuedKey
from meterline.lib.kafka import ensure_topics, free_port, start_producer
from meterline.lib.logging import JsonFormatter, configure_logging
from meterline.lib.metrics import CollectorRegistry, serve_metrics
from meterline.lib.settings import EventRules, IngestSettings, Settings
from meterline.usage import decode, validate
from meterline.v1 import ingest_pb2, ingest_pb2_grpc, usage_pb2
from services import cli
from services.ingest.server import IngestServer
from services.simulate import simulate

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def test_stream_usage_answers_for_every_event_in_order(stack: Stack, account_id: str) -> None:
    batches = [
        [event(account_id, input_tokens=1), event(account_id, input_tokens=-1)],
        [event(account_id, input_tokens=2)],
    ]

    async def requests() -> AsyncIterator[ingest_pb2.StreamUsageRequest]:
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


# --- one ingest server of a test's own: its limits, clock and metrics ------------------


class Limits(TypedDict, total=False):
    """The limits of an ingest server of a test's own (IngestSettings' fields)."""

    max_concurrent_rpcs: int
    max_events_per_request: int
    max_message_bytes: int


class OwnIngest:
    """Starts IngestServers of a test's own, checking keys with ``auth``; their
    channels present ``key`` (None: no key)."""

    def __init__(self, auth: Authenticator, key: str | None) -> None:
        self.auth = auth
        self.key = key

    @contextlib.asynccontextmanager
    async def __call__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        directory: AccountDirectory | None = None,
        **limits: Unpack[Limits],
    ) -> AsyncIterator[tuple[grpc.aio.Channel, str]]:
        """An IngestServer on the test's topic, as ``meterline ingest`` runs one: a
        channel to it, and its address."""
        await ensure_topics(settings.bootstrap_servers, settings.kafka)
        producer = await start_producer(settings.bootstrap_servers, settings.kafka)
        server = IngestServer(
            producer,
            topic=settings.kafka.topic,
            rules=settings.events,
            settings=IngestSettings(port=0, **limits),
            auth=self.auth,
            directory=directory,
            registry=registry,
            clock_ns=clock_ns,
        )
        await server.start()
        channel = key_channel(server.address, self.key)
        try:
            yield channel, server.address
        finally:
            await channel.close(grace=None)
            await server.stop()
            await producer.stop()


@pytest.fixture
def own_ingest(key_ring: KeyRing, service_key: IssuedKey) -> OwnIngest:
    """Ingest servers of the test's own, on the session's keys, as gateway."""
    return OwnIngest(key_ring, service_key.secret)


async def produced(settings: Settings, at_least: int) -> list[ConsumerRecord[bytes, bytes]]:
    """The records on the test's topic: ``at_least`` of them, and any that follow soon."""
    consumer = AIOKafkaConsumer(
        settings.kafka.topic,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        group_id=unique("reader"),
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=5000 if len(records) < at_least else 500)
            if not batch:
                break
            records.extend(r for rs in batch.values() for r in rs)
    finally:
        await consumer.stop()
    assert len(records) >= at_least, f"only {len(records)} of {at_least} records arrived"
    return records


def raw_report(
    channel: grpc.aio.Channel, method: str = "ReportUsage"
) -> grpc.aio.UnaryUnaryMultiCallable[bytes, ingest_pb2.ReportUsageResponse]:
    """ReportUsage taking the request's bytes as they are: a client can send anything."""
    return channel.unary_unary(
        f"/meterline.v1.IngestService/{method}",
        request_serializer=None,
        response_deserializer=ingest_pb2.ReportUsageResponse.FromString,
    )


def with_bad_utf8(good: bytes, marker: str) -> bytes:
    """``good`` with the UTF-8 of ``marker`` (a unique model name) made invalid."""
    assert good.count(marker.encode()) == 1
    return good.replace(marker.encode(), b"\xff" + marker.encode()[1:])


# --- 1: an event that is not a UsageEvent is rejected alone -----------------------------


async def test_invalid_utf8_in_one_event_rejects_that_event_alone(
    stack: Stack, account_id: str
) -> None:
    marker = unique("model")
    events = [
        event(account_id, input_tokens=1),
        event(account_id, event_id="the-bad-one", model=marker),
        event(account_id, input_tokens=2),
    ]
    data = with_bad_utf8(ingest_pb2.ReportUsageRequest(events=events).SerializeToString(), marker)

    response = await raw_report(stack.channel)(data)

    assert (response.accepted, response.rejected) == (2, 1)
    assert [(r.index, r.accepted) for r in response.results] == [(0, True), (1, False), (2, True)]
    bad = response.results[1]
    assert bad.event_id == "the-bad-one"
    assert bad.reason == "not a valid UsageEvent: invalid UTF-8 in a string field (model)"
    records = await produced(stack.settings, 2)
    assert sorted(usage_pb2.UsageEvent.FromString(r.value).input_tokens for r in records) == [1, 2]


async def test_invalid_utf8_in_a_stream_rejects_that_event_and_the_stream_goes_on(
    stack: Stack, account_id: str
) -> None:
    marker = unique("model")
    first = ingest_pb2.StreamUsageRequest(
        events=[event(account_id, model=marker), event(account_id, input_tokens=1)]
    )
    second = ingest_pb2.StreamUsageRequest(events=[event(account_id, input_tokens=2)])
    call = stack.channel.stream_unary(
        "/meterline.v1.IngestService/StreamUsage",
        request_serializer=None,
        response_deserializer=ingest_pb2.StreamUsageResponse.FromString,
    )

    response = await call(
        iter([with_bad_utf8(first.SerializeToString(), marker), second.SerializeToString()])
    )

    assert [(r.index, r.accepted) for r in response.results] == [(0, False), (1, True), (2, True)]
    assert "invalid UTF-8" in response.results[0].reason


async def test_bytes_that_are_no_request_at_all_are_refused_whole(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await raw_report(stack.channel)(b"\x0a\xff\xff\xff\x0f")  # field 1, 4 GiB long
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a meterline.v1.ReportUsageRequest" in (refused.value.details() or "")


# --- 2: reports as large as the per-event limits allow ---------------------------------


def largest_event(account_id: str, rules: EventRules) -> usage_pb2.UsageEvent:
    """An event at the documented limits: longest ids and names, largest provider usage."""
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "padding": ""}
    usage["padding"] = "x" * (rules.max_provider_usage_bytes - len(json.dumps(usage)))
    text = json.dumps(usage)
    assert len(text.encode()) == rules.max_provider_usage_bytes
    return event(
        account_id,
        event_id=unique("e").ljust(rules.max_id_length, "e"),
        model="openai/gpt-4.1-mini".ljust(rules.max_name_length, "x"),
        input_tokens=10,
        output_tokens=5,
        provider_usage_json=text,
    )


async def test_a_300_event_report_at_the_per_event_limits_is_taken(
    stack: Stack, account_id: str
) -> None:
    events = [largest_event(account_id, stack.settings.events) for _ in range(300)]
    request = ingest_pb2.ReportUsageRequest(events=events)
    assert request.ByteSize() > 4 * 1024 * 1024  # gRPC's default limit

    response = await stack.ingest.ReportUsage(request)

    assert (response.accepted, response.rejected) == (300, 0)


async def test_a_report_over_the_byte_limit_is_refused_with_the_setting_named(
    settings: Settings, own_ingest: OwnIngest, account_id: str
) -> None:
    limit = 64 * 1024
    events = [largest_event(account_id, settings.events) for _ in range(5)]  # ~85 KiB
    async with own_ingest(settings, max_message_bytes=limit) as (channel, _):
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ReportUsage(ingest_pb2.ReportUsageRequest(events=events))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = refused.value.details() or ""
    assert f"the limit is {limit} (METERLINE_GRPC_MAX_MESSAGE_BYTES)" in details


# --- 3: a stream's message over a limit has its events rejected, and the stream goes on --


async def test_a_stream_message_over_a_limit_is_rejected_event_by_event(
    settings: Settings, own_ingest: OwnIngest, account_id: str
) -> None:
    large = [largest_event(account_id, settings.events) for _ in range(5)]  # ~85 KiB
    messages = [
        [event(account_id, input_tokens=1)],
        large,  # over the byte limit
        [event(account_id, input_tokens=2)],
        [event(account_id, input_tokens=3) for _ in range(4)],  # over the event limit
        [event(account_id, input_tokens=4)],
    ]

    async def requests() -> AsyncIterator[ingest_pb2.StreamUsageRequest]:
        for events in messages:
            yield ingest_pb2.StreamUsageRequest(events=events)

    limits: Limits = {"max_message_bytes": 64 * 1024, "max_events_per_request": 3}
    async with own_ingest(settings, **limits) as (channel, _):
        response = await ingest_pb2_grpc.IngestServiceStub(channel).StreamUsage(requests())

    assert (response.accepted, response.rejected) == (3, 9)
    assert [r.event_id for r in response.results] == [e.event_id for m in messages for e in m]
    assert [r.index for r in response.results] == list(range(12))
    too_large, too_many = response.results[1:6], response.results[7:11]
    assert all("bytes; the limit is 65536" in r.reason for r in too_large)
    assert all("has 4 events; the limit is 3" in r.reason for r in too_many)
    assert all("nothing of that message was produced" in r.reason for r in too_large + too_many)
    records = await produced(settings, 3)
    assert sorted(usage_pb2.UsageEvent.FromString(r.value).input_tokens for r in records) == [
        1,
        2,
        4,
    ]


# --- 4: lateness is judged once: the record carries the instant ingest judged by -------


async def test_an_event_at_the_edge_of_max_past_stays_valid_against_the_record_timestamp(
    settings: Settings, own_ingest: OwnIngest, account_id: str
) -> None:
    rules = settings.events
    # now, with nanoseconds past the millisecond that ingest and the record keep
    clock_ns = (time.time_ns() // 1_000_000) * 1_000_000 + 999_999
    now_ms = _EPOCH + timedelta(milliseconds=clock_ns // 1_000_000)
    now_exact = now_ms + timedelta(microseconds=999)
    events = [
        event(account_id, input_tokens=1, occurred_at=now_ms - rules.max_past),  # the edge
        event(account_id, input_tokens=2, occurred_at=now_exact - rules.max_past),
        event(account_id, input_tokens=3, occurred_at=now_ms + rules.max_future),  # the other
        # beyond the edges, by a microsecond: rejected by ingest, as by the pipeline
        event(account_id, occurred_at=now_ms - rules.max_past - timedelta(microseconds=1)),
        event(account_id, occurred_at=now_exact + rules.max_future),
    ]

    async with own_ingest(settings, clock_ns=lambda: clock_ns) as (channel, _):
        response = await ingest_pb2_grpc.IngestServiceStub(channel).ReportUsage(
            ingest_pb2.ReportUsageRequest(events=events)
        )

    assert [r.accepted for r in response.results] == [True, True, True, False, False]
    assert "days in the past" in response.results[3].reason
    assert "s in the future" in response.results[4].reason
    records = await produced(settings, 3)
    assert {r.timestamp for r in records} == {clock_ns // 1_000_000}
    for record in records:
        # exactly as the pricing pipeline judges a record
        received_at = datetime.fromtimestamp(record.timestamp / 1000, tz=UTC)
        assert received_at == now_ms
        validate(decode(record.value), now=received_at, rules=rules)  # raises if invalid


# --- 5: counts from the provider's usage object, at ingest -------------------------------


async def test_zero_counts_are_taken_from_the_usage_object_and_written_to_kafka(
    stack: Stack, account_id: str
) -> None:
    anthropic = {
        "input_tokens": 21,
        "cache_creation_input_tokens": 1500,
        "cache_read_input_tokens": 3000,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 393,
    }
    response = await stack.report(
        event(account_id, provider_usage_json=json.dumps(anthropic)),
        event(
            account_id,
            input_tokens=21,
            output_tokens=393,
            provider_usage_json=json.dumps(anthropic),
        ),
    )

    assert [r.accepted for r in response.results] == [True, False]
    assert "input_tokens 4521 (given 21)" in response.results[1].reason
    (record,) = await produced(stack.settings, 1)
    written = usage_pb2.UsageEvent.FromString(record.value)
    assert (
        written.input_tokens,
        written.cached_input_tokens,
        written.cache_write_5m_tokens,
        written.output_tokens,
    ) == (4521, 3000, 1500, 393)


# --- 7: metrics, scraped as Prometheus does ---------------------------------------------


def scrape(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``/metrics`` of a standalone ingest, parsed: (sample name, labels) -> value."""
    metrics = serve_metrics(registry, "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics") as answer:
            text = answer.read().decode()
    finally:
        metrics.close()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_ingest_counts_rpcs_events_and_produce_time_on_its_metrics(
    settings: Settings, own_ingest: OwnIngest, account_id: str
) -> None:
    registry = CollectorRegistry()
    async with own_ingest(settings, registry=registry, max_events_per_request=3) as (channel, _):
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        await stub.ReportUsage(
            ingest_pb2.ReportUsageRequest(
                events=[
                    event(account_id, input_tokens=1),
                    event(account_id, input_tokens=2),
                    event(account_id, input_tokens=-1),
                ]
            )
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ReportUsage(ingest_pb2.ReportUsageRequest(events=[event(account_id)] * 4))

    samples = await asyncio.to_thread(scrape, registry)

    def sample(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    rpcs = "meterline_ingest_rpcs_total"
    assert sample(rpcs, method="ReportUsage", code="OK") == 1
    assert sample(rpcs, method="ReportUsage", code="INVALID_ARGUMENT") == 1
    events = "meterline_ingest_events_total"
    assert sample(events, outcome="accepted", reason="none") == 2
    assert sample(events, outcome="rejected", reason="negative_tokens") == 1
    assert sample("meterline_ingest_produce_seconds_count") == 1
    assert sample("meterline_ingest_produce_seconds_sum") > 0


# --- 6: the simulator when ingest goes away ---------------------------------------------


async def test_simulate_stops_cleanly_with_its_totals_when_ingest_goes_away(
    settings: Settings, own_ingest: OwnIngest, service_key: IssuedKey
) -> None:
    output = io.StringIO()
    async with own_ingest(settings) as (_, target):
        running = asyncio.create_task(
            simulate(
                target,
                rate=200,
                duration_s=30,
                accounts=2,
                batch_size=10,
                seed=1,
                console=Console(file=output, width=120),
                key=service_key.secret,
            )
        )
        await asyncio.sleep(1.0)
    # ingest has stopped
    totals = await asyncio.wait_for(running, timeout=35)

    assert totals.error.startswith(f"ingest at {target} failed a report: UNAVAILABLE")
    assert "\n" not in totals.error
    assert totals.events > 0 and totals.accepted == totals.events
    assert totals.failed == 10 and totals.sent == totals.events + totals.failed
    text = output.getvalue()
    assert "events sent" in text and "events in failed reports" in text


def test_the_simulate_command_exits_non_zero_with_a_one_line_reason() -> None:
    port = free_port()  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "simulate", "--target", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        line for line in done.stderr.strip().splitlines() if line.startswith("meterline simulate:")
    ]
    assert "UNAVAILABLE" in done.stderr
    assert "events sent" in done.stdout


# --- 8: JSON logs -------------------------------------------------------------------------


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level put back afterwards (pytest's own among them)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_logs_are_one_object_per_line_with_the_traceback(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json")
    logging.getLogger("meterline.test").info("reported %d events", 3)
    try:
        raise RuntimeError("Kafka went away")
    except RuntimeError:
        logging.getLogger("services.ingest").exception("produce failed")

    lines = capsys.readouterr().err.splitlines()

    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert {k: first[k] for k in ("level", "logger", "message")} == {
        "level": "INFO",
        "logger": "meterline.test",
        "message": "reported 3 events",
    }
    assert datetime.fromisoformat(first["time"]).tzinfo is not None
    assert "exc_info" not in first
    assert second["level"] == "ERROR"
    assert second["exc_info"].startswith("Traceback (most recent call last)")
    assert "RuntimeError: Kafka went away" in second["exc_info"]


def test_the_cli_logs_json_when_meterline_log_format_is_json(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METERLINE_LOG_FORMAT", "json")
    assert cli.main(["schema"]) == 0
    assert [type(h.formatter) for h in root_logger.handlers] == [JsonFormatter]

    monkeypatch.setenv("METERLINE_LOG_FORMAT", "xml")
    assert cli.main(["schema"]) == 2  # bad configuration
