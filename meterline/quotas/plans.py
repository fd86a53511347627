"""Plans: the limits an account's requests must fit, and the price it pays.

A plan is versioned: a change is a new version, and an account is assigned
a (plan, version) from an instant on, so what applied when is never lost.
Every limit is optional. A request must fit every limit set for its
account, for its API key (``per_api_key``: each of the account's keys on
its own) and for its model (``per_model``: each pattern on its own); a more
specific scope can so only narrow what the account may do.

What the account pays is the catalog's provider cost times
``price_multiplier``, plus ``request_fee_usd`` a request: ``charge_usd``,
which spend caps (and later credits and statements) count.
"""

from __future__ import annotations

import fnmatch
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from meterline.catalog.catalog import model_key
from meterline.money import (
    MAX_REQUEST_FEE_USD,
    MAX_TOKEN_COUNT,
    PICOS_PER_USD,
    WAREHOUSE_INTEGER_DIGITS,
    to_decimal,
    usd_to_picos,
)

__all__ = [
    "MAX_MULTIPLIER",
    "MAX_SPEND_CAP_USD",
    "Limits",
    "PlanId",
    "PlanLimits",
    "PlanTerms",
    "PlanVersion",
    "TokenBasis",
    "model_matches",
]

#: A sell price is at most 1,000 times the provider's cost.
MAX_MULTIPLIER = Decimal(1_000)
#: The largest spend cap, per day or month: far above any account. Its counters
#: are kept as whole dollars plus pico-dollars below one (meterline.quotas.engine),
#: exact in Lua's doubles up to this bound and beyond.
MAX_SPEND_CAP_USD = Decimal(1_000_000_000)
#: The largest token cap per day or month (a month at the per-request bound
#: every second is far less); counters stay inside 64-bit integers.
MAX_TOKEN_CAP = 10**15

Count = Annotated[int, Field(ge=1, le=10**12)]
TokenCount = Annotated[int, Field(ge=1, le=MAX_TOKEN_CAP)]
#: What a plan is named by, in the API, the CLI and the store.
PlanId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]


def _usd(value: object, *, what: str, bound: Decimal) -> Decimal:
    """An exact USD amount from a decimal string (never a float), within ``bound``."""
    if isinstance(value, float):
        raise ValueError(f'{what} is a decimal string such as "25.00", not a float')
    if not isinstance(value, str | int | Decimal):
        raise ValueError(f'{what} is a decimal string such as "25.00"')
    amount = to_decimal(value, what=what)
    if amount < 0 or amount > bound:
        raise ValueError(f"{what} is between 0 and {bound}")
    usd_to_picos(amount, what=what)  # exact to the pico-dollar, or refused
    return amount


class TokenBasis(StrEnum):
    """Which tokens the token limits count."""

    INPUT = "input"
    OUTPUT = "output"
    TOTAL = "total"

    def counted(self, input_tokens: int, output_tokens: int) -> int:
        """The tokens a limit on this basis counts (check.lua's ``tokens`` says the same)."""
        if self is TokenBasis.INPUT:
            return input_tokens
        if self is TokenBasis.OUTPUT:
            return output_tokens
        return input_tokens + output_tokens


