"""Money and kWh as :class:`~decimal.Decimal`: parsing operator input and the one rounding rule.

Rounding (documented in docs/operators.md): every cost line is ``kWh x rate`` (or ``days x charge``)
computed exactly and rounded **once** to the currency's minor unit, ROUND_HALF_UP; the tax line is the
tax rate times the sum of the already-rounded net lines, rounded once the same way; the total is the
plain sum of the rounded lines (no further rounding). kWh are exact multiples of 0.0001 (the meters'
resolution); an interpolated reading is rounded to 0.0001 kWh (ROUND_HALF_EVEN) before any difference
is taken, so the kWh of the bands always add up to closing minus opening.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal, InvalidOperation

__all__ = ["KWH", "MoneyError", "minor_unit", "parse_decimal", "round_kwh", "round_money"]

KWH = Decimal("0.0001")
#: Currencies whose minor unit is not 1/100 (ISO 4217); every other has two decimals.
_MINOR_DIGITS = {"JPY": 0, "KRW": 0, "ISK": 0, "CLP": 0, "VND": 0, "BHD": 3, "KWD": 3, "OMR": 3, "JOD": 3}
MAX_DIGITS = 24


class MoneyError(ValueError):
    """A bad amount in operator input."""


def parse_decimal(
    value: object, name: str, *, minimum: Decimal | None = None, positive: bool = False
) -> Decimal:
    """A decimal from a string or an int (floats are refused: they are not exact)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise MoneyError(f'{name}: expected a decimal number as a string (e.g. "0.25"), got {value!r}')
    try:
        d = Decimal(value.strip() if isinstance(value, str) else value)
    except (InvalidOperation, ValueError):
        raise MoneyError(f"{name}: {value!r} is not a decimal number") from None
    if not d.is_finite():
        raise MoneyError(f"{name}: must be a finite number")
    if len(d.as_tuple().digits) > MAX_DIGITS:
        raise MoneyError(f"{name}: too many digits")
    if positive and d <= 0:
        raise MoneyError(f"{name}: must be greater than 0, got {d}")
    if minimum is not None and d < minimum:
        raise MoneyError(f"{name}: must be at least {minimum}, got {d}")
    return d


def minor_unit(currency: str) -> Decimal:
    """The currency's smallest unit: Decimal("0.01") for EUR, Decimal("1") for JPY."""
    return Decimal(1).scaleb(-_MINOR_DIGITS.get(currency.upper(), 2))


def round_money(amount: Decimal, currency: str) -> Decimal:
    return amount.quantize(minor_unit(currency), rounding=ROUND_HALF_UP)


def round_kwh(amount: Decimal) -> Decimal:
    return amount.quantize(KWH, rounding=ROUND_HALF_EVEN)
