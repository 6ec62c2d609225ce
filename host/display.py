"""How people are shown money, quantities and times (dashboard, notifiers): ₹ with Indian digit
grouping, a real minus sign, Asia/Kolkata."""
from __future__ import annotations

from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Optional

from .market import IST

MINUS = "\u2212"  # a real minus sign: it reads better and screen readers say "minus"


def _decimal(value: Any) -> Optional[Decimal]:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        d = value if isinstance(value, Decimal) else Decimal(str(value))
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def group_indian(whole: int) -> str:
    """12345678 -> '1,23,45,678': the last three digits, then groups of two."""
    s = str(whole)
    if len(s) <= 3:
        return s
    head, tail = s[:-3], s[-3:]
    pairs = []
    while len(head) > 2:
        pairs.insert(0, head[-2:])
        head = head[:-2]
    return ",".join([head, *pairs, tail])


def number(value: Any, places: int = 2) -> str:
    """A decimal with Indian grouping and a fixed number of places; '—' when there is none."""
    d = _decimal(value)
    if d is None:
        return "—"
    q = abs(d).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP) if places else abs(d).to_integral_value(ROUND_HALF_UP)
    whole, _, frac = f"{q:f}".partition(".")
    text = group_indian(int(whole)) + (f".{frac}" if places else "")
    return (MINUS if d < 0 and q != 0 else "") + text


def inr(value: Any, signed: bool = False) -> str:
    """Rupees: '₹1,23,456.50', '−₹1,234.00'; with signed=True a gain reads '+₹…'."""
    d = _decimal(value)
    if d is None:
        return "—"
    text = number(d)
    if text.startswith(MINUS):
        return MINUS + "₹" + text[1:]
    return ("+" if signed and d > 0 else "") + "₹" + text


def qty(value: Any) -> str:
    return number(value, places=0)


def tone(value: Any) -> str:
    """The CSS class for a gain, a loss or nothing."""
    d = _decimal(value)
    if d is None or d == 0:
        return "flat"
    return "gain" if d > 0 else "loss"


def ist(value: Any, with_date: bool = False) -> str:
    """A stored UTC timestamp in Asia/Kolkata: '14:05:03', or '24 Nov 14:05:03'."""
    if not value:
        return "—"
    try:
        t = datetime.fromisoformat(str(value)).astimezone(IST)
    except ValueError:
        return str(value)
    return t.strftime("%d %b %H:%M:%S" if with_date else "%H:%M:%S")
