"""A usage event as billed: its tokens, what it cost, what the account pays, and
which price and plan made them.

:func:`price_of` is the one route from a checked event to money, and
:func:`charge_of` the one from its cost to the account's charge: the pricing
pipeline, the re-pricing job (through :func:`price_event`) and anything that
estimates a charge call them, so the catalog's formula
(:meth:`CompiledPrice.cost`) and the plan's
(:meth:`~meterline.quotas.plans.PlanVersion.charge_picos`) have one caller
shape everywhere.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import NamedTuple, Protocol

from meterline.catalog.catalog import Catalog
from meterline.quotas.plans import PlanVersion
from meterline.tokens import TokenUsage

#: (account_id, event_id): an event's identity, the idempotency key of every store.
EventKey = tuple[str, str]


class PlanBook(Protocol):
    """Which plan version prices an account's usage at an instant
    (:class:`~meterline.quotas.charges.ChargeBook`); blocking."""

    def load(self, account_ids: Collection[str]) -> None:
        """Have the plans of these accounts at hand (one round trip for a batch)."""
        ...

    def plan_at(self, account_id: str, occurred_at: datetime) -> PlanVersion | None: ...


class PricedEvent(NamedTuple):
    """One stored usage event; ``price_id`` is empty when no price was in force.

    ``cost_picos`` is what the provider charges, ``charge_picos`` what the
    account pays, priced by ``plan_id`` / ``plan_version`` ("" / 0: no plan,
    so the charge is the cost). The last three have defaults only so that an
    event can be made before it is priced: :func:`price_event` sets them.

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
    charge_picos: int = 0
    plan_id: str = ""
    plan_version: int = 0

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


def charge_of(
    plans: PlanBook | None, account_id: str, at: datetime, price_id: str, cost_picos: int
) -> tuple[int, str, int]:
    """(pico-dollars, plan_id, plan version) the account pays for a request of that cost.

    Unpriced (no ``price_id``): nothing, as its cost. No plan book, or no plan
    in force: the cost itself. Raises what the book raises (its store is down).
    """
    if not price_id:
        return 0, "", 0
    plan = None if plans is None else plans.plan_at(account_id, at)
    if plan is None:
        return cost_picos, "", 0
    return plan.charge_picos(cost_picos), plan.plan_id, plan.version


def price_event(event: PricedEvent, catalog: Catalog, plans: PlanBook | None = None) -> PricedEvent:
    """``event`` priced by the version in force at its time, and charged by the plan in
    force then; unpriced if there is no price."""
    price_id, tier, picos = price_of(
        catalog, event.model, event.provider, event.occurred_at, event.usage
    )
    charge, plan_id, plan_version = charge_of(
        plans, event.account_id, event.occurred_at, price_id, picos
    )
    return event._replace(
        price_id=price_id,
        price_tier=tier,
        cost_picos=picos,
        charge_picos=charge,
        plan_id=plan_id,
        plan_version=plan_version,
    )
