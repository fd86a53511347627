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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from decimal import Decimal

from meterline.money import rate_to_picos_per_token, to_decimal, usd_to_picos
from meterline.tokens import TokenUsage


@dataclass(frozen=True, slots=True)
class Rates:
    """US dollars per million tokens, plus a per-request fee in dollars.

    ``reasoning`` is ``None`` when reasoning tokens cost the output rate.
    """

    input: Decimal
    output: Decimal
    cache_read: Decimal = Decimal(0)
    cache_write_5m: Decimal = Decimal(0)
    cache_write_1h: Decimal = Decimal(0)
    reasoning: Decimal | None = None
    request: Decimal = Decimal(0)

    def to_json(self) -> dict[str, str | None]:
        return {
            f.name: (None if getattr(self, f.name) is None else str(getattr(self, f.name)))
            for f in fields(self)
        }

    @classmethod
    def from_json(cls, data: dict[str, str | None]) -> Rates:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown rate(s): {', '.join(sorted(unknown))}")
        values = {
            name: to_decimal(value, what=name)  # type: ignore[arg-type]
            for name, value in data.items()
            if value is not None
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


@dataclass(frozen=True, slots=True)
class PriceVersion:
    """The price of one (model, provider) from ``effective_from`` until the next version."""

    model: str
    provider: str
    effective_from: datetime
    rates: Rates
    tiers: tuple[LongContextTier, ...] = ()
    source: str = "manual"
    price_id: str = field(default="")

    def __post_init__(self) -> None:
        if not self.price_id:
            object.__setattr__(self, "price_id", self._content_id())
        object.__setattr__(
            self, "tiers", tuple(sorted(self.tiers, key=lambda t: t.above_input_tokens))
        )
        self.compile()  # refuse inexact rates now, not when the first event arrives

    def _content_id(self) -> str:
        """Same content, same id: adding a version twice is harmless."""
        body = json.dumps(self.spec_json(), sort_keys=True)
        key = f"{self.model}|{self.provider}|{self.effective_from.isoformat()}|{body}"
        return "pv_" + hashlib.sha256(key.encode()).hexdigest()[:16]

    def spec_json(self) -> dict[str, object]:
        return {
            "rates": self.rates.to_json(),
            "tiers": [
                {"above_input_tokens": t.above_input_tokens, "rates": t.rates.to_json()}
                for t in self.tiers
            ],
        }

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
    def per_token(name: str, value: Decimal) -> int:
        return rate_to_picos_per_token(value, what=f"{name} rate ({tier})")

    output = per_token("output", rates.output)
    return CompiledRates(
        tier=tier,
        input=per_token("input", rates.input),
        cache_read=per_token("cache_read", rates.cache_read),
        cache_write_5m=per_token("cache_write_5m", rates.cache_write_5m),
        cache_write_1h=per_token("cache_write_1h", rates.cache_write_1h),
        output=output,
        reasoning=output if rates.reasoning is None else per_token("reasoning", rates.reasoning),
        request=usd_to_picos(rates.request, what=f"request fee ({tier})"),
    )


@dataclass(frozen=True, slots=True)
class Cost:
    """What one request cost, in pico-dollars, and which price and tier made it."""

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
        return Cost(picos=picos, price_id=self.price_id, tier=r.tier)
