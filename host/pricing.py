"""Price arithmetic shared by the paper broker and the live adapter."""
from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from .models import Side

DEFAULT_TICK = Decimal("0.05")


def round_to_tick(price: Decimal, tick: Decimal, up: bool) -> Decimal:
    """Round a price to a multiple of the tick size, up or down."""
    steps = (price / tick).to_integral_value(rounding=ROUND_CEILING if up else ROUND_FLOOR)
    return (steps * tick).quantize(tick)


def protected_limit(side: Side, ltp: Decimal, pct: Decimal, tick: Decimal = DEFAULT_TICK) -> Decimal:
    """The limit price that stands in for a market order: LTP moved by pct against us, on the tick."""
    if side is Side.BUY:
        return round_to_tick(ltp * (1 + pct / 100), tick, up=True)
    return max(round_to_tick(ltp * (1 - pct / 100), tick, up=False), tick)


def tidy(value: Decimal, places: str = "0.0001") -> Decimal:
    """Round to `places` and drop trailing zeros, never in exponent form (40, not 4E+1)."""
    q = value.quantize(Decimal(places))
    return q.quantize(Decimal(1)) if q == q.to_integral_value() else q.normalize()
