"""The pricing pipeline: Kafka usage events -> priced rows in ClickHouse.

One consumer group, any number of instances, batch-first. A flush is

    decode -> validate -> dedupe in batch -> dedupe against the warehouse
    -> price -> insert -> dead-letter the bad -> commit offsets

and offsets are committed only after the insert, so a crash anywhere replays
the batch. The work up to the insert runs inside the warehouse engine for
every record it can check (:mod:`.in_warehouse`); the rest, and any batch the
engine cannot parse, goes through the same steps in Python, record by record.

The replay is harmless: the warehouse's ``dedupe_keys`` (filled by
a materialized view in the same insert as the rows) already holds every
event that was written, so those events are skipped, not counted twice.
Partitions are given up only after the in-flight flush committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from meterline.catalog import Catalog, PriceBook
from meterline.lib.settings import Settings
from meterline.lib.warehouse import USAGE_EVENT_COLUMNS, Warehouse, WarehouseError
from meterline.lib.warehouse.schema import stored_keys_sql
from meterline.money import picos_to_usd
from meterline.usage import InvalidEvent, decode, validate
from pipelines.pricing.in_warehouse import (
    EncodedBatch,
    WarehouseLane,
    drop_stale_scratch,
    encode_records,
)

log = logging.getLogger(__name__)


@dataclass
class PipelineMetrics:
    """Counters since start; ``events_per_s`` and ``lag`` are from the last flush."""

    consumed: int = 0
    priced: int = 0
    unpriced: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    flushes: int = 0
    commit_failures: int = 0
    write_retries: int = 0
    lag: int = 0
    events_per_s: float = 0.0
    started_at: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in vars(self).items() if k != "started_at"}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: ConsumerRecord[bytes, bytes]
    reason: str


@dataclass(frozen=True, slots=True)
class Written:
    """What a batch's write stored, and what it turned away."""

    events: int
    unpriced: int
    dead: list[DeadLetter]


