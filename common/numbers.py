from __future__ import annotations

from decimal import Decimal


def plain_decimal(value: Decimal) -> str:
    """`100`, `99.999965`, `-0.5`: no exponent, no trailing zeros."""
    text = format(value.normalize(), "f")
    return "0" if text in {"-0", "0"} else text
