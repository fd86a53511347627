"""Import prices from genai-prices, Pydantic's curated LLM price data (PyPI).

Each (model, provider) of the snapshot bundled with the installed package
becomes one or more :class:`PriceVersion`, priced the way genai-prices itself
prices a request without a price context:

* Rates: ``input_mtok``, ``output_mtok``, ``cache_read_mtok``,
  ``cache_write_mtok`` (-> ``cache_write_5m``), ``cache_write_1h_mtok``,
  ``output_reasoning_mtok`` and ``requests_kcount`` (/ 1000 -> fee per
  request). genai-prices splits a request's tokens into the most specific
  *priced* unit, so a rate it does not give falls back to its parent: no
  cache-read or cache-write rate means those tokens cost the input rate, no
  reasoning rate means the output rate, and no 1-hour write rate means the
  (5-minute) write rate. genai-prices gives a 1-hour rate for every model of
  its "anthropic" provider; where a reseller's Claude has none (some Bedrock,
  Vertex, OpenRouter entries) genai-prices charges the write rate, and so do
  we: Anthropic's "2 × input" rule is not in the data, so it is not applied.
  A missing input or output rate costs nothing, as in genai-prices
  (embeddings have no output).
* Tiers: a ``Tier(start=T)`` applies once the request's total input tokens
  are ``> T`` (genai-prices' ``calc_unit_price``), which is exactly
  meterline's ``input_tokens > above_input_tokens``, so ``T`` is kept as is.
  genai-prices tiers each rate on its own; every distinct threshold becomes
  one :class:`LongContextTier` holding every rate in force above it.
* Dates: genai-prices picks the last ``ConditionalPrice`` whose start date
  has come (the first one before any has); a version starts at each date
  where that pick changes, at 00:00 UTC as genai-prices compares UTC dates.
  The base price has no date, and the catalog needs one, so it starts at
  ``effective_from`` (default 2024-01-01 UTC, before any event meterline
  still accepts).

* Names: genai-prices matches a model by its own rules (``match`` clauses).
  A dated name it maps to the model is imported as an alias, so it keeps the
  model's price: each name of an ``equals`` clause that is a dated snapshot
  of the model (``gpt-4o-2024-08-06`` of ``gpt-4o``), and every dated name
  (``dated_aliases``) where genai-prices' own lookup gives the model for any
  date in either spelling (prefix or pattern rules, as for Anthropic's
  ``claude-sonnet-4-5-20250929``).
  A dated name genai-prices does not map to the model stays unpriced, unless
  it is a model of its own (``gpt-4o-2024-05-13``).

Not imported, and counted in :class:`ImportResult`:

* a model with a time-of-day price. genai-prices' undated price is then the
  off-peak one (DeepSeek) and the daily window the peak one, so dropping just
  the window would bill peak hours at the off-peak rate; the whole model is
  skipped instead.
* a model without a token rate (audio hours, characters, pages, or an empty
  price, genai-prices' way of saying "free"): meterline bills tokens only.
* a model with a rate finer than a millionth of a dollar per million tokens
  (or a fee finer than a pico-dollar): it cannot be priced exactly and is
  never rounded; logged as a warning.
* a model with a rate or fee above the bounds of :mod:`meterline.money`
  (none today: the dearest rate is $600 per million tokens); logged too.
* two models of one provider that the catalog cannot tell apart
  (:func:`~meterline.catalog.model_key`) but that are priced differently.
* request-context variants (batch, priority, flex, regional routes...):
  meterline does not know a request's service tier, so the standard price is
  imported and the variant dropped. Prices for other units (web searches,
  audio or image tokens...) are dropped too: their tokens are billed at the
  text rates.

Provider names are genai-prices' ids, which are already meterline's lower-case
names ("openai", "anthropic", "azure", "mistral", "groq", "aws" for Bedrock,
"x-ai"...). genai-prices has a single "google" provider, matched for both the
Gemini API and Vertex AI, so both are "google": there is no gla/vertex split
to map.
A provider that genai-prices prices through another one's models (Azure
through OpenAI's, Google through Anthropic's) gets those models as its own
versions, but only those genai-prices would actually fall back to.

Every value stays a ``Decimal``: genai-prices parses its data as ``Decimal``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, time
from decimal import Decimal

from genai_prices import types as gp
from genai_prices.data_snapshot import get_snapshot

from meterline.catalog.catalog import _undated, model_key
from meterline.catalog.pricing import LongContextTier, PriceVersion, Rates
from meterline.money import AmountOutOfBounds, MoneyError

__all__ = ["DEFAULT_EFFECTIVE_FROM", "SOURCE", "ImportResult", "import_prices", "import_versions"]

log = logging.getLogger(__name__)

SOURCE = "genai-prices"
DEFAULT_EFFECTIVE_FROM = datetime(2024, 1, 1, tzinfo=UTC)

#: The genai-prices price keys meterline bills; every other key is dropped and counted.
BILLED_KEYS = frozenset(
    {
        "input_mtok",
        "output_mtok",
        "cache_read_mtok",
        "cache_write_mtok",
        "cache_write_5m_mtok",
        "cache_write_1h_mtok",
        "output_reasoning_mtok",
        "requests_kcount",
    }
)

Price = Decimal | gp.TieredPrices


class _Skip(Exception):
    """A (model, provider) that cannot be imported; ``args[0]`` is the reason."""


@dataclass
class ImportResult:
    """The versions read, and what was left out and why (counts, for the operator)."""

    versions: list[PriceVersion] = field(default_factory=list)
    #: (model, provider) pairs not imported, by reason
    skipped: Counter[str] = field(default_factory=Counter)
    #: parts of imported models' prices left out (variants, other units), by what
    dropped: Counter[str] = field(default_factory=Counter)


def provider_name(provider_id: str) -> str:
    """meterline's provider name for a genai-prices provider id (see module docstring)."""
    return provider_id.strip().lower()


