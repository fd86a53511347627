"""Exact money: integers of pico-dollars (10**-12 USD), never binary floats.

Catalog rates are US dollars per million tokens with at most six decimal
places ($0.0375 / 1M exists), so the price of one token is a whole number of
pico-dollars and every cost is an exact integer. ClickHouse keeps the same
value as ``Decimal(38, 12)`` dollars; JSON carries it as a decimal string.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

PICOS_PER_USD = 10**12
#: A rate per million tokens times this is pico-dollars per token.
PICOS_PER_TOKEN_PER_USD_PER_MTOK = 10**6
RATE_DECIMAL_PLACES = 6
FEE_DECIMAL_PLACES = 12


class MoneyError(ValueError):
    """A monetary amount that cannot be represented exactly."""


def to_decimal(value: str | int | Decimal, *, what: str = "amount") -> Decimal:
    """Parse a user-given amount; floats are refused because they are not exact."""
    if isinstance(value, float):
        raise MoneyError(f"{what}: give money as a decimal string, not a float ({value!r})")
    try:
        amount = Decimal(value)
    except (InvalidOperation, TypeError) as exc:
        raise MoneyError(f"{what}: {value!r} is not a decimal number") from exc
    if not amount.is_finite():
        raise MoneyError(f"{what}: {value!r} is not a finite number")
    if amount < 0:
        raise MoneyError(f"{what}: {value} is negative")
    return amount


def rate_to_picos_per_token(rate_usd_per_mtok: Decimal, *, what: str = "rate") -> int:
    """Dollars per million tokens -> pico-dollars per token, exactly."""
    picos = rate_usd_per_mtok * PICOS_PER_TOKEN_PER_USD_PER_MTOK
    if picos != picos.to_integral_value():
        raise MoneyError(
            f"{what}: {rate_usd_per_mtok} per million tokens has more than "
            f"{RATE_DECIMAL_PLACES} decimal places"
        )
    return int(picos)


def usd_to_picos(amount_usd: Decimal, *, what: str = "amount") -> int:
    """Dollars -> pico-dollars, exactly."""
    picos = amount_usd * PICOS_PER_USD
    if picos != picos.to_integral_value():
        raise MoneyError(f"{what}: {amount_usd} has more than {FEE_DECIMAL_PLACES} decimal places")
    return int(picos)


def picos_to_usd(picos: int) -> Decimal:
    """Pico-dollars -> Decimal dollars with twelve decimal places."""
    return Decimal(picos).scaleb(-12)


def format_usd(amount: Decimal | int) -> str:
    """A dollar amount as a plain decimal string, no exponent, no trailing zeros.

    An ``int`` is taken as pico-dollars.
    """
    if isinstance(amount, int):
        amount = picos_to_usd(amount)
    text = format(amount.normalize(), "f")
    return text if text != "-0" else "0"


def picos_to_sql_decimal(picos: int) -> str:
    """Pico-dollars as the literal text of a ClickHouse ``Decimal(38, 12)``."""
    sign = "-" if picos < 0 else ""
    whole, frac = divmod(abs(picos), PICOS_PER_USD)
    return f"{sign}{whole}.{frac:012d}"
