"""Webhook payload parsing and order validation: every problem named with field, expected, found."""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any, Optional

from .models import AlertRequest, ExecutionType, Intent, Leg, OrderType, Problem, Product, Side

EXCHANGES = ("NSE", "NFO", "BSE", "BFO", "MCX", "CDS", "NCO", "BCD")
ORDER_TYPE_ALIASES = {"MKT": "MKT", "MARKET": "MKT", "LMT": "LMT", "LIMIT": "LMT", "SL-LMT": "SL-LMT",
                      "SL": "SL-LMT", "SL-LIMIT": "SL-LMT", "SL-MKT": "SL-MKT", "SLM": "SL-MKT", "SL-M": "SL-MKT",
                      "SL-MARKET": "SL-MKT"}
PRODUCT_ALIASES = {"M": "M", "NRML": "M", "I": "I", "MIS": "I", "C": "C", "CNC": "C"}
SIDE_ALIASES = {"BUY": "BUY", "B": "BUY", "SELL": "SELL", "S": "SELL"}
LEG_KEYS = {  # accepted spellings of each leg field, first one canonical
    "tradingsymbol": ("tradingsymbol", "symbol"),
    "direction": ("direction", "side", "transaction_type"),
    "qty": ("qty", "quantity"),
    "order_type": ("order_type", "ordertype", "price_type"),
    "product_type": ("product_type", "product"),
    "price": ("price",),
    "trigger_price": ("trigger_price", "triggerprice"),
    "exchange": ("exchange",),
}
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
SYMBOL_RE = re.compile(r"^[A-Za-z0-9_.&\-]{1,40}$")
MAX_LEGS = 20
MAX_QTY = 10_000_000


