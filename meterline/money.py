"""Exact money: integers of pico-dollars (10**-12 USD), never binary floats.

Catalog rates are US dollars per million tokens with at most six decimal
places ($0.0375 / 1M exists), so the price of one token is a whole number of
pico-dollars and every cost is an exact integer. ClickHouse keeps the same
value as ``Decimal(38, 12)`` dollars; JSON carries it as a decimal string.

Nothing here goes through a ``decimal`` context: a context rounds to its
precision (28 digits by default), which would silently cut a large total.
Amounts are scaled and formatted with integer arithmetic instead.

Bounds (the overflow budget). Every price is refused outside them, so that
no store can overflow:

* a rate is at most :data:`MAX_RATE_USD_PER_MTOK` ($10,000 per million
  tokens, 1 cent a token: about 16 times the dearest rate known, o1-pro's
  $600 output);
* a per-request fee is at most :data:`MAX_REQUEST_FEE_USD` ($1,000);
* a token count is at most :data:`MAX_TOKEN_COUNT` (100 million, the
  default of ``EventRules.max_tokens``), and so is a tier threshold.

An event counts at most ``MAX_TOKEN_COUNT`` input tokens (cache reads and
writes are subsets of them) and as many output tokens, so it costs at most
:data:`MAX_EVENT_PICOS`, about 2.001 × 10**18 pico-dollars ($2,001,000):
that fits a signed 64-bit integer (9.22 × 10**18), and 10**12 such events
sum to about 2 × 10**18 dollars, 19 integer digits of the 26 a
``Decimal(38, 12)`` holds (PostgreSQL ``NUMERIC`` holds more).

What the account pays, ``charge_usd``, is that cost times a plan's multiplier
(at most 1,000) plus its fee (at most $1,000):
``meterline.quotas.plans.MAX_CHARGE_PICOS``, about 2.001 × 10**21
pico-dollars ($2,001,001,000) an event. That needs Python's integers (not
64 bits), and 10**12 such charges sum to about 2 × 10**21 dollars, 22 integer
digits of the 26: each row, each rollup minute's sum and the reports' sums
(taken in ``Decimal256``) still fit.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

PICOS_PER_USD = 10**12
#: A rate per million tokens times this is pico-dollars per token.
PICOS_PER_TOKEN_PER_USD_PER_MTOK = 10**6
RATE_DECIMAL_PLACES = 6
FEE_DECIMAL_PLACES = 12

#: The dearest rate a price may have, in US dollars per million tokens.
MAX_RATE_USD_PER_MTOK = Decimal(10_000)
#: The largest per-request fee a price may have, in US dollars.
MAX_REQUEST_FEE_USD = Decimal(1_000)
#: The most tokens one count of one event may hold; tier thresholds are bounded by it too.
#: ``EventRules.max_tokens`` must not exceed it.
MAX_TOKEN_COUNT = 100_000_000
#: The most one event can cost, in pico-dollars, within the bounds above.
MAX_EVENT_PICOS = (
    2 * MAX_TOKEN_COUNT * int(MAX_RATE_USD_PER_MTOK) * PICOS_PER_TOKEN_PER_USD_PER_MTOK
    + int(MAX_REQUEST_FEE_USD) * PICOS_PER_USD
)
#: Integer digits of a ClickHouse ``Decimal(38, 12)``: the narrowest store of dollars.
WAREHOUSE_INTEGER_DIGITS = 26


class MoneyError(ValueError):
    """A monetary amount that cannot be represented exactly."""


class AmountOutOfBounds(MoneyError):
    """An amount above the bound that keeps every store from overflowing."""


def to_decimal(value: str | int | Decimal, *, what: str = "amount") -> Decimal:
    """Parse a user-given amount; floats are refused because they are not exact."""
    if isinstance(value, float):
        raise MoneyError(f"{what}: give money as a decimal string, not a float ({value!r})")
    if isinstance(value, bool):
        raise MoneyError(f"{what}: {value!r} is not a decimal number")
    try:
        amount = Decimal(value)
    except (InvalidOperation, TypeError, ValueError) as exc:
        raise MoneyError(f"{what}: {value!r} is not a decimal number") from exc
    if not amount.is_finite():
        raise MoneyError(f"{what}: {value!r} is not a finite number")
    if amount < 0:
        raise MoneyError(f"{what}: {value} is negative")
    return amount


def check_bound(amount: Decimal, bound: Decimal, *, what: str, unit: str) -> Decimal:
    """``amount`` if it is a finite number from 0 to ``bound``, else :class:`MoneyError`."""
    if not isinstance(amount, Decimal) or not amount.is_finite():
        raise MoneyError(f"{what}: {amount!r} is not a finite decimal number")
    if amount < 0:
        raise MoneyError(f"{what}: {amount} is negative")
    if amount > bound:
        raise AmountOutOfBounds(f"{what}: {amount} is above the bound of {bound} {unit}")
    return amount


def _scaled(amount: Decimal, places: int, *, what: str, inexact: str) -> int:
    """``amount × 10**places`` as an exact integer, or :class:`MoneyError`; no context."""
    if not amount.is_finite():
        raise MoneyError(f"{what}: {amount} is not a finite number")
    sign, digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)  # finite
    coefficient = int("".join(map(str, digits)))
    if coefficient == 0:
        return 0
    while coefficient % 10 == 0:  # 1.500 -> 15e-1: only the significant digits count
        coefficient //= 10
        exponent += 1
    shift = exponent + places
    if shift < 0:
        raise MoneyError(inexact)
    if len(str(coefficient)) + shift > 60:  # far beyond any bound: refuse before computing it
        raise AmountOutOfBounds(f"{what}: {amount} is far too large")
    value: int = coefficient * 10**shift
    return -value if sign else value


def rate_to_picos_per_token(rate_usd_per_mtok: Decimal, *, what: str = "rate") -> int:
    """Dollars per million tokens -> pico-dollars per token, exactly."""
    return _scaled(
        rate_usd_per_mtok,
        RATE_DECIMAL_PLACES,
        what=what,
        inexact=f"{what}: {rate_usd_per_mtok} per million tokens has more than "
        f"{RATE_DECIMAL_PLACES} decimal places",
    )


def usd_to_picos(amount_usd: Decimal, *, what: str = "amount") -> int:
    """Dollars -> pico-dollars, exactly."""
    return _scaled(
        amount_usd,
        FEE_DECIMAL_PLACES,
        what=what,
        inexact=f"{what}: {amount_usd} has more than {FEE_DECIMAL_PLACES} decimal places",
    )


def _split(picos: int) -> tuple[str, int, int]:
    """(sign, whole dollars, pico-dollars below a dollar) of an amount in pico-dollars."""
    whole, frac = divmod(abs(picos), PICOS_PER_USD)
    return ("-" if picos < 0 else ""), whole, frac


#: Below this, ``scaleb`` keeps every digit in the default 28-digit context.
_EXACT_SCALEB = 10**27


def picos_to_usd(picos: int) -> Decimal:
    """Pico-dollars -> Decimal dollars with twelve decimal places, exact at any size."""
    if -_EXACT_SCALEB < picos < _EXACT_SCALEB:  # every event's cost: a quick exact shift
        return Decimal(picos).scaleb(-12)
    sign, whole, frac = _split(picos)
    return Decimal(f"{sign}{whole}.{frac:012d}")  # the constructor is exact; arithmetic is not


def format_usd(amount: Decimal | int) -> str:
    """A dollar amount as a plain decimal string, no exponent, no trailing zeros.

    An ``int`` is taken as pico-dollars. Exact at any size: no rounding.
    """
    if isinstance(amount, bool) or not isinstance(amount, int | Decimal):
        raise TypeError(f"format_usd takes pico-dollars (int) or dollars (Decimal), not {amount!r}")
    if isinstance(amount, int):
        sign, whole, frac = _split(amount)
        text = f"{sign}{whole}"
        if frac:
            text += "." + f"{frac:012d}".rstrip("0")
    else:
        if not amount.is_finite():
            raise MoneyError(f"{amount} is not an amount of money")
        text = format(amount, "f")  # no precision given: the digits as they are, unrounded
        if "." in text:
            text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def picos_to_sql_decimal(picos: int) -> str:
    """Pico-dollars as the literal text of a ClickHouse ``Decimal(38, 12)``."""
    sign, whole, frac = _split(picos)
    return f"{sign}{whole}.{frac:012d}"
