"""The usage slice's ports: where priced events are kept, and who hears of them.

The store is idempotent by event identity: writing an event that is already
stored, for whatever reason (a replay after a crash, a frozen instance that
wakes up and finishes its write, a retried report), changes no answer. The
rollups are recounted from the deduplicated events, never added to, so they
are idempotent too.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Protocol

from meterline.usage.model import EventKey, PricedEvent
from meterline.usage.report import Dimension, UsageReport


class UsageStore(Protocol):
    """Priced usage events and their rollups (ClickHouse: :mod:`.clickhouse`)."""

    def stored(self, keys: Collection[EventKey]) -> dict[EventKey, PricedEvent]:
        """The events among ``keys`` that are already stored, as stored."""
        ...

    def insert_priced(self, events: Sequence[PricedEvent]) -> None:
        """Store ``events`` and recount the rollups they fall in.

        A later write of the same event (same key and time) replaces the
        earlier one: re-pricing writes the event again with its new price.
        """
        ...

    def unpriced(
        self, start: datetime, end: datetime, accounts: Sequence[str] = ()
    ) -> list[PricedEvent]:
        """The events of [start, end) stored without a price (of ``accounts``, if given)."""
        ...

    def recount(self, events: Sequence[PricedEvent]) -> None:
        """Recount the rollups ``events`` fall in, from the stored events."""
        ...

    def reachable(self) -> bool:
        """Whether the store answers at all: tells an outage from a refused write."""
        ...

    def report(
        self, account_id: str, start: datetime, end: datetime, group_by: Sequence[Dimension]
    ) -> UsageReport:
        """Usage of ``account_id`` in [start, end), in total and per group."""
        ...


class FlushHandler(Protocol):
    """Hears each batch's priced events after they are stored, before offsets commit.

    A replayed batch hands over the events its records stored, also those an
    earlier attempt wrote, so a handler keyed by event id is exact across
    crashes. Quotas, credits and alerts are handlers. Raising makes the
    pipeline retry the batch (nothing is committed), so a handler must be
    idempotent by event id.
    """

    name: str

    def on_flush(self, events: Sequence[PricedEvent]) -> None: ...