class PricingPipeline:
    """Consumes the usage topic, prices each event, writes it to the warehouse."""

    def __init__(self, settings: Settings, warehouse: Warehouse, bootstrap_servers: str) -> None:
        self.settings = settings
        self.warehouse = warehouse
        self.bootstrap_servers = bootstrap_servers
        self.price_book = PriceBook(warehouse)
        self.catalog = Catalog(())
        self.metrics = PipelineMetrics()
        # two sets of scratch tables: a batch is parsed into one while the
        # batch before it is written from the other
        self.lanes = (
            WarehouseLane(warehouse, settings.events),
            WarehouseLane(warehouse, settings.events),
        )
        self._next_lane = 0
        self._buffer: list[ConsumerRecord[bytes, bytes]] = []
        self._flush_lock = asyncio.Lock()
        self._inflight: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()  # run()'s stop signal; ends write retries
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._catalog_loaded_at = 0.0
        self._scratch_tended_at = 0.0

    # -- lifecycle ---------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, drain_s: float = 0.0) -> None:
        """Consume until ``stop`` is set, then flush what is buffered and commit.

        With ``drain_s``, keep consuming after ``stop`` until the assigned
        partitions are empty or that many seconds passed: an embedded broker
        keeps records in memory only, so they must be priced before it stops.
        """
        kafka = self.settings.kafka
        self._stop = stop
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=kafka.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            heartbeat_interval_ms=1000,  # notice rebalances quickly: partitions move sooner
            max_partition_fetch_bytes=4 << 20,
            fetch_max_bytes=32 << 20,
        )
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers, acks="all", enable_idempotence=False
        )
        await self._refresh_catalog(force=True)
        for lane in self.lanes:
            await asyncio.to_thread(lane.create)
        await self._tend_scratch(force=True)
        try:
            await self._producer.start()
            self._consumer.subscribe([kafka.topic], listener=_FlushOnRevoke(self))
            await self._consumer.start()
            log.info("pricing pipeline consuming %s as group %s", kafka.topic, kafka.consumer_group)
            await self._consume()
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
            for step in (self.flush, self._consumer.stop, self._producer.stop):
                try:
                    await asyncio.wait_for(step(), STOP_STEP_S)
                except (Exception, asyncio.CancelledError) as exc:
                    log.warning("while stopping: %s", str(exc) or type(exc).__name__)
            for lane in self.lanes:
                with contextlib.suppress(WarehouseError):
                    await asyncio.to_thread(lane.drop)
            log.info("pricing pipeline stopped: %s", self.metrics.as_dict())

    async def _consume(self) -> None:
        """Fetch into the buffer; flush on max_batch_events or max_batch_wait_ms."""
        assert self._consumer is not None
        batch = self.settings.pipeline
        first_buffered: float | None = None
        stopping = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                waited_ms = (
                    0 if first_buffered is None else 1000 * (time.monotonic() - first_buffered)
                )
                fetch = asyncio.create_task(
                    self._consumer.getmany(
                        timeout_ms=max(1, int(batch.max_batch_wait_ms - waited_ms)),
                        max_records=batch.max_batch_events - len(self._buffer),
                    )
                )
                await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await fetch
                    break
                for records in fetch.result().values():
                    self._buffer.extend(records)
                if self._buffer and first_buffered is None:
                    first_buffered = time.monotonic()
                waited_ms = 1000 * (time.monotonic() - (first_buffered or time.monotonic()))
                if len(self._buffer) >= batch.max_batch_events or (
                    self._buffer and waited_ms >= batch.max_batch_wait_ms
                ):
                    await self.flush(wait=False)
                    first_buffered = None
                elif self._inflight is not None and self._inflight.done():
                    await self._settle()  # surface a failed write now, not at the next batch
                await self._refresh_catalog()
                await self._tend_scratch()
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
            if not fetched and await self._lag() == 0:
                return
        log.warning(
            "stopped draining after %.0f s with %d records left", limit_s, await self._lag()
        )

    async def _refresh_catalog(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._catalog_loaded_at >= self.settings.pipeline.catalog_refresh_s:
            self.catalog = await asyncio.to_thread(self.price_book.load)
            self._catalog_loaded_at = now

    async def _tend_scratch(self, *, force: bool = False) -> None:
        """Now and then: say this instance's scratch tables are in use, drop those left behind."""
        now = time.monotonic()
        if not force and now - self._scratch_tended_at < SCRATCH_TEND_EVERY_S:
            return
        self._scratch_tended_at = now

        def tend() -> list[str]:
            for lane in self.lanes:
                lane.keep_alive()
            return drop_stale_scratch(self.warehouse)

        try:
            dropped = await asyncio.to_thread(tend)
        except WarehouseError as exc:
            log.warning("could not tend the scratch tables (will try again): %s", exc)
            return
        if dropped:
            log.info("dropped %d scratch tables left by stopped instances", len(dropped))

    # -- the flush ---------------------------------------------------------

    async def flush(self, *, wait: bool = True) -> None:
        """Hand the buffered records to the writer; with ``wait``, until committed.

        Preparing a batch (CPU) and parsing it into the warehouse overlap the
        previous batch's write, since chDB and the network release the GIL.
        Batches are written and committed in order, one write in flight at a
        time, so a batch's dedupe check always sees the rows of the batch
        before it.
        """
        async with self._flush_lock:
            records, self._buffer = self._buffer, []
            staged = None
            if records:
                encoded = self._prepare(records)
                lane = self.lanes[self._next_lane]
                self._next_lane = 1 - self._next_lane
                staged = asyncio.create_task(self._stage(lane, encoded))
            try:
                await self._settle()
            except BaseException:
                if staged is not None:
                    staged.cancel()  # the batch is not committed: it will be replayed
                raise
            if staged is not None:
                self._inflight = asyncio.create_task(self._complete(records, encoded, lane, staged))
            if wait:
                await self._settle()

    @staticmethod
    async def _stage(lane: WarehouseLane, encoded: EncodedBatch) -> set[tuple[int, int]] | None:
        """Parse the batch into ``lane`` ahead of its write; None if that failed.

        Only a head start: the write stages the batch again if this did not
        work, and decides then what to do without the engine.
        """
        try:
            return await asyncio.to_thread(lane.stage, encoded)
        except WarehouseError:
            return None

    async def _settle(self) -> None:
        """Wait for the write in flight, if any; its failure is raised here."""
        if self._inflight is not None:
            task, self._inflight = self._inflight, None
            await task

    async def _complete(
        self,
        records: Sequence[ConsumerRecord[bytes, bytes]],
        encoded: EncodedBatch,
        lane: WarehouseLane,
        staged: asyncio.Task[set[tuple[int, int]] | None],
    ) -> None:
        """Insert, dead-letter, commit: the batch's I/O, in that order."""
        started = time.monotonic()
        written = await self._write_until_stored(records, encoded, lane, await staged)
        await self._dead_letter(written.dead)
        await self._commit(records)
        elapsed = time.monotonic() - started
        m = self.metrics
        m.consumed += len(records)
        m.duplicates += len(records) - len(written.dead) - written.events
        m.dead_lettered += len(written.dead)
        m.priced += written.events - written.unpriced
        m.unpriced += written.unpriced
        m.flushes += 1
        m.events_per_s = len(records) / elapsed if elapsed > 0 else 0.0
        m.lag = await self._lag()
        log.debug("wrote %d records in %.3f s: %s", len(records), elapsed, m.as_dict())

    def _prepare(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> EncodedBatch:
        """The batch as the warehouse reads it (~3 µs a record, on the consumer's thread)."""
        return encode_records(records)

    def _prepare_rows(
        self, records: Sequence[ConsumerRecord[bytes, bytes]]
    ) -> tuple[list[tuple[object, ...]], list[DeadLetter]]:
        """The Python lane: decode, validate, dedupe within the batch and price, per record.

        ~15 µs a record; used for the records the warehouse's quick check
        leaves to it, and for a batch the engine cannot parse.
        """
        rules = self.settings.events
        price_for = self.catalog.price_for
        rows: list[tuple[object, ...]] = []
        dead: list[DeadLetter] = []
        seen: set[tuple[str, str]] = set()
        received: dict[int, datetime] = {}  # records of a batch share milliseconds
        for record in records:
            received_at = received.get(record.timestamp)
            if received_at is None:
                received_at = datetime.fromtimestamp(record.timestamp / 1000, tz=UTC)
                received[record.timestamp] = received_at
            try:
                event = validate(decode(record.value), now=received_at, rules=rules)
            except InvalidEvent as exc:
                dead.append(DeadLetter(record, str(exc)))
                continue
            key = (event.account_id, event.event_id)
            if key in seen:
                continue
            seen.add(key)
            price = price_for(event.model, event.provider, event.occurred_at)
            usage = event.usage
            if price is None:
                priced, price_id, tier, picos = 0, "", "", 0
            else:
                cost = price.cost(usage)
                priced, price_id, tier, picos = 1, cost.price_id, cost.tier, cost.picos
            rows.append(
                (
                    event.account_id,
                    event.event_id,
                    event.occurred_at,
                    received_at,
                    event.api_key_id,
                    event.model,
                    event.provider,
                    event.status,
                    usage.input_tokens,
                    usage.cached_input_tokens,
                    usage.cache_write_5m_tokens,
                    usage.cache_write_1h_tokens,
                    usage.output_tokens,
                    usage.reasoning_tokens,
                    event.latency_ms,
                    event.ttft_ms,
                    priced,
                    price_id,
                    tier,
                    picos_to_usd(picos),
                    1,
                    record.partition,
                    record.offset,
                    event.provider_usage_json,
                )
            )
        return rows, dead

    async def _write_until_stored(
        self,
        records: Sequence[ConsumerRecord[bytes, bytes]],
        encoded: EncodedBatch,
        lane: WarehouseLane,
        rechecks: set[tuple[int, int]] | None,
    ) -> Written:
        """Retry a failed write with back-off: a warehouse outage pauses the pipeline.

        Retrying is safe, since the dedupe check runs again each time. Once the
        pipeline is stopping, the error is raised instead: the batch is not
        committed and will be replayed.
        """
        delay = 0.5
        while True:
            try:
                return await asyncio.to_thread(self._write, records, encoded, lane, rechecks)
            except WarehouseError as exc:
                if self._stop.is_set():
                    raise
                self.metrics.write_retries += 1
                log.warning("warehouse write failed, retrying in %.1f s: %s", delay, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, 30.0)
                rechecks = None  # the outage may have emptied the scratch tables

    def _write(
        self,
        records: Sequence[ConsumerRecord[bytes, bytes]],
        encoded: EncodedBatch,
        lane: WarehouseLane,
        rechecks: set[tuple[int, int]] | None = None,
    ) -> Written:
        """Check, dedupe, price and insert the batch in the warehouse (blocking).

        ``rechecks`` from staging the batch into ``lane`` beforehand, or None
        to stage it here. Records the engine's quick check did not pass are
        checked again in Python, which dead-letters them with their reason or
        prices them; a batch the engine cannot read at all goes through
        Python whole.
        """
        try:
            if rechecks is None:
                rechecks = lane.stage(encoded)
        except WarehouseError as exc:
            log.warning("the warehouse did not take the batch (%s); pricing it in Python", exc)
            rows, dead = self._prepare_rows(records)
            written, unpriced = self._write_rows(rows)
            return Written(written, unpriced, dead)
        again = list(encoded.for_python)
        if rechecks:
            again += [r for r in encoded.records if (r.partition, r.offset) in rechecks]
        rows, dead = self._prepare_rows(again)
        written, unpriced = lane.write(self.catalog, rows)
        return Written(written, unpriced, dead)

    def _write_rows(self, rows: list[tuple[object, ...]]) -> tuple[int, int]:
        """Skip events the warehouse already holds, insert the rest; (written, unpriced)."""
        if not rows:
            return 0, 0
        keys = sorted({(r[0], r[1]) for r in rows})
        pairs = (
            "SELECT pair.1 AS account_id, pair.2 AS event_id FROM (SELECT arrayJoin("
            "arrayZip({accounts:Array(String)}, {ids:Array(String)})) AS pair)"
        )
        stored = {
            (row["account_id"], row["event_id"])
            for row in self.warehouse.query(
                stored_keys_sql(pairs),
                {"accounts": [k[0] for k in keys], "ids": [k[1] for k in keys]},
            )
        }
        fresh = [r for r in rows if (r[0], r[1]) not in stored]
        self.warehouse.insert("usage_events", USAGE_EVENT_COLUMNS, fresh)  # type: ignore[arg-type]
        return len(fresh), sum(1 for r in fresh if not r[_PRICED])

    async def _dead_letter(self, dead: Sequence[DeadLetter]) -> None:
        if not dead:
            return
        assert self._producer is not None
        topic = self.settings.kafka.dead_letter_topic
        sends = [
            await self._producer.send(
                topic,
                key=d.record.key,
                value=d.record.value,
                headers=[
                    ("reason", d.reason.encode()),
                    ("source.topic", d.record.topic.encode()),
                    ("source.partition", str(d.record.partition).encode()),
                    ("source.offset", str(d.record.offset).encode()),
                ],
            )
            for d in dead
        ]
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
            # The rows are written; whoever owns these partitions now replays the
            # records and the warehouse's event keys turn them into duplicates.
            self.metrics.commit_failures += 1
            log.warning("offset commit failed, records will be replayed and deduped: %s", exc)

    async def _lag(self) -> int:
        """Records on the assigned partitions not yet consumed."""
        assert self._consumer is not None
        lag = 0
        with contextlib.suppress(KafkaError, AssertionError):
            for tp in self._consumer.assignment():
                high = self._consumer.highwater(tp)
                if high is not None:
                    lag += max(0, high - await self._consumer.position(tp))
        return lag


_PRICED = USAGE_EVENT_COLUMNS.index("priced")
#: Longest a step of stopping (last flush, closing a Kafka client) may take
STOP_STEP_S = 30.0
#: How often an instance says its scratch tables are in use (well inside
#: ``SCRATCH_STALE_AFTER_S``, after which others drop them)
SCRATCH_TEND_EVERY_S = 60.0


class _FlushOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Before partitions move to another instance, write and commit what we hold."""

    def __init__(self, pipeline: PricingPipeline) -> None:
        self.pipeline = pipeline

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if revoked:
            await self.pipeline.flush()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