class Limits(BaseModel):
    """Limits of one scope (the account, each API key, a model); None: no limit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_minute: Count | None = None
    requests_per_day: Count | None = None
    tokens_per_minute: TokenCount | None = None
    tokens_per_day: TokenCount | None = None
    tokens_per_month: TokenCount | None = None
    spend_per_day_usd: Decimal | None = None
    spend_per_month_usd: Decimal | None = None
    max_in_flight: Count | None = Field(None, description="Requests in flight at once.")

    @field_validator("spend_per_day_usd", "spend_per_month_usd", mode="before")
    @classmethod
    def _spend(cls, value: object, info: object) -> Decimal | None:
        if value is None:
            return None
        name = getattr(info, "field_name", "spend")
        return _usd(value, what=name, bound=MAX_SPEND_CAP_USD)

    def is_empty(self) -> bool:
        return all(getattr(self, name) is None for name in type(self).model_fields)


class PlanLimits(Limits):
    """The account's limits, and those of its keys and models."""

    token_basis: TokenBasis = TokenBasis.TOTAL
    #: names or patterns (``gpt-4o*``), matched as the catalog matches names; None: all
    models_allowed: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = None
    models_refused: list[Annotated[str, Field(min_length=1, max_length=256)]] = []
    per_api_key: Limits | None = None
    per_model: dict[Annotated[str, Field(min_length=1, max_length=256)], Limits] = {}

    def model_allowed(self, model: str) -> bool:
        if any(model_matches(p, model) for p in self.models_refused):
            return False
        return self.models_allowed is None or any(
            model_matches(p, model) for p in self.models_allowed
        )

    def model_limits(self, model: str) -> list[tuple[str, Limits]]:
        """The per-model scopes a request for ``model`` falls in: (pattern, limits)."""
        return [(p, lim) for p, lim in self.per_model.items() if model_matches(p, model)]


def model_matches(pattern: str, model: str) -> bool:
    """A model name against a name or a ``*``/``?`` pattern, both as the catalog keys them
    ("openai/GPT-4.1-mini" matches "gpt-4.1*")."""
    return fnmatch.fnmatchcase(model_key(model), model_key(pattern))


class PlanTerms(BaseModel):
    """What a plan version says, its limits and its sell price, before the store numbers
    it: what an admin writes (the API's body, the CLI's ``--json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    plan_id: PlanId
    name: Annotated[str, Field(max_length=256)] = ""
    limits: PlanLimits = PlanLimits()
    price_multiplier: Decimal = Decimal(1)
    request_fee_usd: Decimal = Decimal(0)
    #: prepaid: the balance gates requests (credits); postpaid: statements bill later
    billing: Literal["postpaid", "prepaid"] = "postpaid"

    @field_validator("price_multiplier", mode="before")
    @classmethod
    def _multiplier(cls, value: object) -> Decimal:
        amount = _usd(value, what="price_multiplier", bound=MAX_MULTIPLIER)
        if amount.as_tuple().exponent < -6:  # type: ignore[operator]
            raise ValueError("price_multiplier has at most 6 decimal places")
        return amount

    @field_validator("request_fee_usd", mode="before")
    @classmethod
    def _fee(cls, value: object) -> Decimal:
        return _usd(value, what="request_fee_usd", bound=MAX_REQUEST_FEE_USD)


class PlanVersion(PlanTerms):
    """One version of a plan: its terms, numbered by the store (1, 2, ...) when added."""

    version: Annotated[int, Field(ge=1)] = 1
    created_at: datetime | None = None

    def charge_picos(self, cost_picos: int) -> int:
        """What the account pays for a request whose provider cost is ``cost_picos``:
        the multiplier's product rounded half up to the pico-dollar, plus the fee."""
        scaled = self.price_multiplier.scaleb(6)
        numerator = cost_picos * int(scaled)
        return (numerator + 500_000) // 1_000_000 + usd_to_picos(self.request_fee_usd)


#: The most a request can be charged: the largest event cost, times the largest multiplier.
def _largest_charge() -> int:
    from meterline.money import MAX_EVENT_PICOS

    return MAX_EVENT_PICOS * int(MAX_MULTIPLIER) + usd_to_picos(MAX_REQUEST_FEE_USD)


MAX_CHARGE_PICOS = _largest_charge()
#: Events whose charges a sum must hold: as many as the cost bound allows for (money.py).
_SUMMED_EVENTS = 10**12
# 10**12 charges at the bound are about 2 × 10**21 dollars: 22 integer digits of the 26 a
# Decimal(38, 12) holds, so no row, rollup minute or total of charge_usd can overflow.
assert len(str(MAX_CHARGE_PICOS * _SUMMED_EVENTS // PICOS_PER_USD)) <= WAREHOUSE_INTEGER_DIGITS
assert MAX_TOKEN_COUNT * 2 < MAX_TOKEN_CAP  # a single request fits every token cap's range
