"""A usage event as billed: its tokens, what it cost and which price made it.

:func:`price_of` is the one route from a checked event to money: the
pricing pipeline, the re-pricing job (through :func:`price_event`) and
anything that estimates a charge call it, so the catalog's formula
(:meth:`CompiledPrice.cost`) has one caller shape everywhere.
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


def price_of(
    catalog: Catalog, model: str, provider: str, at: datetime, usage: TokenUsage
) -> tuple[str, str, int]:
    """(price_id, tier, pico-dollars) of one request; ("", "", 0) when no price is in force."""
    price = catalog.price_for(model, provider, at)
    if price is None:
        return "", "", 0
    cost = price.cost(usage)
    return cost.price_id, cost.tier, cost.picos


def price_event(event: PricedEvent, catalog: Catalog) -> PricedEvent:
    """``event`` priced by the version in force at its time; unpriced if there is none."""
    price_id, tier, picos = price_of(
        catalog, event.model, event.provider, event.occurred_at, event.usage
    )
    return event._replace(price_id=price_id, price_tier=tier, cost_picos=picos)