def _price(price: gp.ModelPrice, key: str) -> Price | None:
    value = getattr(price, key, None)
    if value is None or isinstance(value, gp.TieredPrices):
        return value
    if not isinstance(value, Decimal):  # genai-prices parses Decimal; anything else is not exact
        raise _Skip("invalid rate")
    return value


def _at(value: Price | None, input_tokens: int) -> Decimal | None:
    """The rate in force for a request with this many input tokens (genai-prices' rule)."""
    if not isinstance(value, gp.TieredPrices):
        return value
    rate = value.base
    for tier in value.tiers:  # sorted by start
        if input_tokens > tier.start:
            rate = tier.price
    return rate


def _rates(price: gp.ModelPrice, input_tokens: int) -> Rates:
    """Every meterline rate at this input size, unpriced units falling back to their parent."""

    def rate(key: str) -> Decimal | None:
        return _at(_price(price, key), input_tokens)

    input_rate = rate("input_mtok")
    output = rate("output_mtok")
    input_or_zero = Decimal(0) if input_rate is None else input_rate
    cache_read = rate("cache_read_mtok")
    cache_write = rate("cache_write_mtok")
    cache_write = input_or_zero if cache_write is None else cache_write
    write_5m = rate("cache_write_5m_mtok")
    write_1h = rate("cache_write_1h_mtok")
    per_k_requests = rate("requests_kcount")
    reasoning = rate("output_reasoning_mtok")
    # every fallback written out (not left to the catalog's): the stored rates, and so the
    # price ids, stay those of earlier imports, and genai-prices' rules are spelled out here
    given = (input_or_zero, output, cache_read, cache_write, write_5m, write_1h, reasoning)
    if any(v is not None and (not v.is_finite() or v < 0) for v in (*given, per_k_requests)):
        raise _Skip("invalid rate")
    return Rates(
        input=input_or_zero,
        output=Decimal(0) if output is None else output,
        cache_read=input_or_zero if cache_read is None else cache_read,
        cache_write_5m=cache_write if write_5m is None else write_5m,
        cache_write_1h=cache_write if write_1h is None else write_1h,
        reasoning=reasoning,
        request=Decimal(0) if per_k_requests is None else _per_request(per_k_requests),
    )


def _per_request(per_thousand: Decimal) -> Decimal:
    """A fee per 1000 requests as a fee per request, exactly (no context, so no rounding)."""
    sign, digits, exponent = per_thousand.as_tuple()
    assert isinstance(exponent, int)  # finite: checked by the caller
    return Decimal((sign, digits, exponent - 3))


def _equals_names(match: object) -> Iterator[str]:
    """The names an ``equals`` clause of ``match`` gives (through ``or``, not ``and``)."""
    if isinstance(match, gp.ClauseEquals):
        yield match.equals
    elif isinstance(match, gp.ClauseOr):
        for clause in match.or_:
            yield from _equals_names(clause)


