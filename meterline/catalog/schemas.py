"""The catalog's HTTP edge: the price a client posts and the versions it reads.

A body is checked here for shape, types and limits, each problem with the
field it is in (``rates.input``, ``tiers[0].above_input_tokens``); what a
price may be (exact rates, sensible tiers) stays the domain's rule,
:func:`~meterline.catalog.parse_price`. Money is a decimal string both ways.

:data:`Instant` and :func:`parse_instant` bound every time the API takes to
what the warehouse stores (``DateTime64(3, 'UTC')``); the usage slice's
edge uses them too.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Self

from litestar.exceptions import ValidationException
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)
from pydantic_core import PydanticCustomError

from meterline.catalog.pricing import PriceVersion
from meterline.money import MAX_TOKEN_COUNT

__all__ = [
    "EARLIEST",
    "LATEST",
    "MAX_NAME_LENGTH",
    "AddedPriceVersion",
    "Instant",
    "PriceIn",
    "PriceVersionOut",
    "RatesIn",
    "RatesOut",
    "TierIn",
    "TierOut",
    "TierRatesIn",
    "instant_parameter",
    "parse_instant",
]

#: Times the API accepts: the warehouse's DateTime64 reaches 2299; before 1970
#: nothing was metered, and a small number there is a unit mix-up, not a date.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2299, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
#: Longest model, provider or source name (the events' limit too).
MAX_NAME_LENGTH = 256
#: Long-context tiers one price may have; real catalogs have one or two.
MAX_TIERS = 16
#: Other names one price may declare for its model.
MAX_ALIASES = 64
#: Rates are decimal text such as "0.40": no sign, no exponent (the domain
#: then checks they are exact to the pico-dollar).
_DECIMAL = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,24})?$")


def parse_instant(value: object) -> datetime:
    """An ISO 8601 instant within :data:`EARLIEST`..:data:`LATEST`, in UTC; naive means UTC.

    Raises:
        ValueError: with a message that says what was wrong, not where (the caller knows).
    """
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO 8601 time string, not {_kind(value)}")
    try:
        moment = datetime.fromisoformat(value) if len(value) <= 64 else None
    except ValueError:
        moment = None
    if moment is None:
        raise ValueError(f"{value[:64]!r} is not an ISO 8601 time such as 2026-12-01T00:00:00Z")
    # in UTC, as stored: the same instant written with another offset is the same version
    moment = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    if not EARLIEST <= moment <= LATEST:
        raise ValueError(
            f"{value!r} is out of range: times are from {EARLIEST:%Y-%m-%d} to {LATEST:%Y-%m-%d}"
        )
    return moment


def instant_parameter(name: str, text: str) -> datetime:
    """A time query parameter, parsed by :func:`parse_instant`; else a 400 that names it."""
    try:
        return parse_instant(text)
    except ValueError as exc:
        raise ValidationException(
            f"{name}: {exc}", extra=[{"key": name, "message": str(exc), "source": "query"}]
        ) from None


def _kind(value: object) -> str:
    """How a JSON value is named in a message: "a number", "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _instant(value: object) -> datetime:
    try:
        return parse_instant(value)
    except ValueError as exc:
        raise PydanticCustomError("instant", str(exc)) from None


def _decimal_text(value: object) -> str | None:
    if value is None:
        return None  # a rate left out; whether it may be is the model's business
    if isinstance(value, float):
        raise PydanticCustomError(
            "money_float", 'Input should be a decimal string such as "0.40", not a float'
        )
    if not isinstance(value, str) or not _DECIMAL.fullmatch(value):
        raise PydanticCustomError(
            "money", 'Input should be a non-negative decimal string such as "0.40"'
        )
    return value


