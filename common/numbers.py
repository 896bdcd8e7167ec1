from __future__ import annotations

from decimal import Decimal, InvalidOperation

NANO = Decimal("0.000000001")
AMOUNT_BOUND = 10**15  # amounts are stored in 24 digits, 9 of them decimals


def plain_decimal(value: Decimal) -> str:
    """`100`, `99.999965`, `-0.5`: no exponent, no trailing zeros."""
    text = format(value.normalize(), "f")
    return "0" if text in {"-0", "0"} else text


def parse_amount(raw: object, *, what: str = "amount") -> Decimal:
    """Parse a positive credit amount, exact to the nano-credit, or raise ValueError naming it."""
    try:
        amount = Decimal(str(raw).strip())
    except InvalidOperation:
        raise ValueError(f"The {what} '{raw}' is not a number.") from None
    if not amount.is_finite() or amount <= 0:
        raise ValueError(f"The {what} must be a positive number, not '{raw}'.")
    if amount >= AMOUNT_BOUND:
        raise ValueError(f"The {what} '{raw}' is too large: it must be below 1,000,000,000,000,000.")
    if amount != amount.quantize(NANO):
        raise ValueError(f"The {what} '{raw}' has more than 9 decimal places.")
    return amount
