"""How people are shown money, quantities and times (dashboard, notifiers): ₹ with Indian digit
grouping, a real minus sign, Asia/Kolkata."""
from __future__ import annotations

import re
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


# A number is money when a money word comes just before it: "PnL -5234.5", "limit -5000", "@ 42.5",
# "trigger 95", "filled at 101.25", "moved from 95.5 to 97". Quantities ("+75", "qty 75"), counts and
# times ("at 14:05") are left alone.
_MONEY_WORDS = r"PnL|MTM|limit|peak|lost|loss|profit|margin|trigger|price|LTP|avg|stop(?: loss)?|filled at|reached at|@"
_MOVED = re.compile(r"(?P<word>moved from|moving (?:[\w-]+ ){0,2}to)(?P<gap> )(?P<num>[-−]?\d+(?:\.\d+)?)"
                    r"(?:(?P<to> to )(?P<num2>[-−]?\d+(?:\.\d+)?))?(?![\d%]|[:.]\d)")
_MONEY = re.compile(rf"(?<![\w.])(?P<word>{_MONEY_WORDS})(?P<gap>\s*(?:[:=]|<=|>=|of)?\s*)"
                    r"(?P<num>[-−]?\d+(?:\.\d+)?)(?![\d%]|[:.]\d|\s*(?:s|ms|orders?|lots?|shares?|days?|x)\b)",
                    re.IGNORECASE)


def money_text(text: Any) -> str:
    """Free text (a reason, an event) with its money shown as ₹ with Indian grouping; the stored text is unchanged."""
    if text is None:
        return ""

    def rupees(m: re.Match) -> str:
        second = f"{m['to']}{_rupee(m['num2'])}" if m.groupdict().get("num2") else ""
        return f"{m['word']}{m['gap']}{_rupee(m['num'])}{second}"
    return _MONEY.sub(rupees, _MOVED.sub(rupees, str(text)))


def _rupee(num: str) -> str:
    return inr(num.replace(MINUS, "-"))


def order_price(order: dict) -> str:
    """An order's prices as a trader reads them: 'MKT', '₹42.50', 'trigger ₹95.00 · limit ₹94.50', 'trigger ₹95.00 · MKT'."""
    trigger = _decimal(order.get("trigger_price"))
    price = _decimal(order.get("price"))
    limit = inr(price) if price and str(order.get("order_type", "")).endswith("LMT") else "MKT"
    if trigger is not None and trigger != 0:
        return f"trigger {inr(trigger)} · {'limit ' + limit if limit != 'MKT' else limit}"
    return limit
