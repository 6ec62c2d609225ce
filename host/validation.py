"""Webhook payload parsing and order validation: every problem named with field, expected, found.

Strict on purpose: numbers are ASCII digits, names and symbols are ASCII, case folding is ASCII only,
and nothing with a control character or an unfilled TradingView placeholder gets through.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any, Iterator, Optional

from .models import (AlertRequest, ExecutionType, Intent, Leg, OrderType, Problem, Product, Protection, Side,
                     TargetLeg)
from .protect import ALERT_FIELDS, LEG_FIELDS, static_problems

EXCHANGES = ("NSE", "NFO", "BSE", "BFO", "MCX", "CDS", "NCO", "BCD")
ORDER_TYPE_ALIASES = {"MKT": "MKT", "MARKET": "MKT", "LMT": "LMT", "LIMIT": "LMT", "SL-LMT": "SL-LMT",
                      "SL": "SL-LMT", "SL-LIMIT": "SL-LMT", "SL-MKT": "SL-MKT", "SLM": "SL-MKT", "SL-M": "SL-MKT",
                      "SL-MARKET": "SL-MKT"}
PRODUCT_ALIASES = {"M": "M", "NRML": "M", "I": "I", "MIS": "I", "C": "C", "CNC": "C"}
SIDE_ALIASES = {"BUY": "BUY", "B": "BUY", "SELL": "SELL", "S": "SELL"}
MARKET_POSITIONS = {"LONG": 1, "SHORT": -1, "FLAT": 0}
LEG_KEYS = {  # accepted spellings of each leg field, first one canonical
    "tradingsymbol": ("tradingsymbol", "symbol"),
    "direction": ("direction", "side", "transaction_type"),
    "qty": ("qty", "quantity"),
    "order_type": ("order_type", "ordertype", "price_type"),
    "product_type": ("product_type", "product"),
    "price": ("price",),
    "trigger_price": ("trigger_price", "triggerprice"),
    "exchange": ("exchange",),
    "position": ("position",),
    "market_position": ("market_position",),
    "position_size": ("position_size",),
}
# the original platform's exit fields (protect.LEG_FIELDS on ENTRY/ADJUST legs, protect.ALERT_FIELDS on the
# alert) are the contract; the other spellings traders use for the same things are refused, never ignored
EXIT_FIELDS = ("stop_loss", "target", "stop_loss_points", "target_points", "stop_loss_pct", "target_pct",
               "trailing_type", "trailing_value", "trailing_activation_price", "strategy_stoploss", "strategy_target",
               "strategy_trailing_step",
               "stoploss", "stop", "sl", "sl_price", "stop_price", "stop_loss_price", "take_profit", "takeprofit", "tp",
               "target_price", "profit_target", "trailing_stop", "trailing_sl", "trailing_stoploss", "trail",
               "trailing")
KNOWN_ALERT_FIELDS = {"secret_key", "execution_type", "strategy_name", "exchange", "alert_id", "legs", *ALERT_FIELDS}
KNOWN_LEG_FIELDS = {name for names in LEG_KEYS.values() for name in names} | set(LEG_FIELDS)
PROTECTED_TYPES = (ExecutionType.ENTRY, ExecutionType.ADJUST)  # the types whose legs may carry exits
NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}", re.ASCII)
SYMBOL_RE = re.compile(r"[A-Za-z0-9_.&\-]{1,40}", re.ASCII)
NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?", re.ASCII)
PLACEHOLDER_RE = re.compile(r"\{\{.*?\}\}", re.DOTALL)
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode's control characters (category Cc), all of them
SURROGATE_RE = re.compile(r"[\ud800-\udfff]")  # a lone surrogate (JSON's \ud800 escape without its pair)
NSE_SERIES_RE = re.compile(r".+-[A-Z0-9]{2}", re.ASCII)  # INFY-EQ, GOLDBEES-BE: a series is already named
MAX_LEGS = 20
MAX_QTY = 10_000_000
MIN_PRICE, MAX_PRICE = Decimal("0.01"), Decimal("10000000")
PRICE_PLACES = {"CDS": 4, "BCD": 4}  # other exchanges: 2
NO_PRICE = ("", "0", "0.0", "0.00")  # what a market leg's "no price" looks like as text
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_upper(text: str) -> str:
    """Upper case for ASCII letters only: 'ſ' never becomes 'S', nor 'ı' 'I'."""
    return text.translate(_ASCII_UPPER)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json object_pairs_hook: a key given twice, in any case ("qty" and "QTY"), is an error, never "last wins"."""
    out: dict = {}
    for key, value in pairs:
        low = key.translate(_ASCII_LOWER)
        if low in out:
            raise ValueError(f"the key {key!r} is given more than once (keys are case-insensitive): expected each "
                             f"field once")
        out[low] = value
    return out


def strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every key and string value in a JSON value, with the path that names it (legs[0].qty)."""
    if isinstance(value, dict):
        for k, v in value.items():
            key = str(k)
            where = f"{path}.{key}" if path else key
            yield where, key
            yield from strings(v, where)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from strings(v, f"{path}[{i}]")
    elif isinstance(value, str):
        yield path, value


def texts(value: Any) -> str:
    """Every key and string value in a JSON value, joined by spaces: one quick look before naming a path.

    Whatever a pattern finds in one of them, it finds here too (it may find more, across two of them)."""
    out: list[str] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            out += map(str, v)
            stack += v.values()
        elif isinstance(v, list):
            stack += v
        elif isinstance(v, str):
            out.append(v)
    return " ".join(out)


def unencodable(value: Any) -> Optional[str]:
    """The path of the first string that is not valid Unicode text (a lone surrogate), or None."""
    if not SURROGATE_RE.search(texts(value)):
        return None  # the common case: no path to name
    return next((where or "body" for where, text in strings(value) if SURROGATE_RE.search(text)), None)


def shown(value: Any) -> str:
    """A short, safe rendering of a value found in the input, in JSON's terms."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{str(value).lower()} (boolean)"
    if isinstance(value, (int, float, Decimal)):
        text = f"{value} (number)" if len(str(value)) <= 40 else f"a number of {len(str(value))} characters"
    elif isinstance(value, str):
        text = ascii(value) if not value.isascii() or not value.isprintable() else repr(value)
    elif isinstance(value, (list, tuple)):
        text = f"a list of {len(value)}"
    elif isinstance(value, dict):
        text = "an object"
    else:
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def number(value: Any) -> Optional[Decimal]:
    """A JSON number, or text of ASCII digits with an optional sign, point and exponent, as Decimal.

    None for anything else: booleans, other scripts' digits, underscores, NaN, infinities, 40+ characters.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value) if abs(value) < 10 ** 18 else None
    if isinstance(value, (float, Decimal)):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip(" \t")
    else:
        return None
    if len(text) > 40 or not NUMBER_RE.fullmatch(text):
        return None
    try:
        n = Decimal(text)
    except InvalidOperation:
        return None
    if not n.is_finite() or abs(n) >= 10 ** 18:
        return None
    return Decimal(format(n, "f"))  # plain digits: "2.61e4" is 26100, never sent as 2.61E+4


def price_places(exchange: Optional[str]) -> int:
    return PRICE_PLACES.get(exchange or "", 2)


class Collector:
    """Collects problems (field, expected, found) and notes while a payload is read."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.notes: list[str] = []

    def add(self, field: str, expected: str, found: Any) -> None:
        problem = Problem(field, expected, shown(found))
        if problem not in self.problems:
            self.problems.append(problem)

    def choice(self, field: str, value: Any, aliases: dict[str, Any], expected: str) -> Optional[Any]:
        if isinstance(value, str) and value.isascii():
            key = ascii_upper(value.strip(" \t"))
            if key in aliases:
                return aliases[key]
        self.add(field, expected, value)
        return None

    def quantity(self, field: str, value: Any, lo: int = 1) -> Optional[int]:
        n = number(value)
        if n is None or not lo <= n <= MAX_QTY or n != n.to_integral_value():
            self.add(field, f"a whole number from {lo} to {MAX_QTY:,}", value)
            return None
        return int(n)

    def price(self, field: str, value: Any, required: bool, why: str, exchange: Optional[str]) -> Optional[Decimal]:
        if value is None or value == "":
            if required:
                self.add(field, f"a price ({why})", value)
            return None
        n = number(value)
        places = price_places(exchange)
        if n is None or not MIN_PRICE <= n <= MAX_PRICE or n.scaleb(places) % 1:
            self.add(field, f"a price from {MIN_PRICE} to {MAX_PRICE:,} with at most {places} decimal places"
                            f"{f' on {exchange}' if exchange else ''}", value)
            return None
        return n