#: Dates no model is named after: if genai-prices maps them to a model, it maps any date.
_ANY_DATE = ("-20991231", "-2099-12-31")


def _aliases(
    model: gp.ModelInfo, provider: gp.Provider, providers: list[gp.Provider]
) -> tuple[tuple[str, ...], bool]:
    """(dated names, every dated name?) that genai-prices itself prices as this model.

    Every dated name is the model's when genai-prices' lookup gives it for a
    date no model has (a prefix or pattern rule); otherwise the dated names of
    its ``equals`` clauses that the lookup gives it, which may be another
    model's snapshot spelled out ("deepseek-v4-flash-20260731" is
    "deepseek-v4-flash-0731", not "deepseek-v4-flash").
    """

    def theirs(name: str) -> bool:
        # is_match first: it is cheap, and needed; find_model then says whether an
        # earlier model of the list takes the name first
        return model.is_match(name) and (
            provider.find_model(name, all_providers=providers) is model
        )

    own = model_key(model.id)
    every_date = any(theirs(model.id + date) for date in _ANY_DATE)
    names: dict[str, str] = {}
    for name in _equals_names(model.match):
        key = model_key(name)
        undated = _undated(key)
        if key == own or undated == key or (every_date and undated == own):
            continue  # the model itself, not a dated name, or a date already covered
        if theirs(name):
            names.setdefault(key, name)
    return tuple(sorted(names.values())), every_date


def _thresholds(price: gp.ModelPrice) -> list[int]:
    """Every input size above which some billed rate changes."""
    return sorted(
        {
            tier.start
            for key in BILLED_KEYS
            if isinstance(value := _price(price, key), gp.TieredPrices)
            for tier in value.tiers
        }
    )


def _tiers(price: gp.ModelPrice) -> tuple[LongContextTier, ...]:
    tiers: list[LongContextTier] = []
    previous = _rates(price, 0)
    for threshold in _thresholds(price):
        rates = _rates(price, threshold + 1)
        if rates != previous:
            tiers.append(LongContextTier(above_input_tokens=threshold, rates=rates))
        previous = rates
    return tuple(tiers)


def _timeline(model: gp.ModelInfo, start: datetime) -> list[tuple[datetime, gp.ModelPrice]]:
    """(effective_from, price) whenever genai-prices' choice of price changes, from ``start``."""
    if isinstance(model.prices, gp.ModelPrice):
        return [(start, model.prices)]
    if any(isinstance(p.constraint, gp.TimeOfDateConstraint) for p in model.prices):
        raise _Skip("time-of-day price")
    dates = {
        datetime.combine(p.constraint.start_date, time(0), tzinfo=UTC)
        for p in model.prices
        if isinstance(p.constraint, gp.StartDateConstraint)
    }
    timeline: list[tuple[datetime, gp.ModelPrice]] = []
    for moment in [start, *sorted(d for d in dates if d > start)]:
        price = model.get_prices(moment)  # genai-prices' own pick, no price context
        if not timeline or timeline[-1][1] is not price:
            timeline.append((moment, price))
    return timeline


def _versions(
    model: gp.ModelInfo,
    provider: str,
    start: datetime,
    dropped: Counter[str],
    names: tuple[tuple[str, ...], bool] = ((), False),
) -> list[PriceVersion]:
    """All versions of one (model, provider), or :class:`_Skip`; ``names`` from :func:`_aliases`."""
    timeline = _timeline(model, start)
    if any(
        _price(price, "input_mtok") is None and _price(price, "output_mtok") is None
        for _, price in timeline
    ):
        raise _Skip("no token rate")
    versions: list[PriceVersion] = []
    for moment, price in timeline:
        try:
            version = PriceVersion(
                model=model.id,
                provider=provider,
                effective_from=moment,
                rates=_rates(price, 0),
                tiers=_tiers(price),
                source=SOURCE,
                aliases=names[0],
                dated_aliases=names[1],
            )
        except MoneyError as exc:
            log.warning("genai-prices: %s/%s not imported: %s", provider, model.id, exc)
            bounds = isinstance(exc, AmountOutOfBounds)
            raise _Skip("rate out of bounds" if bounds else "inexact rate") from exc
        if not versions or versions[-1].spec_json() != version.spec_json():
            versions.append(version)
    for key in {k for _, p in timeline for k, v in vars(p).items() if v is not None} - BILLED_KEYS:
        dropped[f"price for {key.removesuffix('_mtok')}"] += 1
    for variant in model.price_variants or ():
        if any(v is not None for v in vars(variant.prices).values()):
            when = ",".join(f"{k}={v}" for k, v in sorted(variant.when.items()))
            dropped[f"variant {when}"] += 1
    return versions