def _whole_number(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError("whole_number", "Input should be a whole number")
    return value


def _true_or_false(value: object) -> bool:
    if not isinstance(value, bool):
        raise PydanticCustomError("true_or_false", "Input should be true or false")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank", "Input should not be blank")
    return value


#: An instant in ISO 8601 text (a number is refused, not read as seconds since 1970).
Instant = Annotated[
    datetime,
    BeforeValidator(_instant),
    Field(description="ISO 8601, e.g. 2026-12-01T00:00:00Z; without a zone it is UTC."),
]
#: A model, provider or source name.
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH), AfterValidator(_not_blank)]
#: A rate in US dollars per million tokens (a fee: per request), as decimal text.
_MONEY = Field(
    pattern=_DECIMAL.pattern,
    description="US dollars (per million tokens; the request fee per request), decimal text.",
    examples=["0.40"],
)
Money = Annotated[str, BeforeValidator(_decimal_text), _MONEY]
#: A rate that may be left out (or null).
OptionalMoney = Annotated[str | None, BeforeValidator(_decimal_text), _MONEY]


class _Body(BaseModel):
    """A request body: unknown fields are refused (a typo must not price silently).

    Types are checked by the validators above, not by pydantic's strict mode:
    Litestar validates bodies with ``strict=False``, which overrides a model's.
    """

    model_config = ConfigDict(extra="forbid")


class TierRatesIn(_Body):
    """Rates of a long-context tier; a rate left out is the base price's rate."""

    input: OptionalMoney = None
    output: OptionalMoney = None
    cache_read: OptionalMoney = None
    cache_write_5m: OptionalMoney = None
    cache_write_1h: OptionalMoney = None
    reasoning: OptionalMoney = None
    request: OptionalMoney = None


class RatesIn(TierRatesIn):
    """US dollars per million tokens; ``request`` is dollars per request.

    A cache rate left out costs the input rate (a 1-hour write the 5-minute
    write rate first); ``reasoning`` left out costs the output rate.
    """

    input: Money
    output: Money


class TierIn(_Body):
    """Rates that replace the base rates once a request's input exceeds the threshold."""

    above_input_tokens: Annotated[
        int, BeforeValidator(_whole_number), Field(ge=0, le=MAX_TOKEN_COUNT)
    ]
    rates: TierRatesIn = Field(default_factory=TierRatesIn)


class PriceIn(_Body):
    """A new price version: POST /v1/catalog/prices."""

    model: Name
    provider: Name
    effective_from: Instant
    rates: RatesIn
    tiers: Annotated[list[TierIn], Field(max_length=MAX_TIERS)] = []
    aliases: Annotated[
        list[Name],
        Field(
            max_length=MAX_ALIASES,
            description="Other names of the model that cost this price, "
            'e.g. "gpt-4.1-mini-2025-04-14".',
        ),
    ] = []
    dated_aliases: Annotated[bool, BeforeValidator(_true_or_false)] = Field(
        False, description='Every dated name of the model ("<model>-YYYYMMDD") costs this price.'
    )
    source: Name | None = None

    def as_mapping(self) -> dict[str, Any]:
        """The JSON form :func:`~meterline.catalog.parse_price` reads."""
        return self.model_dump(exclude_none=True)


class RatesOut(BaseModel):
    """Rates as given, decimal strings; null where a rate costs its fallback rate."""

    input: str
    output: str
    cache_read: str | None
    cache_write_5m: str | None
    cache_write_1h: str | None
    reasoning: str | None
    request: str


class TierOut(BaseModel):
    above_input_tokens: int
    rates: RatesOut


class PriceVersionOut(BaseModel):
    """One price version, as the catalog keeps it."""

    price_id: str
    model: str
    provider: str
    effective_from: Annotated[str, Field(json_schema_extra={"format": "date-time"})]
    source: str
    rates: RatesOut
    tiers: list[TierOut]
    aliases: list[str] | None = Field(None, description="Only when the version declares some.")
    dated_aliases: bool | None = Field(None, description="Only when true.")

    @model_serializer(mode="wrap")
    def _declared_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if k not in _DECLARED_ONLY or v is not None}

    @classmethod
    def of(cls, version: PriceVersion, **extra: Any) -> Self:
        spec = version.spec_json()
        return cls.model_validate(
            {
                "price_id": version.price_id,
                "model": version.model,
                "provider": version.provider,
                "effective_from": version.effective_from.isoformat(),
                "source": version.source,
                **spec,
                **extra,
            }
        )


_DECLARED_ONLY = ("aliases", "dated_aliases")


class AddedPriceVersion(PriceVersionOut):
    """The version posted; ``created`` is false when the same version was already there."""

    created: bool