def _pick(obj: dict, names: tuple[str, ...]) -> Any:
    for n in names:
        if n in obj:
            return obj[n]
    return None


def _is_no_price(value: Any) -> bool:
    """A market leg's way of saying "no price": absent, null, "", 0, "0", "0.0"."""
    if value is None or (isinstance(value, str) and value.strip(" \t") in NO_PRICE):
        return True
    n = number(value.strip(" \t") if isinstance(value, str) else value)  # "0.000", "00", "0E-2": zero as a template
    return n is not None and n == 0                                        # renders it


def screen(body: dict) -> list[Problem]:
    """Problems anywhere in the body: control characters, and TradingView placeholders left unfilled."""
    everything = texts(body)
    if not (CONTROL_RE.search(everything) or PLACEHOLDER_RE.search(everything)):
        return []  # the common case: no path to name
    return screen_each(body)


def screen_each(body: dict) -> list[Problem]:
    """screen(), string by string, each problem named by its path."""
    c = Collector()
    for where, text in strings(body):
        if CONTROL_RE.search(text):
            c.add(where, "text without control characters (newline, tab, NUL ...)", text)
        elif PLACEHOLDER_RE.search(text):
            c.add(where, "a value; this alert type does not fill the TradingView placeholder "
                         f"{PLACEHOLDER_RE.search(text).group(0)} (strategy placeholders are filled only in "
                         "strategy alerts: use a strategy alert or put the value in the message)", text)
    return c.problems


def client_alert_key(value: Any) -> Optional[str]:
    """The sender's alert_id as text; None when absent or not a string (or number) of 1-128 characters."""
    if isinstance(value, (str, int)) and not isinstance(value, bool) and 0 < len(str(value)) <= 128:
        return str(value)
    return None


def parse_alert(body: dict) -> tuple[Optional[AlertRequest], list[Problem]]:
    """Validate a lower-cased webhook body; return the request or every problem found."""
    c = Collector()
    c.problems += screen(body)
    execution = c.choice("execution_type", body.get("execution_type"), {e.value: e for e in ExecutionType},
                         " | ".join(e.value for e in ExecutionType))
    strategy = body.get("strategy_name")
    if not (isinstance(strategy, str) and NAME_RE.fullmatch(strategy)):
        c.add("strategy_name", "a name of 1-64 ASCII letters, digits, '_', '-' or '.'", strategy)
    alert_key = body.get("alert_id")
    if alert_key is not None and client_alert_key(alert_key) is None:
        c.add("alert_id", "a string of 1-128 characters", alert_key)
    _unknown(c, "", body, KNOWN_ALERT_FIELDS)
    top_exchange = body.get("exchange")
    legs_raw = body.get("legs")
    legs: list[Any] = []
    if not isinstance(legs_raw, list) or not 0 < len(legs_raw) <= MAX_LEGS:
        c.add("legs", f"a list of 1 to {MAX_LEGS} order legs", legs_raw if not isinstance(legs_raw, list)
              else f"{len(legs_raw)} legs")
    elif execution is not None:
        limits = _strategy_limits(c, body, execution)
        read = _parse_target if execution is ExecutionType.POSITION else (
            lambda c, where, raw, top: _parse_leg(c, where, raw, top, execution, limits))
        for i, raw in enumerate(legs_raw):
            leg = read(c, f"legs[{i}]", raw, top_exchange)
            if leg is not None:
                legs.append(leg)
    if c.problems:
        return None, c.problems
    key = None if alert_key is None else str(alert_key)
    if execution is ExecutionType.POSITION:
        return AlertRequest(strategy, execution, (), key, targets=tuple(legs), notes=tuple(c.notes)), []
    return AlertRequest(strategy, execution, tuple(legs), key, notes=tuple(c.notes)), []