def _candidates(provider: gp.Provider, providers: list[gp.Provider]) -> Iterable[gp.ModelInfo]:
    """The provider's models, then those genai-prices would take from its fallback providers."""
    yield from provider.models
    by_id = {p.id: p for p in providers}
    for fallback_id in provider.fallback_model_providers or ():
        for model in by_id[fallback_id].models if fallback_id in by_id else ():
            if provider.find_model(model.id, all_providers=providers) is model:
                yield model


def _price_json(version: PriceVersion) -> str:
    """The version's price, names left out: what tells two models of one key apart."""
    spec = {k: v for k, v in version.spec_json().items() if k not in ("aliases", "dated_aliases")}
    return json.dumps(spec, sort_keys=True)


def _with_names_of(
    versions: list[PriceVersion], alike: list[list[PriceVersion]]
) -> list[PriceVersion]:
    """``versions`` declaring the aliases of every model in ``alike`` (one key, one price)."""
    names: dict[str, str] = {}
    for vs in alike:
        for alias in vs[0].aliases:
            names.setdefault(model_key(alias), alias)
    aliases = tuple(sorted(names.values()))
    dated = any(vs[0].dated_aliases for vs in alike)
    if (aliases, dated) == (versions[0].aliases, versions[0].dated_aliases):
        return versions
    return [replace(v, aliases=aliases, dated_aliases=dated, price_id="") for v in versions]


def import_prices(
    providers: Sequence[str] | None = None, *, effective_from: datetime | None = None
) -> ImportResult:
    """Read genai-prices' bundled snapshot into price versions, counting what is left out.

    ``providers`` limits the import to these meterline provider names; a name
    genai-prices does not know is an error rather than an empty import.
    ``effective_from`` is when undated prices start (naive means UTC).
    """
    start = effective_from or DEFAULT_EFFECTIVE_FROM
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    snapshot = get_snapshot().providers
    known = {provider_name(p.id) for p in snapshot}
    wanted = None if providers is None else {provider_name(p) for p in providers}
    if wanted is not None and wanted - known:
        raise ValueError(
            f"genai-prices has no provider {', '.join(sorted(wanted - known))}; "
            f"known: {', '.join(sorted(known))}"
        )
    result = ImportResult()
    for provider in snapshot:
        name = provider_name(provider.id)
        if wanted is not None and name not in wanted:
            continue
        # the catalog finds a model by model_key, so models sharing one are one entry
        by_key: dict[str, list[tuple[str, list[PriceVersion], Counter[str]]]] = {}
        for model in _candidates(provider, snapshot):
            dropped: Counter[str] = Counter()
            try:
                versions = _versions(
                    model, name, start, dropped, _aliases(model, provider, snapshot)
                )
            except _Skip as skip:
                result.skipped[skip.args[0]] += 1
                continue
            by_key.setdefault(model_key(model.id), []).append((model.id, versions, dropped))
        for key, entries in by_key.items():
            prices = {tuple((v.effective_from, _price_json(v)) for v in vs) for _, vs, _ in entries}
            if len(prices) > 1:
                log.warning(
                    "genai-prices: %s models %s share the catalog key %r but not their price; "
                    "none imported",
                    name,
                    ", ".join(model_id for model_id, _, _ in entries),
                    key,
                )
                result.skipped["ambiguous model name"] += len(entries)
                continue
            if len(entries) > 1:
                result.skipped["same name and price as another model"] += len(entries) - 1
            _, versions, dropped = entries[0]
            result.versions.extend(_with_names_of(versions, [vs for _, vs, _ in entries]))
            result.dropped.update(dropped)
    return result


def import_versions(
    providers: Sequence[str] | None = None, *, effective_from: datetime | None = None
) -> list[PriceVersion]:
    """Price versions from genai-prices (see :func:`import_prices`); logs what was skipped."""
    result = import_prices(providers, effective_from=effective_from)
    log.info(
        "genai-prices: %d price versions; skipped (model, provider): %s; left out: %s",
        len(result.versions),
        dict(result.skipped) or "none",
        dict(result.dropped) or "none",
    )
    return result.versions
