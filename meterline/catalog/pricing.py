"""The one place where tokens become money.

Token semantics follow OpenAI's ``usage``: ``input_tokens`` counts every prompt
token, cache reads and writes included, and the cache counts are subsets of
it; ``reasoning_tokens`` is a subset of ``output_tokens``. Providers that
report differently (Anthropic) are converted by :mod:`meterline.usage.adapters`
before they get here, so this module never has to guess.

Price = uncached input × input rate + cache reads × cache-read rate
      + cache writes × their 5m / 1h rates
      + non-reasoning output × output rate + reasoning × reasoning rate
      + per-request fee.
A long-context tier, chosen by the total input, replaces every rate once the
request's input crosses its threshold.

A rate a price does not give costs its parent's rate, as providers and
genai-prices bill it: cache reads and 5-minute cache writes the input rate,
1-hour cache writes the 5-minute write rate (so the input rate when neither
is given), reasoning the output rate. "Not given" is ``None`` and stays
``None`` in the stored form; a rate given as 0 is free. The fallback is
resolved in one place, :func:`_compile_rates`.

Every amount is bounded (:mod:`meterline.money`, "Bounds") so that no store
can overflow; a price outside the bounds is refused when it is made.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple

from meterline.money import (
    MAX_RATE_USD_PER_MTOK,
    MAX_REQUEST_FEE_USD,
    MAX_TOKEN_COUNT,
    check_bound,
    rate_to_picos_per_token,
    to_decimal,
    usd_to_picos,
)
from meterline.tokens import TokenUsage

_PER_MTOK = "USD per million tokens"

#: Rates a price may leave out (``None``), and the rate each then costs.
FALLBACKS: Mapping[str, str] = {
    "cache_read": "input",
    "cache_write_5m": "input",
    "cache_write_1h": "cache_write_5m",
    "reasoning": "output",
}


@dataclass(frozen=True, slots=True)
class Rates:
    """US dollars per million tokens, plus a per-request fee in dollars.

    A rate left out (``None``) costs the rate :data:`FALLBACKS` names: the
    cache rates the input rate (1-hour writes the 5-minute write rate first),
    reasoning the output rate. Every rate is at most
    :data:`~meterline.money.MAX_RATE_USD_PER_MTOK`, the fee at most
    :data:`~meterline.money.MAX_REQUEST_FEE_USD`; anything else is refused
    with a :class:`~meterline.money.MoneyError` naming the rate and the bound.
    """

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write_5m: Decimal | None = None
    cache_write_1h: Decimal | None = None
    reasoning: Decimal | None = None
    request: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                if f.name in FALLBACKS:
                    continue
                raise ValueError(f"missing rate: {f.name}")
            if f.name == "request":
                what, bound, unit = "request fee", MAX_REQUEST_FEE_USD, "USD per request"
            else:
                what, bound, unit = f"{f.name} rate", MAX_RATE_USD_PER_MTOK, _PER_MTOK
            amount = check_bound(to_decimal(value, what=what), bound, what=what, unit=unit)
            object.__setattr__(self, f.name, amount)

    def to_json(self) -> dict[str, str | None]:
        """Every rate as given: a decimal string, or ``None`` (null) where it falls back."""
        return {
            f.name: (None if getattr(self, f.name) is None else str(getattr(self, f.name)))
            for f in fields(self)
        }

    @classmethod
    def from_json(cls, data: Mapping[str, str | None]) -> Rates:
        """Rates from their JSON form; a rate absent or null is not given (see :data:`FALLBACKS`).

        Versions stored before the fallback existed wrote every rate, "0" where
        none was given, so they keep costing what they cost then.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"rates must be an object of decimal strings, not {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown rate(s): {', '.join(sorted(map(str, unknown)))}")
        values = {
            name: to_decimal(value, what=name) for name, value in data.items() if value is not None
        }
        missing = {"input", "output"} - set(values)
        if missing:
            raise ValueError(f"missing rate(s): {', '.join(sorted(missing))}")
        return cls(**values)


@dataclass(frozen=True, slots=True)
class LongContextTier:
    """Rates that replace the base rates when input tokens exceed ``above_input_tokens``."""

    above_input_tokens: int
    rates: Rates

    def __post_init__(self) -> None:
        threshold = self.above_input_tokens
        if isinstance(threshold, bool) or not isinstance(threshold, int):
            raise ValueError(f"above_input_tokens: {threshold!r} is not a whole number of tokens")
        if not 0 <= threshold <= MAX_TOKEN_COUNT:
            raise ValueError(
                f"above_input_tokens: {threshold} is outside 0 to {MAX_TOKEN_COUNT} tokens "
                "(the most tokens an event may count)"
            )


def _aliases(model: str, names: Iterable[str]) -> tuple[str, ...]:
    """Alias names, stripped, sorted and checked: none is the model's own name or repeated."""
    # imported here: catalog.py imports this module
    from meterline.catalog.catalog import model_key

    if isinstance(names, str):
        raise ValueError("aliases must be a list of model names, not one string")
    found: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"alias {name!r} is not a model name")
        key = model_key(name)
        if key == model_key(model):
            raise ValueError(f"alias {name!r} is the model's own name")
        if key in found:
            raise ValueError(f"aliases {found[key]!r} and {name.strip()!r} are the same name")
        found[key] = name.strip()
    return tuple(sorted(found.values()))