def _common(c: Collector, where: str, raw: Any, top_exchange: Any, what: str, opens: bool = True) -> Optional[dict]:
    """The fields every leg has: exchange, symbol, order type, product, and the refused exit fields. `opens`: the
    leg may open a position (an EXIT's product may name a position held before, whatever it is)."""
    if not isinstance(raw, dict):
        c.add(where, f"an object with {what}", raw)
        return None
    f = {k: _pick(raw, names) for k, names in LEG_KEYS.items()}
    exchange_raw = f["exchange"] if f["exchange"] is not None else top_exchange
    f["exchange"] = c.choice(f"{where}.exchange" if f["exchange"] is not None or top_exchange is None else "exchange",
                             exchange_raw,
                             {e: e for e in EXCHANGES}, " | ".join(EXCHANGES))
    symbol = f["tradingsymbol"]
    if isinstance(symbol, str) and SYMBOL_RE.fullmatch(symbol.strip(" \t")):
        f["tradingsymbol"] = tradingsymbol(f["exchange"], ascii_upper(symbol.strip(" \t")), c, where)
    else:
        c.add(f"{where}.tradingsymbol", "a trading symbol of ASCII letters, digits, '&', '_', '-' or '.', such as "
                                        "NIFTY28APR26C24500 or INFY-EQ", symbol)
        f["tradingsymbol"] = None
    otype = c.choice(f"{where}.order_type", f["order_type"], ORDER_TYPE_ALIASES, "MKT | LMT | SL-LMT | SL-MKT (or MARKET, LIMIT, SL, SLM)")
    f["order_type"] = OrderType(otype) if otype else None
    product_raw = f["product_type"]
    f["product_type"] = c.choice(f"{where}.product_type", product_raw, PRODUCT_ALIASES,
                                 "M | I | C (or NRML, MIS, CNC)")
    if f["product_type"] == "C" and f["exchange"] is not None and opens:
        delivery_only(c, f"{where}.product_type", f["exchange"], product_raw)
    _unknown(c, f"{where}.", raw, KNOWN_LEG_FIELDS)
    return f


DELIVERY_EXCHANGES = ("NSE", "BSE")  # CNC (delivery) is equity's: futures and options are NRML or MIS


def delivery_only(c: Collector, field: str, exchange: str, found: Any) -> None:
    """CNC outside NSE and BSE equity: a futures or options position held as CNC would be outside risk's PnL."""
    if exchange not in DELIVERY_EXCHANGES:
        c.add(field, f"M or I (NRML or MIS) on {exchange}: C (CNC, delivery) is for NSE and BSE equity only", found)


def _not_read(c: Collector, where: str, f: dict, names: tuple[str, ...], why: str) -> None:
    """Known fields this kind of leg does not read: noted, never dropped unsaid."""
    for name in names:
        if f.get(name) is not None:
            c.notes.append(f"{where}.{name} {shown(f[name])} ignored: {why}")


def _unknown(c: Collector, prefix: str, obj: dict, known: set[str]) -> None:
    """Fields this host does not read: a managed-exit field is refused (never run without it); others noted."""
    for name, value in obj.items():
        if name in known:
            continue
        if name in EXIT_FIELDS:
            c.add(f"{prefix}{name}", "the contract's names: stop_loss, target, stop_loss_points, target_points, "
                                     "stop_loss_pct, target_pct, trailing_type, trailing_value, "
                                     "trailing_activation_price on a leg; strategy_stoploss, strategy_target, "
                                     "strategy_trailing_step on the alert (an alert is refused rather than run "
                                     "without the exit it asked for)", value)
        else:
            c.notes.append(f"{prefix}{name} ignored: not a field this host reads")


def tradingsymbol(exchange: Optional[str], symbol: str, c: Collector, where: str) -> str:
    """TradingView's {{ticker}} for an NSE equity has no series: INFY means INFY-EQ."""
    if exchange == "NSE" and not NSE_SERIES_RE.fullmatch(symbol):
        c.notes.append(f"{where}.tradingsymbol {symbol} traded as {symbol}-EQ (NSE equity series)")
        return f"{symbol}-EQ"
    return symbol


def _prices(c: Collector, where: str, f: dict, ot: Optional[OrderType],
            opens: bool = True) -> tuple[Optional[Decimal], Optional[Decimal]]:
    """The leg's price and trigger; a market leg's price means nothing ("no price", or ignored with a note)."""
    exchange = f["exchange"]
    if ot is not None and not ot.needs_price:
        if not _is_no_price(f["price"]):
            c.notes.append(f"{where}.price {shown(f['price'])} ignored: {ot.value} orders carry no price")
        price = None
    else:
        price = c.price(f"{where}.price", f["price"], bool(ot), f"{ot.value if ot else ''} orders need a price",
                        exchange)
    if ot is not None and not ot.needs_trigger:
        if _is_no_price(f["trigger_price"]):
            return price, None  # 0, "" or null: no trigger, as a market leg's price 0 is no price
        if ot is OrderType.LMT and opens:  # an entry's limit where a stop was meant fills at once: refused
            c.add(f"{where}.trigger_price", f"no trigger price on a {ot.value} order (a stop is SL-LMT or SL-MKT)",
                  f["trigger_price"])
        else:  # a market order, or an exit (never refused for a field it does not need)
            c.notes.append(f"{where}.trigger_price {shown(f['trigger_price'])} ignored: {ot.value} orders carry no "
                           f"trigger")
        return price, None
    trigger = c.price(f"{where}.trigger_price", f["trigger_price"], bool(ot and ot.needs_trigger),
                      f"{ot.value if ot else ''} orders need a trigger price", exchange)
    return price, trigger


