"""One flush of the pricing pipeline: records in, priced events stored, handlers told.

    decode -> validate -> dedupe in batch -> price and charge -> dedupe against
    the store -> write -> flush handlers

after which the caller dead-letters what was refused and commits offsets.
Every step is timed (``decode``, ``price``, ``dedupe``, ``write``,
``handlers``: the ``step`` label of the pipeline's duration metric). The
store is idempotent by event identity, so a flush can be repeated from the
start after a failure at any point.

A write the store refuses while it still answers is deterministic (no retry
would help), so the batch is split in halves until the events it refuses are
found; those are stored unpriced instead, or dead-lettered with the store's
reason if even that fails, and every other event is billed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from meterline.catalog import Catalog
from meterline.lib.settings import EventRules
from meterline.lib.warehouse import WarehouseError
from meterline.usage import InvalidEvent, UsageRecord, decode, validate
from meterline.usage.model import EventKey, PlanBook, PricedEvent, charge_of, price_of
from meterline.usage.store import FlushHandler, UsageStore

log = logging.getLogger(__name__)


class Record(Protocol):
    """What the sink reads of a Kafka record (aiokafka's ``ConsumerRecord`` has it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: Record
    reason: str


@dataclass(frozen=True)
class Prepared:
    """A batch decoded, checked and priced, not yet stored."""

    records: int
    events: list[PricedEvent]
    by_key: dict[EventKey, Record]
    dead: list[DeadLetter]


@dataclass
class Flushed:
    """What one flush did with its records."""

    #: every event the batch's records stand for, as stored (fresh or from before)
    events: list[PricedEvent] = field(default_factory=list)
    written: int = 0
    duplicates: int = 0
    unpriced: int = 0
    set_aside: int = 0
    dead: list[DeadLetter] = field(default_factory=list)


class UsageSink:
    """Prices a batch of usage records and stores it, exactly once per event."""

    def __init__(
        self,
        store: UsageStore,
        rules: EventRules,
        handlers: Sequence[FlushHandler] = (),
        observe: Callable[[str, float], None] = lambda step, seconds: None,
        plans: PlanBook | None = None,
    ) -> None:
        self.store = store
        self.rules = rules
        self.handlers = tuple(handlers)
        #: the accounts' plans; None: every account pays the provider cost
        self.plans = plans
        self._observe = observe

    @contextmanager
    def _step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._observe(name, time.perf_counter() - started)

    def flush(self, records: Sequence[Record], catalog: Catalog) -> Flushed:
        """Price and store the batch (blocking); raises WarehouseError on an outage."""
        return self.store_batch(self.prepare(records, catalog))

    def prepare(self, records: Sequence[Record], catalog: Catalog) -> Prepared:
        """Decode, check, price and charge: no store but the plans' (at most one query,
        for the accounts whose plans are not at hand), so it can run ahead of a write.

        Raises the plan store's error when it does not answer: nothing is
        charged without its plan, and the caller retries the batch.
        """
        dead: list[DeadLetter] = []
        with self._step("decode"):
            checked, by_key = self._decode(records, dead)
        with self._step("price"):
            plans = self.plans
            if plans is not None and checked:
                plans.load({e.account_id for e, _, _ in checked})
            priced = []
            for e, received_at, record in checked:
                price_id, tier, cost = price_of(
                    catalog, e.model, e.provider, e.occurred_at, e.usage
                )
                charge, plan_id, plan_version = charge_of(
                    plans, e.account_id, e.occurred_at, price_id, cost
                )
                priced.append(
                    PricedEvent(
                        e.account_id,
                        e.event_id,
                        e.api_key_id,
                        e.model,
                        e.provider,
                        e.occurred_at,
                        received_at,
                        e.status,
                        e.usage,
                        e.latency_ms,
                        e.ttft_ms,
                        price_id,
                        tier,
                        cost,
                        e.provider_usage_json,
                        record.partition,
                        record.offset,
                        charge,
                        plan_id,
                        plan_version,
                    )
                )
        return Prepared(len(records), priced, by_key, dead)

    def store_batch(self, batch: Prepared) -> Flushed:
        """Dedupe, write and tell the handlers; may be called again after a failure."""
        out = Flushed(dead=list(batch.dead))
        with self._step("dedupe"):
            stored = self.store.stored(batch.by_key.keys())
        fresh = [e for e in batch.events if e.key not in stored]
        with self._step("write"):
            kept = self._write(fresh, batch.by_key, out)
            if stored:
                self.store.recount(list(stored.values()))  # a crash may have cut the last one
        out.events = [*stored.values(), *kept]
        out.written = len(kept)
        # in the batch twice, or stored before
        out.duplicates = batch.records - len(batch.dead) - len(fresh)
        out.unpriced = sum(1 for e in kept if not e.priced)
        with self._step("handlers"):
            for handler in self.handlers:
                handler.on_flush(out.events)
        return out

    def _decode(
        self, records: Sequence[Record], dead: list[DeadLetter]
    ) -> tuple[list[tuple[UsageRecord, datetime, Record]], dict[EventKey, Record]]:
        """Checked events with when ingest took them and their record, the first of
        each key only, and the record behind each key.

        Lateness is judged against the record's timestamp, which ingest sets to
        the moment it accepted the event: what ingest took is never refused here.
        """
        events: list[tuple[UsageRecord, datetime, Record]] = []
        by_key: dict[EventKey, Record] = {}
        received: dict[int, datetime] = {}  # records of a batch share milliseconds
        rules = self.rules
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
            if key in by_key:
                continue
            by_key[key] = record
            events.append((event, received_at, record))
        return events, by_key

    def _write(
        self, events: list[PricedEvent], by_key: dict[EventKey, Record], out: Flushed
    ) -> list[PricedEvent]:
        """Store ``events``; returns those stored, as stored.

        An outage is raised for the caller to retry; a refusal splits the
        batch until only the refused events are left (see module docstring).
        """
        if not events:
            return []
        try:
            self.store.insert_priced(events)
            return events
        except WarehouseError as exc:
            if not self.store.reachable():
                raise
            if len(events) > 1:
                half = len(events) // 2
                return self._write(events[:half], by_key, out) + self._write(
                    events[half:], by_key, out
                )
            refused, reason = events[0], str(exc)
        out.set_aside += 1
        log.error(
            "the warehouse refused event %s of account %s (%s); storing it unpriced",
            refused.event_id,
            refused.account_id,
            reason,
        )
        unpriced = _unpriced(refused)
        try:
            self.store.insert_priced([unpriced])
        except WarehouseError as exc:
            if not self.store.reachable():
                raise
            out.dead.append(DeadLetter(by_key[refused.key], f"the warehouse refused it: {exc}"))
            return []
        return [unpriced]


def _unpriced(event: PricedEvent) -> PricedEvent:
    return event._replace(
        price_id="", price_tier="", cost_picos=0, charge_picos=0, plan_id="", plan_version=0
    )