@dataclass(frozen=True, slots=True)
class PriceVersion:
    """The price of one (model, provider) from ``effective_from`` until the next version.

    ``aliases`` are other names of the same model (dated snapshots such as
    "gpt-4.1-mini-2025-04-14") that cost this price; ``dated_aliases`` makes
    every dated name of the model ("<model>-YYYYMMDD", "<model>-YYYY-MM-DD")
    one. Without either, a dated name is unpriced unless it has its own price
    (see :class:`~meterline.catalog.Catalog`).
    """

    model: str
    provider: str
    effective_from: datetime
    rates: Rates
    tiers: tuple[LongContextTier, ...] = ()
    source: str = "manual"
    price_id: str = field(default="")
    aliases: tuple[str, ...] = ()
    dated_aliases: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.dated_aliases, bool):
            raise ValueError(f"dated_aliases: {self.dated_aliases!r} is not true or false")
        object.__setattr__(self, "aliases", _aliases(self.model, self.aliases))
        tiers = tuple(sorted(self.tiers, key=lambda t: t.above_input_tokens))
        for before, after in itertools.pairwise(tiers):
            if before.above_input_tokens == after.above_input_tokens:
                raise ValueError(f"two tiers above {after.above_input_tokens} input tokens")
        object.__setattr__(self, "tiers", tiers)
        if not self.price_id:
            object.__setattr__(self, "price_id", self._content_id())
        self.compile()  # refuse inexact rates now, not when the first event arrives

    def _content_id(self) -> str:
        """Same content, same id: adding a version twice is harmless."""
        body = json.dumps(self.spec_json(), sort_keys=True)
        key = f"{self.model}|{self.provider}|{self.effective_from.isoformat()}|{body}"
        return "pv_" + hashlib.sha256(key.encode()).hexdigest()[:16]

    def spec_json(self) -> dict[str, object]:
        """The stored form (``price_versions.spec_json``); alias keys only where declared."""
        spec: dict[str, object] = {
            "rates": self.rates.to_json(),
            "tiers": [
                {"above_input_tokens": t.above_input_tokens, "rates": t.rates.to_json()}
                for t in self.tiers
            ],
        }
        if self.aliases:  # left out otherwise, so versions without keep their ids
            spec["aliases"] = list(self.aliases)
        if self.dated_aliases:
            spec["dated_aliases"] = True
        return spec

    def compile(self) -> CompiledPrice:
        return CompiledPrice(
            price_id=self.price_id,
            base=_compile_rates(self.rates, tier="base"),
            tiers=tuple(
                (t.above_input_tokens, _compile_rates(t.rates, tier=f">{t.above_input_tokens}"))
                for t in self.tiers
            ),
        )

    def with_id(self, price_id: str) -> PriceVersion:
        return replace(self, price_id=price_id)


@dataclass(frozen=True, slots=True)
class CompiledRates:
    """Rates as integer pico-dollars per token (and per request): the hot path."""

    tier: str
    input: int
    cache_read: int
    cache_write_5m: int
    cache_write_1h: int
    output: int
    reasoning: int
    request: int


def _compile_rates(rates: Rates, *, tier: str) -> CompiledRates:
    """Integer rates, each rate not given resolved to its fallback (:data:`FALLBACKS`) here."""

    def per_token(name: str, value: Decimal | None, fallback: int) -> int:
        if value is None:
            return fallback
        return rate_to_picos_per_token(value, what=f"{name} rate ({tier})")

    input_ = rate_to_picos_per_token(rates.input, what=f"input rate ({tier})")
    output = rate_to_picos_per_token(rates.output, what=f"output rate ({tier})")
    write_5m = per_token("cache_write_5m", rates.cache_write_5m, input_)
    return CompiledRates(
        tier=tier,
        input=input_,
        cache_read=per_token("cache_read", rates.cache_read, input_),
        cache_write_5m=write_5m,
        cache_write_1h=per_token("cache_write_1h", rates.cache_write_1h, write_5m),
        output=output,
        reasoning=per_token("reasoning", rates.reasoning, output),
        request=usd_to_picos(rates.request, what=f"request fee ({tier})"),
    )


class Cost(NamedTuple):
    """What one request cost, in pico-dollars, and which price and tier made it.

    A named tuple: one is made for every event priced.
    """

    picos: int
    price_id: str
    tier: str


@dataclass(frozen=True, slots=True)
class CompiledPrice:
    price_id: str
    base: CompiledRates
    tiers: tuple[tuple[int, CompiledRates], ...]

    def rates_for(self, input_tokens: int) -> CompiledRates:
        chosen = self.base
        for threshold, rates in self.tiers:
            if input_tokens > threshold:
                chosen = rates
        return chosen

    def cost(self, usage: TokenUsage) -> Cost:
        r = self.rates_for(usage.input_tokens)
        picos = (
            usage.uncached_input_tokens * r.input
            + usage.cached_input_tokens * r.cache_read
            + usage.cache_write_5m_tokens * r.cache_write_5m
            + usage.cache_write_1h_tokens * r.cache_write_1h
            + (usage.output_tokens - usage.reasoning_tokens) * r.output
            + usage.reasoning_tokens * r.reasoning
            + r.request
        )
        return Cost(picos, self.price_id, r.tier)
