"""Matching a (model, provider, time) to the price version in force.

:class:`Catalog` is the in-memory index the pipeline prices with; the price
versions themselves live in the warehouse table ``price_versions``, written
by :class:`PriceBook`. A version is never changed once written: a new price
is a new version with a later ``effective_from``, and events already priced
keep the ``price_id`` that priced them.

Names. A model is found by :func:`model_key` (no vendor prefix, any case,
dots as dashes). A dated name ("gpt-4o-2024-05-13") is a model of its own:
it costs its own price where the catalog has one, else the price of the
model that declares it an alias (:attr:`PriceVersion.aliases`, or
:attr:`PriceVersion.dated_aliases` for every dated name of the model), else
nothing: the event is stored unpriced and can be re-priced, never billed at
a price that may not be its own. An alias holds from the start of the first
version declaring it, through every later version of that model and
provider (a model's price change applies to all its names); to price a
snapshot apart, give it its own price, which wins wherever it is in force.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from typing import Any

from meterline.catalog.pricing import CompiledPrice, LongContextTier, PriceVersion, Rates

log = logging.getLogger(__name__)

_DATE_SUFFIX = re.compile(r"-(\d{8}|\d{4}-\d{2}-\d{2})$")
_COMPACT_DATE = re.compile(r"-(\d{4})(\d{2})(\d{2})$")
_DIGITS = re.compile(r"[0-9]{1,18}")

#: Prices by start, as ``price_for`` picks from them: (starts, prices), both sorted by start.
_Schedule = tuple[list[datetime], list[CompiledPrice]]


@lru_cache(maxsize=4096)
def model_key(model: str) -> str:
    """Matching key: no vendor prefix, lower case, dots as dashes.

    "openai/gpt-4.1-mini", "gpt-4.1-mini" and "GPT-4-1-mini" share one key, so
    do "claude-sonnet-4.5" and "anthropic/claude-sonnet-4-5".
    """
    return model.rsplit("/", 1)[-1].strip().lower().replace(".", "-")


def _undated(key: str) -> str:
    """ "gpt-4-1-mini-2025-04-14" -> "gpt-4-1-mini": the model a dated name is a snapshot of."""
    return _DATE_SUFFIX.sub("", key)


def _alias_key(key: str) -> str:
    """The key aliases are matched by: a compact date suffix as the dashed one.

    "gpt-4-1-mini-20250414" and "gpt-4-1-mini-2025-04-14" name one snapshot
    (LiteLLM and OpenRouter send the compact form, genai-prices matches both).
    """
    return _COMPACT_DATE.sub(r"-\1-\2-\3", key)


@dataclass(frozen=True, slots=True)
class SkippedVersion:
    """A stored version that could not be loaded, and why: it prices nothing."""

    price_id: str
    model: str
    provider: str
    reason: str


class Catalog:
    """Price lookup by (model, provider, time), over compiled integer rates.

    ``skipped`` lists the stored versions left out because they are invalid
    (see :meth:`PriceBook.load`); an event they would have priced is unpriced.
    """

    def __init__(
        self, versions: Iterable[PriceVersion], *, skipped: Iterable[SkippedVersion] = ()
    ) -> None:
        self.versions = sorted(
            versions, key=lambda v: (model_key(v.model), v.provider.lower(), v.effective_from)
        )
        self.skipped = tuple(skipped)
        grouped: dict[tuple[str, str], list[PriceVersion]] = {}
        for version in self.versions:
            key = (model_key(version.model), version.provider.lower())
            grouped.setdefault(key, []).append(version)
        self._index: dict[tuple[str, str], _Schedule] = {
            key: ([v.effective_from for v in vs], [v.compile() for v in vs])
            for key, vs in grouped.items()
        }
        # (alias key, provider) -> {target model key: start of its first version declaring it}
        claims: dict[tuple[str, str], dict[str, datetime]] = {}
        #: (model key, provider) -> start of its first version declaring dated aliases
        self._dated: dict[tuple[str, str], datetime] = {}
        for (target, provider), vs in grouped.items():
            for version in vs:  # by start: the first declaration is kept
                for alias in version.aliases:
                    claims.setdefault((_alias_key(model_key(alias)), provider), {}).setdefault(
                        target, version.effective_from
                    )
                if version.dated_aliases:
                    self._dated.setdefault((target, provider), version.effective_from)
        self._aliases: dict[tuple[str, str], tuple[str, datetime]] = {}
        for (alias, provider), targets in claims.items():
            if len(targets) > 1:  # two prices for one name: neither, rather than a guess
                log.warning(
                    "catalog: %s/%s is declared an alias of %s; it stays unpriced",
                    provider,
                    alias,
                    " and ".join(sorted(targets)),
                )
                continue
            [(target, start)] = targets.items()
            self._aliases[(alias, provider)] = (target, start)
        self._resolved: dict[tuple[str, str], _Schedule | None] = {}

    def __len__(self) -> int:
        return len(self.versions)

    def _alias_of(self, key: str, provider: str) -> tuple[str, datetime] | None:
        """(model key, from) of the model this name is declared an alias of, if any."""
        declared = self._aliases.get((_alias_key(key), provider))
        if declared is not None:
            return declared
        undated = _undated(key)
        if undated != key and (undated, provider) in self._dated:
            return undated, self._dated[(undated, provider)]
        return None

    def _resolve(self, model: str, provider: str) -> _Schedule | None:
        """Every price this name has: its own, and before those the alias's, if declared."""
        try:
            return self._resolved[(model, provider)]
        except KeyError:
            pass
        key = model_key(model)
        prov = provider.lower()
        schedule = self._index.get((key, prov))
        alias = self._alias_of(key, prov)
        if alias is not None:
            target, since = alias
            starts, prices = self._index[(target, prov)]
            i = bisect.bisect_left(starts, since)
            if schedule is None:
                schedule = (starts[i:], prices[i:])
            else:  # its own price wins from its first start on
                j = max(i, bisect.bisect_left(starts, schedule[0][0]))
                schedule = (starts[i:j] + schedule[0], prices[i:j] + schedule[1])
        self._resolved[(model, provider)] = schedule
        return schedule

    def price_for(self, model: str, provider: str, at: datetime) -> CompiledPrice | None:
        """The price in force for this model and provider at ``at``, if any."""
        schedule = self._resolve(model, provider)
        if schedule is None:
            return None
        starts, prices = schedule
        i = bisect.bisect_right(starts, at) - 1
        return prices[i] if i >= 0 else None

    def schedule(self, model: str, provider: str) -> list[tuple[datetime, CompiledPrice]]:
        """Every price this model and provider has, by start: what ``price_for`` picks from.

        Of versions starting at the same moment only the one ``price_for``
        would pick is kept, so a lookup in the list needs no tie-break.
        Before the first start nothing is in force, and after it there is no
        gap: the last start at or before an instant gives its price.
        """
        schedule = self._resolve(model, provider)
        if schedule is None:
            return []
        starts, prices = schedule
        return [
            (start, price)
            for i, (start, price) in enumerate(zip(starts, prices, strict=True))
            if i + 1 == len(starts) or starts[i + 1] != start
        ]

    def current(self, at: datetime | None = None) -> list[PriceVersion]:
        """One version per (model, provider): the one in force at ``at`` (default now)."""
        at = at or datetime.now(UTC)
        latest: dict[tuple[str, str], PriceVersion] = {}
        for version in self.versions:
            if version.effective_from <= at:
                latest[(model_key(version.model), version.provider)] = version
        return list(latest.values())