def lower_keys(value: Any) -> Any:
    """The same JSON value with every object key lower-cased (keys are case-insensitive)."""
    if isinstance(value, dict):
        return {str(k).lower(): lower_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [lower_keys(v) for v in value]
    return value


def shown(value: Any) -> str:
    """A short, safe rendering of a value found in the input, in JSON's terms."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{str(value).lower()} (boolean)"
    if isinstance(value, (int, float, Decimal)):
        text = f"{value} (number)"
    elif isinstance(value, str):
        text = repr(value)
    elif isinstance(value, (list, tuple)):
        text = f"a list of {len(value)}"
    elif isinstance(value, dict):
        text = "an object"
    else:
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


class _Collector:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, field: str, expected: str, found: Any) -> None:
        problem = Problem(field, expected, shown(found))
        if problem not in self.problems:
            self.problems.append(problem)

    def choice(self, field: str, value: Any, aliases: dict[str, str], expected: str) -> Optional[str]:
        if isinstance(value, str) and value.strip().upper() in aliases:
            return aliases[value.strip().upper()]
        self.add(field, expected, value)
        return None

    def quantity(self, field: str, value: Any) -> Optional[int]:
        n = _number(value)
        if n is None or n != n.to_integral_value() or not 0 < n <= MAX_QTY:
            self.add(field, f"a whole number from 1 to {MAX_QTY}", value)
            return None
        return int(n)

    def price(self, field: str, value: Any, required: bool, why: str) -> Optional[Decimal]:
        if value is None or value == "":
            if required:
                self.add(field, f"a price > 0 ({why})", value)
            return None
        n = _number(value)
        if n is None or n <= 0:
            self.add(field, "a price > 0", value)
            return None
        return n


def _number(value: Any) -> Optional[Decimal]:
    """A JSON number or numeric string as Decimal; None for anything else (booleans included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        return None
    try:
        n = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    return n if n.is_finite() else None


def _pick(obj: dict, names: tuple[str, ...]) -> Any:
    for n in names:
        if n in obj:
            return obj[n]
    return None


def parse_alert(body: dict) -> tuple[Optional[AlertRequest], list[Problem]]:
    """Validate a lower-cased webhook body; return the request or every problem found."""
    c = _Collector()
    execution = c.choice("execution_type", body.get("execution_type"),
                         {e.value: e.value for e in ExecutionType}, "ENTRY | EXIT | ADJUST")
    strategy = body.get("strategy_name")
    if not (isinstance(strategy, str) and NAME_RE.match(strategy)):
        c.add("strategy_name", "a name of 1-64 letters, digits, '_', '-' or '.'", strategy)
    alert_key = body.get("alert_id")
    if alert_key is not None and not (isinstance(alert_key, (str, int)) and not isinstance(alert_key, bool)
                                      and 0 < len(str(alert_key)) <= 128):
        c.add("alert_id", "a string of 1-128 characters", alert_key)
    top_exchange = body.get("exchange")
    legs_raw = body.get("legs")
    legs: list[Leg] = []
    if not isinstance(legs_raw, list) or not 0 < len(legs_raw) <= MAX_LEGS:
        c.add("legs", f"a list of 1 to {MAX_LEGS} order legs", legs_raw if not isinstance(legs_raw, list)
              else f"{len(legs_raw)} legs")
    else:
        for i, raw in enumerate(legs_raw):
            leg = _parse_leg(c, f"legs[{i}]", raw, top_exchange)
            if leg is not None:
                legs.append(leg)
    if c.problems:
        return None, c.problems
    return AlertRequest(strategy, ExecutionType(execution), tuple(legs),
                        None if alert_key is None else str(alert_key)), []


def _parse_leg(c: _Collector, where: str, raw: Any, top_exchange: Any) -> Optional[Leg]:
    if not isinstance(raw, dict):
        c.add(where, "an object with tradingsymbol, direction, qty, order_type, product_type", raw)
        return None
    before = len(c.problems)
    f = {k: _pick(raw, names) for k, names in LEG_KEYS.items()}
    exchange_raw = f["exchange"] if f["exchange"] is not None else top_exchange
    exchange = c.choice(f"{where}.exchange" if f["exchange"] is not None else "exchange", exchange_raw,
                        {e: e for e in EXCHANGES}, " | ".join(EXCHANGES))
    symbol = f["tradingsymbol"]
    if not (isinstance(symbol, str) and SYMBOL_RE.match(symbol.strip())):
        c.add(f"{where}.tradingsymbol", "a trading symbol such as NIFTY28APR26C24500", symbol)
    side = c.choice(f"{where}.direction", f["direction"], SIDE_ALIASES, "BUY | SELL")
    qty = c.quantity(f"{where}.qty", f["qty"])
    otype = c.choice(f"{where}.order_type", f["order_type"], ORDER_TYPE_ALIASES,
                     "MKT | LMT | SL-LMT | SL-MKT (or MARKET, LIMIT, SL, SLM)")
    product = c.choice(f"{where}.product_type", f["product_type"], PRODUCT_ALIASES,
                       "M | I | C (or NRML, MIS, CNC)")
    ot = OrderType(otype) if otype else None
    price = c.price(f"{where}.price", f["price"], bool(ot and ot.needs_price), f"{otype} orders need a price")
    trigger = c.price(f"{where}.trigger_price", f["trigger_price"], bool(ot and ot.needs_trigger),
                      f"{otype} orders need a trigger price")
    if len(c.problems) > before:
        return None
    return Leg(exchange, symbol.strip().upper(), Side(side), qty, ot, Product(product), price, trigger)


def validate_intent(intent: Intent, where: str = "intent") -> list[Problem]:
    """The order rules applied to an intent, whatever produced it."""
    c = _Collector()
    if intent.exchange not in EXCHANGES:
        c.add(f"{where}.exchange", " | ".join(EXCHANGES), intent.exchange)
    if not (isinstance(intent.symbol, str) and SYMBOL_RE.match(intent.symbol)):
        c.add(f"{where}.symbol", "a trading symbol", intent.symbol)
    if isinstance(intent.qty, bool) or not isinstance(intent.qty, int) or not 0 < intent.qty <= MAX_QTY:
        c.add(f"{where}.qty", f"a whole number from 1 to {MAX_QTY}", intent.qty)
    if intent.order_type.needs_price:
        c.price(f"{where}.price", intent.price, True, f"{intent.order_type.value} orders need a price")
    if intent.order_type.needs_trigger:
        c.price(f"{where}.trigger_price", intent.trigger_price, True,
                f"{intent.order_type.value} orders need a trigger price")
    return c.problems
