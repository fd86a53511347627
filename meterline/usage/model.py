"""A usage event as billed: its tokens, what it cost and which price made it.

:func:`price_event` is the one route from a checked event to money: the
pricing pipeline, the re-pricing job and anything that estimates a charge
call it, so the catalog's formula (:meth:`CompiledPrice.cost`) has one caller
shape everywhere.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from meterline.catalog.catalog import Catalog
from meterline.tokens import TokenUsage

#: (account_id, event_id): an event's identity, the idempotency key of every store.
EventKey = tuple[str, str]


class PricedEvent(NamedTuple):
    """One stored usage event; ``price_id`` is empty when no price was in force.

    A named tuple, made twice an event on the pipeline's hot path: quicker to
    make than a frozen dataclass, and as immutable.
    """

    account_id: str
    event_id: str
    api_key_id: str
    model: str
    provider: str
    occurred_at: datetime
    received_at: datetime
    status: str
    usage: TokenUsage
    latency_ms: int
    ttft_ms: int
    price_id: str
    price_tier: str
    cost_picos: int
    provider_usage_json: str
    kafka_partition: int
    kafka_offset: int

    @property
    def key(self) -> EventKey:
        return (self.account_id, self.event_id)

    @property
    def priced(self) -> bool:
        return bool(self.price_id)


def price_event(event: PricedEvent, catalog: Catalog) -> PricedEvent:
    """``event`` priced by the version in force at its time; unpriced if there is none."""
    price = catalog.price_for(event.model, event.provider, event.occurred_at)
    if price is None:
        price_id, tier, picos = "", "", 0
    else:
        cost = price.cost(event.usage)
        price_id, tier, picos = cost.price_id, cost.tier, cost.picos
    return PricedEvent(
        event.account_id,
        event.event_id,
        event.api_key_id,
        event.model,
        event.provider,
        event.occurred_at,
        event.received_at,
        event.status,
        event.usage,
        event.latency_ms,
        event.ttft_ms,
        price_id,
        tier,
        picos,
        event.provider_usage_json,
        event.kafka_partition,
        event.kafka_offset,
    )
