"""Import prices from genai-prices, Pydantic's curated LLM price data (PyPI).

Only what meterline bills is taken: text input and output, cache reads,
cache writes (5-minute and 1-hour), reasoning output and per-request fees,
with long-context tiers. Batch and priority variants are left out (a gateway's
standard traffic is neither), as are time-of-day prices, which the catalog
cannot express. A price dated in genai-prices starts on that date; the base
price has no date, so it starts at ``effective_from`` (default 2024-01-01),
early enough to price any event still within the lateness bound.

Every value stays a ``Decimal``; a rate finer than a millionth of a dollar
per million tokens cannot be priced exactly and is skipped, never rounded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

from genai_prices import types as gp
from genai_prices.data_snapshot import get_snapshot

from meterline.money import MoneyError
from meterline.pricing import LongContextTier, PriceVersion, Rates

log = logging.getLogger(__name__)

DEFAULT_START = datetime(2024, 1, 1, tzinfo=UTC)

#: genai-prices field -> meterline rate
_RATE_FIELDS = {
    "input_mtok": "input",
    "output_mtok": "output",
    "cache_read_mtok": "cache_read",
    "cache_write_mtok": "cache_write_5m",
    "cache_write_1h_mtok": "cache_write_1h",
    "output_reasoning_mtok": "reasoning",
}


def _tiers(price: gp.ModelPrice) -> list[int]:
    """Every threshold at which some rate changes."""
    starts = {
        tier.start
        for name in _RATE_FIELDS
        if isinstance(value := getattr(price, name, None), gp.TieredPrices)
        for tier in value.tiers
    }
    return sorted(starts)


def _at(value: Decimal | gp.TieredPrices | None, input_tokens: int) -> Decimal | None:
    """The rate in force for a request with ``input_tokens`` (genai-prices' cliff rule)."""
    if not isinstance(value, gp.TieredPrices):
        return value
    rate = value.base
    for tier in value.tiers:
        if input_tokens > tier.start:
            rate = tier.price
    return rate


def _rates(price: gp.ModelPrice, input_tokens: int) -> Rates:
    values = {
        ours: _at(getattr(price, theirs, None), input_tokens)
        for theirs, ours in _RATE_FIELDS.items()
    }
    given = {k: v for k, v in values.items() if v is not None}
    # Without a 1-hour write price, a 1-hour write costs what a write costs.
    if "cache_write_1h" not in given and "cache_write_5m" in given:
        given["cache_write_1h"] = given["cache_write_5m"]
    requests = getattr(price, "requests_kcount", None)
    if requests is not None:
        given["request"] = requests / 1000
    return Rates(**given)  # type: ignore[arg-type]


def _version(model: str, provider: str, price: gp.ModelPrice, start: datetime) -> PriceVersion:
    thresholds = _tiers(price)
    return PriceVersion(
        model=model,
        provider=provider,
        effective_from=start,
        rates=_rates(price, 0),
        tiers=tuple(LongContextTier(t, _rates(price, t + 1)) for t in thresholds),
        source="genai-prices",
    )


def import_versions(
    providers: Sequence[str] | None = None, *, effective_from: datetime | None = None
) -> list[PriceVersion]:
    """Price versions for every text model genai-prices knows (optionally some providers)."""
    start = effective_from or DEFAULT_START
    wanted = {p.lower() for p in providers} if providers else None
    versions: list[PriceVersion] = []
    skipped: dict[str, int] = {}
    for provider in get_snapshot().providers:
        name = provider.id.lower()
        if wanted is not None and name not in wanted:
            continue
        for model in provider.models:
            prices = model.prices
            dated = (
                [(None, prices)]
                if isinstance(prices, gp.ModelPrice)
                else [(p.constraint, p.prices) for p in prices]
            )
            for constraint, price in dated:
                if isinstance(constraint, gp.TimeOfDateConstraint):
                    skipped["time-of-day price"] = skipped.get("time-of-day price", 0) + 1
                    continue
                if (
                    getattr(price, "input_mtok", None) is None
                    or getattr(price, "output_mtok", None) is None
                ):
                    skipped["no text token price"] = skipped.get("no text token price", 0) + 1
                    continue
                since = (
                    datetime.combine(constraint.start_date, datetime.min.time(), tzinfo=UTC)
                    if isinstance(constraint, gp.StartDateConstraint)
                    else start
                )
                try:
                    versions.append(_version(model.id, name, price, since))
                except MoneyError as exc:
                    log.debug("genai-prices: skipped %s/%s: %s", name, model.id, exc)
                    skipped["inexact rate"] = skipped.get("inexact rate", 0) + 1
    if skipped:
        log.info("genai-prices: skipped %s", skipped)
    return versions
