"""Price arithmetic shared by the paper broker and the live adapter."""
from __future__ import annotations

from dataclasses import replace
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Optional

from .models import OrderRequest, OrderType, Side

DEFAULT_TICK = Decimal("0.05")


def round_to_tick(price: Decimal, tick: Decimal, up: bool) -> Decimal:
    """Round a price to a multiple of the tick size, up or down."""
    steps = (price / tick).to_integral_value(rounding=ROUND_CEILING if up else ROUND_FLOOR)
    return (steps * tick).quantize(tick)


def protected_limit(side: Side, ltp: Decimal, pct: Decimal, tick: Decimal = DEFAULT_TICK,
                    lower: Optional[Decimal] = None, upper: Optional[Decimal] = None) -> Decimal:
    """The limit price that stands in for a market order: LTP moved by pct against us, on the tick, and
    kept inside the day's circuit limits (`lower`/`upper`, Noren's `lc`/`uc`) when they are known."""
    if side is Side.BUY:
        price = round_to_tick(ltp * (1 + pct / 100), tick, up=True)
    else:
        price = max(round_to_tick(ltp * (1 - pct / 100), tick, up=False), tick)
    return within_limits(price, tick, lower, upper)


def within_limits(price: Decimal, tick: Decimal = DEFAULT_TICK, lower: Optional[Decimal] = None,
                  upper: Optional[Decimal] = None) -> Decimal:
    """The price kept inside the day's circuit limits (on the tick) when they are known; limits that contradict
    each other say nothing."""
    low = round_to_tick(lower, tick, up=True) if lower is not None and lower > 0 else None
    high = round_to_tick(upper, tick, up=False) if upper is not None and upper > 0 else None
    if low is not None and high is not None and low > high:
        return price  # limits that contradict each other say nothing
    if high is not None:
        price = min(price, high)
    if low is not None:
        price = max(price, low)
    return price


def protected_stop(req: OrderRequest, pct: Decimal, tick: Decimal = DEFAULT_TICK, lower: Optional[Decimal] = None,
                   upper: Optional[Decimal] = None) -> OrderRequest:
    """A stop-loss market order (SL-MKT) as the stop-loss limit that stands in for it: its limit one `pct` through
    the trigger (protected_limit); any other order as it is. Once triggered and not filled, an exit is moved
    towards the market as a market order would have filled (risk_actions.RiskLoop.escalate)."""
    if req.order_type is not OrderType.SL_MKT or req.trigger_price is None:
        return req
    return replace(req, order_type=OrderType.SL_LMT,
                   price=protected_limit(req.side, req.trigger_price, pct, tick, lower, upper))


def tidy(value: Decimal, places: str = "0.0001") -> Decimal:
    """Round to `places` and drop trailing zeros, never in exponent form (40, not 4E+1)."""
    q = value.quantize(Decimal(places))
    return q.quantize(Decimal(1)) if q == q.to_integral_value() else q.normalize()