def _strategy_limits(c: Collector, body: dict, execution: ExecutionType) -> dict:
    """strategy_stoploss, strategy_target, strategy_trailing_step: rupees of the strategy's MTM, on ENTRY/ADJUST."""
    out = {}
    for name in ALERT_FIELDS:
        if body.get(name) is None:
            continue
        if execution not in PROTECTED_TYPES:
            c.add(name, "no strategy MTM limits on an EXIT or POSITION alert (only on ENTRY or ADJUST)", body[name])
            continue
        n = number(body[name])
        if n is None or n <= 0:
            c.add(name, "an amount of rupees above 0", body[name])
        else:
            out[name] = n
    return out


def _protection(c: Collector, where: str, raw: dict, exchange: Optional[str], execution: ExecutionType,
                limits: dict) -> Optional[Protection]:
    """The exit fields of one leg (the contract's names), with the alert's strategy limits."""
    given = {name: raw[name] for name in LEG_FIELDS if raw.get(name) is not None}
    if given and execution not in PROTECTED_TYPES:
        for name, value in given.items():
            c.add(f"{where}.{name}", f"no stop, target or trailing on an {execution.value} leg (only on ENTRY or "
                                     f"ADJUST)", value)
        return None
    values: dict[str, Any] = dict(limits)
    for name, value in given.items():
        if name == "trailing_type":
            values[name] = c.choice(f"{where}.{name}", value, {"POINTS": "POINTS", "PERCENT": "PERCENT"},
                                    "POINTS | PERCENT")
        elif name in ("stop_loss", "target", "trailing_activation_price"):
            values[name] = c.price(f"{where}.{name}", value, True, "an absolute price", exchange)
        else:
            n = number(value)
            if n is None:
                c.add(f"{where}.{name}", "a number above 0", value)
            values[name] = n
    values = {k: v for k, v in values.items() if v is not None}
    return Protection(**values) if values else None


def _parse_leg(c: Collector, where: str, raw: Any, top_exchange: Any, execution: ExecutionType = ExecutionType.ENTRY,
               limits: Optional[dict] = None) -> Optional[Leg]:
    before = len(c.problems)
    f = _common(c, where, raw, top_exchange, "tradingsymbol, direction, qty, order_type, product_type",
                opens=execution is not ExecutionType.EXIT)
    if f is None:
        return None
    side = c.choice(f"{where}.direction", f["direction"], SIDE_ALIASES, "BUY | SELL")
    qty = c.quantity(f"{where}.qty", f["qty"])
    _not_read(c, where, f, ("position", "market_position", "position_size"), "a position target is a POSITION "
                                                                            "alert's, not an order leg's")
    price, trigger = _prices(c, where, f, f["order_type"], opens=execution is not ExecutionType.EXIT)
    protection = _protection(c, where, raw, f["exchange"], execution, limits or {})
    if len(c.problems) > before:
        return None
    if protection is not None:  # the audit's rules; the LTP of a market entry and the tick are checked later
        ot = f["order_type"]
        ref = price if ot.needs_price else trigger if ot is OrderType.SL_MKT else None
        c.problems += [p for p in static_problems(protection, Side(side), ref, where, "the entry price",
                                                                     alert_where="")
                       if p not in c.problems]
        if len(c.problems) > before:
            return None
    return Leg(f["exchange"], f["tradingsymbol"], Side(side), qty, f["order_type"], Product(f["product_type"]),
               price, trigger, protection=protection)


