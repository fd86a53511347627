"""The pricing pipeline: Kafka usage events -> priced events in the warehouse.

One consumer group, any number of instances, batch-first: records are
buffered until ``max_batch_events`` or ``max_batch_wait_ms``, then one flush
(:class:`~pipelines.pricing.sink.UsageSink`) prices and stores them, the
records nobody can bill go to the dead-letter topic with their reason, and
only then are the offsets committed. A crash anywhere replays the batch; the
store is idempotent by event identity, so the replay changes nothing but
hands the flush handlers what was stored. One flush is in flight at a time
while consuming goes on, and partitions are given up only after it committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meterline.catalog import Catalog, PriceBook
from meterline.lib.postgres import PostgresError
from meterline.lib.settings import Settings
from meterline.lib.warehouse import Warehouse, WarehouseError
from meterline.usage.clickhouse import ClickHouseUsageStore
from meterline.usage.model import PlanBook
from meterline.usage.store import FlushHandler
from pipelines.pricing.sink import DeadLetter, Flushed, Prepared, UsageSink

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Longest a step of stopping (last flush, closing a Kafka client) may take.
STOP_STEP_S = 30.0
#: How often the lag per partition is asked of the broker.
LAG_EVERY_S = 2.0
#: A dead letter's value is cut to this size (a header says so): the broker
#: takes about 1 MiB a request, and an oversize record must not stop the line.
DEAD_LETTER_MAX_BYTES = 512 * 1024


class PipelineMetrics:
    """What the pipeline did since it started, also as Prometheus metrics.

    Plain counters the code and the tests read, exported by a collector on
    the registry given (a process's own, or a test's); flush step durations
    are histograms.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.consumed = 0
        self.priced = 0
        self.unpriced = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self.set_aside = 0
        self.flushes = 0
        self.commit_failures = 0
        self.write_retries = 0
        self.lag_by_partition: dict[int, int] = {}
        self.events_per_s = 0.0
        registry = registry if registry is not None else CollectorRegistry()
        self.step_seconds = Histogram(
            "meterline_pipeline_flush_step_seconds",
            "Time spent in each step of a flush",
            ["step"],
            registry=registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        registry.register(_PipelineCollector(self))

    @property
    def lag(self) -> int:
        return sum(self.lag_by_partition.values())

    def observe(self, step: str, seconds: float) -> None:
        self.step_seconds.labels(step).observe(seconds)

    def count(self, records: int, flushed: Flushed) -> None:
        self.consumed += records
        self.duplicates += flushed.duplicates
        self.dead_lettered += len(flushed.dead)
        self.set_aside += flushed.set_aside
        self.unpriced += flushed.unpriced
        self.priced += flushed.written - flushed.unpriced
        self.flushes += 1

    def as_dict(self) -> dict[str, float]:
        names = (
            "consumed",
            "priced",
            "unpriced",
            "duplicates",
            "dead_lettered",
            "set_aside",
            "flushes",
            "commit_failures",
            "write_retries",
            "lag",
            "events_per_s",
        )
        return {name: getattr(self, name) for name in names}


class _PipelineCollector(Collector):
    def __init__(self, metrics: PipelineMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self.metrics
        events = CounterMetricFamily(
            "meterline_pipeline_events",
            "Records the pipeline consumed, and what became of them",
            labels=["outcome"],
        )
        for outcome, value in (
            ("consumed", m.consumed),
            ("priced", m.priced),
            ("unpriced", m.unpriced),
            ("duplicate", m.duplicates),
            ("dead_lettered", m.dead_lettered),
            ("set_aside", m.set_aside),
        ):
            events.add_metric([outcome], value)
        yield events
        yield CounterMetricFamily("meterline_pipeline_flushes", "Batches stored", value=m.flushes)
        yield CounterMetricFamily(
            "meterline_pipeline_write_retries", "Flushes retried after a failure", m.write_retries
        )
        yield CounterMetricFamily(
            "meterline_pipeline_commit_failures",
            "Offset commits refused (the records are replayed and deduplicated)",
            m.commit_failures,
        )
        lag = GaugeMetricFamily(
            "meterline_pipeline_lag",
            "Records on an assigned partition not yet committed",
            labels=["partition"],
        )
        for partition, value in sorted(m.lag_by_partition.items()):
            lag.add_metric([str(partition)], value)
        yield lag


class PricingPipeline:
    """Consumes the usage topic, prices each event, writes it to the warehouse."""

    def __init__(
        self,
        settings: Settings,
        warehouse: Warehouse,
        bootstrap_servers: str,
        *,
        handlers: Sequence[FlushHandler] = (),
        plans: PlanBook | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """``plans`` gives each account's sell price (a
        :class:`~meterline.quotas.charges.ChargeBook`); None: charge = cost."""
        self.settings = settings
        self.warehouse = warehouse
        self.bootstrap_servers = bootstrap_servers
        self.price_book = PriceBook(warehouse)
        self.catalog = Catalog(())
        self.metrics = PipelineMetrics(registry)
        self.sink = UsageSink(
            ClickHouseUsageStore(warehouse),
            settings.events,
            handlers,
            observe=self.metrics.observe,
            plans=plans,
        )
        self._buffer: list[ConsumerRecord[bytes, bytes]] = []
        self._flush_lock = asyncio.Lock()
        self._inflight: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        #: once stopping: when retrying a failed flush ends (monotonic time)
        self._retry_until: float | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._catalog_loaded_at = 0.0
        self._lag_at = 0.0

    # -- lifecycle ---------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, drain_s: float = 0.0) -> None:
        """Consume until ``stop`` is set, then flush what is buffered and commit.

        With ``drain_s``, keep consuming after ``stop`` until the assigned
        partitions are empty or that many seconds passed: an embedded broker
        keeps records in memory only, so they must be priced before it stops.
        A failing write is retried for as long as the drain may take.
        """
        kafka = self.settings.kafka
        self._stop = stop
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=kafka.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            heartbeat_interval_ms=1000,  # notice rebalances quickly: partitions move sooner
            session_timeout_ms=kafka.session_timeout_ms,
            max_partition_fetch_bytes=4 << 20,
            fetch_max_bytes=32 << 20,
            fetch_max_wait_ms=kafka.fetch_max_wait_ms,
        )
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers, acks="all", enable_idempotence=False
        )
        await self._refresh_catalog(force=True)
        try:
            await self._producer.start()
            self._consumer.subscribe([kafka.topic], listener=_FlushOnRevoke(self))
            await self._consumer.start()
            log.info("pricing pipeline consuming %s as group %s", kafka.topic, kafka.consumer_group)
            await self._consume()
            self._retry_until = time.monotonic() + drain_s
            if drain_s > 0:
                try:
                    await asyncio.wait_for(self._drain(drain_s), drain_s + STOP_STEP_S)
                except TimeoutError:
                    log.warning("stopped draining: Kafka did not answer for %.0f s", drain_s)
        finally:
            # Each step is bounded: with Kafka gone, a commit would wait for it
            # forever. What is not committed is replayed later, and deduped.
            # aiokafka's consumer lets a cancelled fetch escape its stop(); the
            # producer is stopped all the same.
            self._retry_until = min(self._retry_until or 0.0, time.monotonic() + STOP_STEP_S)
            for step in (self.flush, self._consumer.stop, self._producer.stop):
                try:
                    await asyncio.wait_for(step(), STOP_STEP_S)
                except (Exception, asyncio.CancelledError) as exc:
                    log.warning("while stopping: %s", _short(exc))
            log.info("pricing pipeline stopped: %s", self.metrics.as_dict())

    async def _consume(self) -> None:
        """Fetch into the buffer and flush it: as soon as nothing more is waiting (once
        ``min_batch_wait_ms`` has passed and no write is in flight), or when it holds
        ``max_batch_events``, or after ``max_batch_wait_ms``.

        So an event is stored within about a write's time of its arrival when traffic is
        light, and under load batches grow to what arrives while one is written: the
        write itself paces them, and ``min_batch_wait_ms`` bounds the inserts a second.
        """
        assert self._consumer is not None
        batch = self.settings.pipeline
        first_buffered: float | None = None
        stopping = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                waited_ms = (
                    0 if first_buffered is None else 1000 * (time.monotonic() - first_buffered)
                )
                writing = self._inflight is not None and not self._inflight.done()
                if self._buffer and not writing:  # poll: does more wait to join the batch?
                    timeout_ms = max(0, int(batch.min_batch_wait_ms - waited_ms))
                else:
                    timeout_ms = max(1, int(batch.max_batch_wait_ms - waited_ms))
                fetch = asyncio.create_task(
                    self._consumer.getmany(
                        timeout_ms=timeout_ms,
                        max_records=batch.max_batch_events - len(self._buffer),
                    )
                )
                waits: set[asyncio.Future[Any]] = {fetch, stopping}
                if self._buffer and writing and self._inflight is not None:
                    waits.add(self._inflight)  # the write's end may let the buffer go
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                fetched = 0
                if fetch.done():
                    for records in fetch.result().values():
                        self._buffer.extend(records)
                        fetched += len(records)
                else:
                    fetch.cancel()  # records not handed over stay in the consumer
                    with contextlib.suppress(asyncio.CancelledError):
                        await fetch
                    if self._stop.is_set():
                        break
                if self._buffer and first_buffered is None:
                    first_buffered = time.monotonic()
                waited_ms = 1000 * (time.monotonic() - (first_buffered or time.monotonic()))
                writing = self._inflight is not None and not self._inflight.done()
                idle = not fetched and not writing and waited_ms >= batch.min_batch_wait_ms
                if len(self._buffer) >= batch.max_batch_events or (
                    self._buffer and (idle or waited_ms >= batch.max_batch_wait_ms)
                ):
                    await self.flush(wait=False)
                    first_buffered = None
                elif self._inflight is not None and self._inflight.done():
                    await self._settle()  # surface a failed write now, not at the next batch
                await self._refresh_catalog()
                await self._refresh_lag()
        finally:
            stopping.cancel()

    async def _drain(self, limit_s: float) -> None:
        assert self._consumer is not None
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            fetched = await self._consumer.getmany(
                timeout_ms=200, max_records=self.settings.pipeline.max_batch_events
            )
            for records in fetched.values():
                self._buffer.extend(records)
            await self.flush()
            if not fetched and await self._refresh_lag(force=True) == 0:
                return
        log.warning(
            "stopped draining after %.0f s with %d records left",
            limit_s,
            await self._refresh_lag(force=True),
        )

    async def _refresh_catalog(self, *, force: bool = False) -> None:
        """Load new prices now and then; a failed load keeps the prices in hand."""
        now = time.monotonic()
        if not force and now - self._catalog_loaded_at < self.settings.pipeline.catalog_refresh_s:
            return
        self._catalog_loaded_at = now
        try:
            self.catalog = await asyncio.to_thread(self.price_book.load)
        except WarehouseError as exc:
            log.warning("could not load the catalog (keeping the prices loaded before): %s", exc)

    async def _refresh_lag(self, *, force: bool = False) -> int:
        """Records on the assigned partitions not yet committed.

        The group's committed offsets against the partitions' ends, so it is
        right while flushes fail. An end is the larger of what ListOffsets and
        the last fetch say: the embedded broker (Tansu) answers ListOffsets
        with the last record batch's first offset + 1, and a fetch's high
        watermark is right there but unknown before the first fetch.
        """
        now = time.monotonic()
        if (not force and now - self._lag_at < LAG_EVERY_S) or self._consumer is None:
            return self.metrics.lag
        self._lag_at = now
        assigned = sorted(self._consumer.assignment(), key=lambda tp: tp.partition)
        lag: dict[int, int] = {}
        try:
            ends = await self._consumer.end_offsets(assigned) if assigned else {}
            starts = await self._consumer.beginning_offsets(assigned) if assigned else {}
            for tp in assigned:
                committed = await self._consumer.committed(tp)
                done = starts[tp] if committed is None else committed
                end = max(ends[tp], self._consumer.highwater(tp) or 0)
                lag[tp.partition] = max(0, end - done)
        except (KafkaError, AssertionError) as exc:
            log.debug("lag unknown for now: %s", exc)
            return self.metrics.lag
        self.metrics.lag_by_partition = lag
        return self.metrics.lag

    # -- the flush ---------------------------------------------------------

    async def flush(self, *, wait: bool = True) -> None:
        """Hand the buffered records to the writer; with ``wait``, until committed.

        A batch is decoded and priced (Python, on a worker thread) while the
        batch before it is written (mostly the engine, which releases the GIL);
        batches are written and committed in order, one at a time, so a
        batch's dedupe check always sees the events of the batch before it.
        """
        async with self._flush_lock:
            records, self._buffer = self._buffer, []
            prepared = None
            if records:
                prepared = asyncio.create_task(
                    asyncio.to_thread(self.sink.prepare, records, self.catalog)
                )
            try:
                await self._settle()
            except BaseException:
                if prepared is not None:
                    prepared.cancel()  # not committed: it will be replayed
                raise
            if prepared is not None:
                self._inflight = asyncio.create_task(self._complete(records, prepared))
            if wait:
                await self._settle()

    async def _settle(self) -> None:
        """Wait for the write in flight, if any; its failure is raised here."""
        if self._inflight is not None:
            task, self._inflight = self._inflight, None
            await task

    async def _complete(
        self, records: Sequence[ConsumerRecord[bytes, bytes]], prepared: asyncio.Task[Prepared]
    ) -> None:
        """Charge (if the plans could not be read ahead), store, dead-letter, commit: the
        batch's I/O, in that order."""
        started = time.monotonic()
        ahead: list[asyncio.Task[Prepared]] = [prepared]

        async def prepare() -> Prepared:
            # the batch priced ahead, or, after a failure (the plans' store was down), again
            if ahead:
                return await ahead.pop()
            return await asyncio.to_thread(self.sink.prepare, records, self.catalog)

        batch = await self._until_done(prepare, len(records), "pricing")
        flushed = await self._until_done(
            lambda: asyncio.to_thread(self.sink.store_batch, batch), batch.records, "storing"
        )
        await self._dead_letter(flushed.dead)
        await self._commit(records)
        elapsed = time.monotonic() - started
        self.metrics.count(len(records), flushed)
        self.metrics.events_per_s = len(records) / elapsed if elapsed > 0 else 0.0
        log.debug("wrote %d records in %.3f s: %s", len(records), elapsed, self.metrics.as_dict())

    async def _until_done(
        self, attempt: Callable[[], Awaitable[_T]], records: int, what: str
    ) -> _T:
        """Retry a failed step with back-off: a warehouse or PostgreSQL outage pauses the
        pipeline.

        Retrying is safe: the store is idempotent by event. Once stopping, the
        retries end with the drain's time; the error is raised then and the
        batch, not committed, is replayed by whoever runs next.
        """
        delay = 0.5
        while True:
            try:
                return await attempt()
            except Exception as exc:
                if self._retry_until is not None and time.monotonic() >= self._retry_until:
                    raise
                self.metrics.write_retries += 1
                log.warning(
                    "%s %d records failed, retrying in %.1f s: %s",
                    what,
                    records,
                    delay,
                    _short(exc),
                    exc_info=not isinstance(exc, WarehouseError | PostgresError),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    await asyncio.sleep(min(delay, 1.0))  # stopping: keep trying, but briskly
                delay = min(delay * 2, 30.0)

    async def _dead_letter(self, dead: Sequence[DeadLetter]) -> None:
        if not dead:
            return
        assert self._producer is not None
        topic = self.settings.kafka.dead_letter_topic
        sends = [await self._producer.send(topic, **_dead_letter_record(d)) for d in dead]
        await asyncio.gather(*sends)
        for d in dead[:5]:
            log.warning(
                "dead-lettered %s[%d]@%d: %s",
                d.record.topic,
                d.record.partition,
                d.record.offset,
                d.reason,
            )

    async def _commit(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        assert self._consumer is not None
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # The events are stored; whoever owns these partitions now replays
            # the records, and the store takes them as the events they are.
            self.metrics.commit_failures += 1
            log.warning("offset commit failed, records will be replayed and deduped: %s", exc)


def _short(exc: BaseException) -> str:
    """An error for a log line: the engine's messages can quote a whole batch."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 500 else text[:500] + " …"


def _dead_letter_record(dead: DeadLetter) -> dict[str, object]:
    """The dead letter as it is produced: the record, its reason and where it came from.

    A value or key too large for the broker is cut, and headers say so and
    give the whole one's size and SHA-256, so nothing stops the line.
    """
    record = dead.record
    value, key = record.value or b"", record.key
    headers = [
        ("reason", dead.reason.encode()[:4096]),
        ("source.topic", record.topic.encode()),
        ("source.partition", str(record.partition).encode()),
        ("source.offset", str(record.offset).encode()),
    ]
    if len(value) > DEAD_LETTER_MAX_BYTES:
        headers += [
            ("truncated", b"true"),
            ("original.size", str(len(value)).encode()),
            ("original.sha256", hashlib.sha256(value).hexdigest().encode()),
        ]
        value = value[:DEAD_LETTER_MAX_BYTES]
    if key is not None and len(key) > 4096:
        headers.append(("key.truncated", str(len(key)).encode()))
        key = key[:4096]
    return {"key": key, "value": value, "headers": headers}


class _FlushOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Before partitions move to another instance, write and commit what we hold."""

    def __init__(self, pipeline: PricingPipeline) -> None:
        self.pipeline = pipeline

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if revoked:
            await self.pipeline.flush()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
