"""Exact money arithmetic. No float ever touches an amount.

Amounts travel as strings with 8 decimals (``"106.75000000"``). Rounding is
explicit at every step and chosen so the merchant is never short because of
rounding: customer amounts round up, fees round half-up, partial credits
round down.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Context, Decimal, InvalidOperation

# Wire precision of every amount: 8 decimals (satoshi).
QUANTUM = Decimal("0.00000001")
# Largest invoice amount the API accepts (spec §6).
MAX_AMOUNT = Decimal(10) ** 12
# Enough significant digits for 10^12 with 8 decimals and exact rate products.
CTX = Context(prec=50)


class AmountError(ValueError):
    """An amount that is not a finite decimal with at most 8 decimals."""


def parse_amount(value: object) -> Decimal:
    """Parse a wire amount (string, int, or an exact Decimal) without float loss.

    JSON numbers must reach this function as ``Decimal`` (parse the body with
    ``parse_float=Decimal``); a Python ``float`` is refused outright.
    """
    if isinstance(value, bool | float):
        raise AmountError("must be a decimal string or number")
    try:
        amount = Decimal(value) if isinstance(value, int | str | Decimal) else None
    except InvalidOperation:
        amount = None
    if amount is None or not amount.is_finite():
        raise AmountError("must be a decimal number")
    try:
        quantized = amount.quantize(QUANTUM, context=CTX)
    except InvalidOperation:  # more digits than the money context holds: absurdly large
        raise AmountError("is out of range") from None
    if quantized != amount:
        raise AmountError("must have at most 8 decimals")
    return quantized


def fmt8(amount: Decimal) -> str:
    """The wire form: a plain string with exactly 8 decimals."""
    return f"{amount.quantize(QUANTUM, context=CTX):f}"


def ceil8(amount: Decimal) -> Decimal:
    """Round up at 8 decimals (customer-side amounts computed from a rate)."""
    return amount.quantize(QUANTUM, rounding=ROUND_CEILING, context=CTX)


def floor8(amount: Decimal) -> Decimal:
    """Round down at 8 decimals (a partial credit never exceeds what was paid)."""
    return amount.quantize(QUANTUM, rounding=ROUND_FLOOR, context=CTX)


def half_up8(amount: Decimal) -> Decimal:
    """Round half-up at 8 decimals (fees, spec §4)."""
    return amount.quantize(QUANTUM, rounding=ROUND_HALF_UP, context=CTX)


def mul(a: Decimal, b: Decimal) -> Decimal:
    """Exact-enough product in the money context (50 significant digits)."""
    return CTX.multiply(a, b)


def div(a: Decimal, b: Decimal) -> Decimal:
    """Quotient in the money context (50 significant digits); round it explicitly after."""
    return CTX.divide(a, b)


ZERO = Decimal(0)