def _parse_target(c: Collector, where: str, raw: Any, top_exchange: Any) -> Optional[TargetLeg]:
    """A POSITION leg: a signed `position`, or `market_position` with `position_size`; MKT by default."""
    before = len(c.problems)
    if isinstance(raw, dict) and _pick(raw, LEG_KEYS["order_type"]) is None:
        raw = {**raw, "order_type": "MKT"}
    f = _common(c, where, raw, top_exchange, "tradingsymbol, product_type and position (or market_position and "
                                             "position_size)", opens=False)  # (a target that may open: below)
    if f is None:
        return None
    _protection(c, where, raw, f["exchange"], ExecutionType.POSITION, {})  # exits ride on ENTRY/ADJUST legs only
    _not_read(c, where, f, ("direction", "qty"), "a POSITION leg says the position to hold; the host works out the "
                                                 "side and quantity from the strategy's own position")
    target = _target(c, where, f)
    if f["order_type"] is not None and f["order_type"].needs_trigger:
        c.add(f"{where}.order_type", "MKT or LMT for a position target", raw.get("order_type"))
    _not_read(c, where, f, ("trigger_price",), "a position target is sent as MKT or LMT")
    price, _ = _prices(c, where, {**f, "trigger_price": None}, f["order_type"])
    if f["product_type"] == "C" and f["exchange"] is not None and target:  # flat (0) only closes
        delivery_only(c, f"{where}.product_type", f["exchange"], _pick(raw, LEG_KEYS["product_type"]))
    if len(c.problems) > before:
        return None
    return TargetLeg(f["exchange"], f["tradingsymbol"], Product(f["product_type"]), f["order_type"], target, price)


def _target(c: Collector, where: str, f: dict) -> Optional[int]:
    if f["position"] is not None and f["market_position"] is not None:
        c.add(f"{where}.market_position", "either position or market_position with position_size, not both",
              f["market_position"])
        return None
    if f["position"] is not None:
        if isinstance(f["position"], str) and ascii_upper(f["position"].strip(" \t")) == "FLAT":
            return 0
        n = number(f["position"])
        if n is None or abs(n) > MAX_QTY or n != n.to_integral_value():
            c.add(f"{where}.position", f"a signed whole number from -{MAX_QTY:,} to {MAX_QTY:,} (negative is short, "
                                       "0 or \"flat\" is flat), such as {{strategy.position_size}}", f["position"])
            return None
        return int(n)
    if f["market_position"] is None:
        c.add(f"{where}.position", "a signed target position, or market_position with position_size", None)
        return None
    sign = c.choice(f"{where}.market_position", f["market_position"], MARKET_POSITIONS, "long | short | flat")
    if sign == 0:
        if f["position_size"] is not None and number(f["position_size"]) != 0:
            c.add(f"{where}.position_size", "0 or nothing with market_position flat", f["position_size"])
        return 0
    size = c.quantity(f"{where}.position_size", f["position_size"])
    return None if sign is None or size is None else sign * size


def validate_intent(intent: Intent, where: str = "intent") -> list[Problem]:
    """The order rules applied to an intent, whatever produced it."""
    c = Collector()
    if intent.exchange not in EXCHANGES:
        c.add(f"{where}.exchange", " | ".join(EXCHANGES), intent.exchange)
    if not (isinstance(intent.symbol, str) and SYMBOL_RE.fullmatch(intent.symbol)):
        c.add(f"{where}.symbol", "a trading symbol", intent.symbol)
    elif intent.symbol != ascii_upper(intent.symbol):  # an alert's is upper-cased; a hook's names another instrument
        c.add(f"{where}.symbol", f"a trading symbol in upper case, as the exchange lists it "
                                 f"({ascii_upper(intent.symbol)})", intent.symbol)
    if isinstance(intent.qty, bool) or not isinstance(intent.qty, int) or not 0 < intent.qty <= MAX_QTY:
        c.add(f"{where}.qty", f"a whole number from 1 to {MAX_QTY:,}", intent.qty)
    if intent.product.value == "C" and intent.exchange in EXCHANGES and intent.action is not ExecutionType.EXIT:
        delivery_only(c, f"{where}.product", intent.exchange, intent.product.value)
    if intent.action is ExecutionType.POSITION:
        c.add(f"{where}.action", "ENTRY | EXIT | ADJUST (POSITION is an alert type, not an order)", intent.action.value)
    if intent.order_type.needs_price or intent.price is not None:
        c.price(f"{where}.price", intent.price, True, f"{intent.order_type.value} orders need a price",
                intent.exchange)
    if intent.order_type.needs_trigger or intent.trigger_price is not None:
        c.price(f"{where}.trigger_price", intent.trigger_price, True,
                f"{intent.order_type.value} orders need a trigger price", intent.exchange)
    return c.problems