def _parse_time(value: str | datetime) -> datetime:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    else:
        raise ValueError(f"effective_from: {value!r} is not an ISO 8601 instant")
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _token_count(value: object, *, what: str) -> int:
    """A whole number of tokens given as an integer or a string of digits; nothing rounded."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        return int(value)
    raise ValueError(f"{what}: {value!r} is not a whole number of tokens")


def _mapping(value: object, *, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be an object, not {value!r}")
    return value


def parse_price(data: Mapping[str, Any], *, source: str = "manual") -> PriceVersion:
    """A price version from its JSON form; raises ValueError with the reason.

    Besides ``model``, ``provider``, ``effective_from``, ``rates`` and
    ``tiers``: ``aliases``, a list of other names of the model that cost this
    price (dated snapshots), and ``dated_aliases``, true to make every dated
    name of the model one. A rate left out costs its fallback (see
    :data:`~meterline.catalog.pricing.FALLBACKS`); a tier's rates left out are
    the base rates as given.
    """
    data = _mapping(data, what="price")
    try:
        model = str(data["model"]).strip()
        provider = str(data["provider"]).strip().lower()
        effective_from = _parse_time(data["effective_from"])
        base = _mapping(data["rates"], what="rates")
    except KeyError as exc:
        raise ValueError(f"price is missing {exc.args[0]!r}") from exc
    if not model or not provider:
        raise ValueError("price needs a model and a provider")
    rates = Rates.from_json(base)
    tiers: list[LongContextTier] = []
    for t in data.get("tiers") or ():
        tier = _mapping(t, what="tier")
        threshold = _token_count(tier.get("above_input_tokens"), what="tier above_input_tokens")
        try:
            tiers.append(
                LongContextTier(
                    above_input_tokens=threshold,
                    rates=Rates.from_json(
                        {**base, **_mapping(tier.get("rates") or {}, what="tier rates")}
                    ),
                )
            )
        except ValueError as exc:  # MoneyError included: keep its class, say which tier
            raise type(exc)(f"tier above {threshold} input tokens: {exc}") from exc
    aliases = data.get("aliases") or ()
    if isinstance(aliases, str) or not isinstance(aliases, list | tuple):
        raise ValueError(f"aliases must be a list of model names, not {aliases!r}")
    return PriceVersion(
        model=model,
        provider=provider,
        effective_from=effective_from,
        rates=rates,
        tiers=tuple(tiers),
        source=str(data.get("source") or source),
        aliases=tuple(aliases),
        dated_aliases=False if data.get("dated_aliases") is None else data["dated_aliases"],
    )


def seed_versions() -> list[PriceVersion]:
    """The catalog meterline ships with (``catalog/seed.json``)."""
    seed = json.loads(resources.files("meterline.catalog").joinpath("seed.json").read_text())
    return [
        parse_price(
            {**entry, "provider": provider, "effective_from": seed["effective_from"]},
            source=seed["source"],
        )
        for entry in seed["prices"]
        for provider in entry["providers"]
    ]
