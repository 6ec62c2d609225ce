"""The simulator's matching engine: LTP-driven fills for MKT, LMT, SL-LMT and SL-MKT orders.

It keeps one trading day, as Noren does: `new_day` empties the order and trade books, carries NRML positions
forward at the previous close, moves CNC buys to holdings, and squares off intraday products first. Cover (H)
and bracket (B) orders get their stop-loss (and target) legs once the main leg fills. `remarks` is free text:
the same remarks on two orders books two orders.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Callable, Optional

import sqlite_utils

from ..filemode import create_private
from ..models import BrokerOrder, FillReport, OrderRequest, OrderStatus, OrderType, Product, Side
from ..positions import PositionMath
from ..pricing import tidy

UpdateListener = Callable[[BrokerOrder], None]
INTRADAY = ("I", "H", "B")  # squared off by the broker before the close: MIS, cover, bracket


class SimRejected(Exception):
    """The simulated exchange refused the order; the message is the reason."""


@dataclass
class SimOrder:
    broker_order_id: str
    req: OrderRequest
    status: OrderStatus = OrderStatus.OPEN
    triggered: bool = False
    filled_qty: int = 0
    value: Decimal = Decimal("0")
    reason: Optional[str] = None
    fills: list[FillReport] = field(default_factory=list)
    prd: Optional[str] = None       # "H" (cover) or "B" (bracket); None: req.product
    parent: Optional[str] = None    # a cover/bracket leg: the main order's id
    leg: str = ""                   # "" main, "SL" stop-loss leg, "TGT" target leg
    offsets: tuple[Optional[Decimal], Optional[Decimal]] = (None, None)  # (blprc, bpprc) points from the fill
    # (what it was made from, the last view): the whole book is read at every reconcile, and a day's finished
    # orders must not be made again each time. One attribute: a reader outside the lock (the Noren simulator's
    # routes) and the lock-holder may both store one, and a pair stored in two steps could be torn for good
    _view: Optional[tuple[tuple, BrokerOrder]] = field(default=None, init=False, repr=False, compare=False)

    @property
    def product_code(self) -> str:
        return self.prd or self.req.product.value

    @property
    def remaining(self) -> int:
        return self.req.qty - self.filled_qty

    def view(self) -> BrokerOrder:
        """The order as the broker's book shows it (made again only once something it shows has changed)."""
        of = (self.req, self.status, self.filled_qty, self.value, self.reason, len(self.fills), self.prd)
        kept = self._view
        if kept is not None and kept[0] == of:
            return kept[1]
        avg = tidy(self.value / self.filled_qty) if self.filled_qty else None
        view = BrokerOrder(self.broker_order_id, self.req.remarks, self.status, self.filled_qty, avg, self.reason,
                           tuple(self.fills), self.req.exchange, self.req.symbol, self.prd or self.req.product.value,
                           self.req.side)
        self._view = (of, view)  # made after `of` was read: never older than what it is kept for
        return view

    def to_json(self) -> str:
        r = self.req
        return json.dumps({
            "id": self.broker_order_id, "remarks": r.remarks, "exchange": r.exchange, "symbol": r.symbol,
            "side": r.side.value, "qty": r.qty, "order_type": r.order_type.value, "product": r.product.value,
            "price": _s(r.price), "trigger_price": _s(r.trigger_price), "status": self.status.value,
            "triggered": self.triggered, "filled_qty": self.filled_qty, "value": str(self.value),
            "reason": self.reason, "fills": [[f.fill_id, f.qty, str(f.price)] for f in self.fills],
            "prd": self.prd, "parent": self.parent, "leg": self.leg, "offsets": [_s(v) for v in self.offsets],
        })

    @classmethod
    def from_json(cls, text: str) -> "SimOrder":
        d = json.loads(text)
        req = OrderRequest(d["exchange"], d["symbol"], Side(d["side"]), d["qty"], OrderType(d["order_type"]),
                           Product(d["product"]), _d(d["price"]), _d(d["trigger_price"]), remarks=d["remarks"])
        offsets = d.get("offsets") or [None, None]
        return cls(d["id"], req, OrderStatus(d["status"]), d["triggered"], d["filled_qty"], Decimal(d["value"]),
                   d["reason"], [FillReport(f[0], f[1], Decimal(f[2])) for f in d["fills"]], d.get("prd"),
                   d.get("parent"), d.get("leg", ""), (_d(offsets[0]), _d(offsets[1])))


def _s(v: Optional[Decimal]) -> Optional[str]:
    return None if v is None else str(v)


def _d(v: Optional[str]) -> Optional[Decimal]:
    return None if v is None else Decimal(v)


def _apply_fills(rows: dict[tuple[str, str, str], "PositionRow"], o: SimOrder) -> None:
    key = (o.req.exchange, o.req.symbol, o.product_code)
    for f in o.fills:
        rows.setdefault(key, PositionRow()).apply(o.req.side, f.qty, f.price)


@dataclass
class PositionRow:
    """One row of the broker's position book: the carried quantity, today's buys and sells, the net."""

    cf_qty: int = 0                      # carried from the previous day (signed)
    cf_price: Decimal = Decimal("0")     # at the previous close (Noren's upldprc)
    day_buy_qty: int = 0
    day_buy_amt: Decimal = Decimal("0")
    day_sell_qty: int = 0
    day_sell_amt: Decimal = Decimal("0")
    math: PositionMath = field(default_factory=PositionMath)

    def apply(self, side: Side, qty: int, price: Decimal) -> None:
        if side is Side.BUY:
            self.day_buy_qty, self.day_buy_amt = self.day_buy_qty + qty, self.day_buy_amt + qty * price
        else:
            self.day_sell_qty, self.day_sell_amt = self.day_sell_qty + qty, self.day_sell_amt + qty * price
        self.math = self.math.apply(side, qty, price)


class MatchingEngine:
    """A thread-safe order book for one trading day against last traded prices, optionally persisted to SQLite."""

    def __init__(self, path: Optional[Path] = None, price_from: str = "/api/paper/ticks"):
        self.price_from = price_from  # where a price comes from, named when an order needs one and there is none
        self._lock = threading.RLock()
        self._orders: dict[str, SimOrder] = {}
        self._by_remarks: dict[str, list[str]] = {}
        self._ltp: dict[tuple[str, str], Decimal] = {}
        self._listeners: list[UpdateListener] = []
        # position_book's kept part: (the carry it started from, the leading finished orders' ids, their rows)
        self._finished: tuple[dict, list[str], dict[tuple[str, str, str], PositionRow]] = ({}, [], {})
        self._seq = 0
        self.day: date = date.today()
        self.carry: dict[tuple[str, str, str], tuple[int, Decimal]] = {}   # NRML carried: (net qty, upload price)
        self.holdings: dict[tuple[str, str], tuple[int, Decimal]] = {}     # CNC delivered: (qty, average price)
        # fault controls for tests
        self.reject_next: Optional[str] = None
        self.delay_next_s: float = 0.0
        self.max_fill_qty: Optional[int] = None
        # a stop's type cannot be changed by ModifyOrder (SL-MKT to LMT, say): the worse reading of the broker, as
        # nothing says Noren allows it (a test that needs the other reading sets this)
        self.stop_type_changes = False
        self._db = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            create_private(Path(path))
            conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=5)
            self._db = sqlite_utils.Database(conn)  # used only under self._lock
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # survives a killed process, as paper mode needs
            self._db["sim_orders"].create({"id": str, "data": str}, pk="id", if_not_exists=True)
            self._db["sim_ltp"].create({"exchange": str, "symbol": str, "ltp": str},
                                       pk=("exchange", "symbol"), if_not_exists=True)
            self._db["sim_state"].create({"key": str, "data": str}, pk="key", if_not_exists=True)
            self._load()

    def _load(self) -> None:
        for row in self._db["sim_orders"].rows:
            o = SimOrder.from_json(row["data"])
            self._orders[o.broker_order_id] = o
            self._by_remarks.setdefault(o.req.remarks, []).append(o.broker_order_id)
            self._seq = max(self._seq, int(o.broker_order_id[-9:]))
        for row in self._db["sim_ltp"].rows:
            self._ltp[(row["exchange"], row["symbol"])] = Decimal(row["ltp"])
        state = {row["key"]: json.loads(row["data"]) for row in self._db["sim_state"].rows}
        if "day" in state:
            self.day, self._seq = date.fromisoformat(state["day"]["day"]), max(self._seq, state["day"]["seq"])
        self.carry = {tuple(k.split("|")): (q, Decimal(p)) for k, (q, p) in state.get("carry", {}).items()}
        self.holdings = {tuple(k.split("|")): (q, Decimal(p)) for k, (q, p) in state.get("holdings", {}).items()}

    def _save(self, orders: list[SimOrder], ltp_key: Optional[tuple[str, str]] = None) -> None:
        if self._db is None:
            return
        with self._db.atomic():  # plain statements: sqlite-utils' upserts read the table's shape on every call
            if orders:
                self._db.conn.executemany("insert into sim_orders (id, data) values (?, ?) on conflict (id) do update "
                                          "set data = excluded.data", [(o.broker_order_id, o.to_json()) for o in orders])
            if ltp_key is not None:
                self._db.conn.execute("insert into sim_ltp (exchange, symbol, ltp) values (?, ?, ?) on conflict "
                                      "(exchange, symbol) do update set ltp = excluded.ltp",
                                      (ltp_key[0], ltp_key[1], str(self._ltp[ltp_key])))

    def _save_day(self) -> None:
        """After a day roll: the books are empty; the day, the carried positions and the holdings are kept."""
        if self._db is None:
            return
        state = {"day": {"day": self.day.isoformat(), "seq": self._seq},
                 "carry": {"|".join(k): [q, str(p)] for k, (q, p) in self.carry.items()},
                 "holdings": {"|".join(k): [q, str(p)] for k, (q, p) in self.holdings.items()}}
        with self._db.atomic():
            self._db.execute("delete from sim_orders")
            self._db.execute("delete from sim_ltp")
            self._db["sim_state"].upsert_all([{"key": k, "data": json.dumps(v)} for k, v in state.items()], pk="key")

    def subscribe(self, listener: UpdateListener) -> None:
        """Call listener with every order update (after the lock is released)."""
        self._listeners.append(listener)

    def _emit(self, updates: list[BrokerOrder]) -> None:
        for u in updates:
            for listener in list(self._listeners):
                listener(u)

    # ---- market ----
    def ltp(self, exchange: str, symbol: str) -> Optional[Decimal]:
        with self._lock:
            return self._ltp.get((exchange, symbol))

    def forget_ltp(self, exchange: str, symbol: str) -> None:
        """No trade today in this contract: no last price until the next tick."""
        with self._lock:
            self._ltp.pop((exchange, symbol), None)
            if self._db is not None:
                self._db.execute("delete from sim_ltp where exchange = ? and symbol = ?", (exchange, symbol))

    def set_ltp(self, exchange: str, symbol: str, ltp: Decimal) -> list[BrokerOrder]:
        """Move the market; fill whatever the new price crosses."""
        with self._lock:
            key = (exchange, symbol)
            self._ltp[key] = ltp
            touched = self._settle([o for o in list(self._orders.values())
                                    if not o.status.terminal and (o.req.exchange, o.req.symbol) == key and self._match(o)])
            self._save(touched, key)
            updates = [o.view() for o in touched]
        self._emit(updates)
        return updates

    # ---- orders ----
    def _next_id(self) -> str:
        self._seq += 1
        return self.day.strftime("%y%m%d") + f"{self._seq:09d}"

    def _add(self, o: SimOrder) -> None:
        self._orders[o.broker_order_id] = o
        self._by_remarks.setdefault(o.req.remarks, []).append(o.broker_order_id)

    def place(self, req: OrderRequest, prd: Optional[str] = None,
              offsets: tuple[Optional[Decimal], Optional[Decimal]] = (None, None)) -> str:
        """Accept an order and match it at once if the price allows; return the broker order id.

        `prd` "H" or "B" makes a cover or bracket order (req.product is then MIS); `offsets` are its
        (stop-loss, target) distances from the fill price. Remarks are never checked for repeats."""
        if self.delay_next_s:
            delay, self.delay_next_s = self.delay_next_s, 0.0
            time.sleep(delay)
        with self._lock:
            if self.reject_next:
                reason, self.reject_next = self.reject_next, None
                raise SimRejected(reason)
            key = (req.exchange, req.symbol)
            if key not in self._ltp:
                # a limit price may stand in for the market; a stop order cannot be judged without one
                if req.order_type is not OrderType.LMT:
                    raise SimRejected(f"no price for {req.exchange}:{req.symbol}: send a tick to "
                                      f"{self.price_from} before a {req.order_type.value} order")
                self._ltp[key] = req.price
            o = SimOrder(self._next_id(), req, prd=prd, offsets=offsets)
            self._add(o)
            self._match(o)
            touched = self._settle([o])
            self._save(touched, key)
            updates = [t.view() for t in touched]
        self._emit(updates)
        return o.broker_order_id

    def record_rejected(self, req: OrderRequest, reason: str, prd: Optional[str] = None) -> str:
        """Book an order the exchange refused, as a real OMS shows it: an order number, status REJECTED."""
        with self._lock:
            o = SimOrder(self._next_id(), req, OrderStatus.REJECTED, reason=reason, prd=prd)
            self._add(o)
            self._save([o])
            update = o.view()
        self._emit([update])
        return o.broker_order_id

    def modify(self, broker_order_id: str, qty: int, order_type: OrderType, price: Optional[Decimal],
               trigger_price: Optional[Decimal]) -> BrokerOrder:
        """Change a working order's quantity and prices; it is matched again at once."""
        with self._lock:
            o = self._working(broker_order_id)
            if qty < o.filled_qty or qty <= 0:
                raise SimRejected(f"quantity {qty} is below the {o.filled_qty} already filled")
            if order_type is not o.req.order_type and o.req.order_type.needs_trigger and not self.stop_type_changes:
                raise SimRejected(f"order type cannot be changed from {o.req.order_type.value} to "
                                  f"{order_type.value} by a modification: cancel it and place a new order")
            o.req = replace(o.req, qty=qty, order_type=order_type, price=price, trigger_price=trigger_price)
            self._match(o)
            touched = self._settle([o])
            self._save(touched)
            updates = [t.view() for t in touched]
        self._emit(updates)
        return updates[0]

    def get(self, broker_order_id: str) -> Optional[SimOrder]:
        with self._lock:
            return self._orders.get(broker_order_id)

    def _working(self, broker_order_id: str) -> SimOrder:
        """The order, if it can still be changed; else why not."""
        o = self._orders.get(broker_order_id)
        if o is None:
            raise SimRejected(f"no order {broker_order_id}")
        if o.status.terminal:
            raise SimRejected(f"order {broker_order_id} is already {o.status.value}")
        return o

    def cancel(self, broker_order_id: str) -> BrokerOrder:
        with self._lock:
            o = self._working(broker_order_id)
            o.status, o.reason = OrderStatus.CANCELLED, "cancelled by user"
            self._save([o])
            update = o.view()
        self._emit([update])
        return update

    def exit_legs(self, parent_id: str) -> None:
        """Exit a cover/bracket order (ExitSNOOrder): cancel its target, turn its stop-loss into a market order."""
        with self._lock:
            legs = [o for o in self._orders.values() if o.parent == parent_id and not o.status.terminal]
            if not legs:
                raise SimRejected(f"no open leg of order {parent_id}")
            for o in legs:
                if o.leg == "TGT":
                    o.status, o.reason = OrderStatus.CANCELLED, "cancelled by exit"
                else:
                    o.req = replace(o.req, order_type=OrderType.MKT, price=None, trigger_price=None)
                    self._match(o)
            touched = self._settle(legs)
            self._save(touched)
            updates = [o.view() for o in touched]
        self._emit(updates)

    def order_book(self) -> list[BrokerOrder]:
        with self._lock:
            return [o.view() for o in self._orders.values()]

    def find(self, remarks: str) -> Optional[BrokerOrder]:
        """The first order booked today with these remarks (there may be more: see find_all)."""
        found = self.find_all(remarks)
        return found[0] if found else None

    def find_all(self, remarks: str) -> list[BrokerOrder]:
        with self._lock:
            return [self._orders[oid].view() for oid in self._by_remarks.get(remarks, [])]

    def position_book(self) -> dict[tuple[str, str, str], PositionRow]:
        """Account-level positions (the broker's truth): what was carried in, then every fill of today.

        The day's leading run of finished orders (their fills can no longer change) is applied once and kept,
        so that a poll costs what the orders still working cost, not the whole day's book."""
        with self._lock:
            orders = list(self._orders.values())
            carry, ids, rows = self._finished
            if carry is not self.carry or len(ids) > len(orders) or (ids and (
                    orders[0].broker_order_id != ids[0] or orders[len(ids) - 1].broker_order_id != ids[-1])):
                carry, ids, rows = self.carry, [], {k: PositionRow(q, p, math=PositionMath(q, p))
                                                    for k, (q, p) in self.carry.items()}
            while len(ids) < len(orders) and orders[len(ids)].status.terminal:
                _apply_fills(rows, orders[len(ids)])
                ids.append(orders[len(ids)].broker_order_id)
            self._finished = (carry, ids, rows)
            out = {k: replace(r) for k, r in rows.items()}
            for o in orders[len(ids):]:
                _apply_fills(out, o)
            return out

    def positions(self) -> dict[tuple[str, str, str], PositionMath]:
        """Account-level net positions, by (exchange, symbol, product code)."""
        return {k: row.math for k, row in self.position_book().items()}

    # ---- the broker's own actions ----
    def square_off(self, products: tuple[str, ...] = INTRADAY) -> list[str]:
        """The broker's square-off before the close: cancel working orders of these products, then close every
        open position in them at market, with no remarks. Answers the ids of the square-off orders."""
        with self._lock:
            working = [o for o in self._orders.values() if not o.status.terminal and o.product_code in products]
            for o in working:
                o.status, o.reason = OrderStatus.CANCELLED, "cancelled by the broker's square-off"
            self._save(working)
            updates = [o.view() for o in working]
            open_rows = [(k, row.math.net_qty) for k, row in self.position_book().items()
                         if k[2] in products and row.math.net_qty and k[:2] in self._ltp]
        self._emit(updates)
        placed = []
        for (ex, sym, prd), net in open_rows:
            req = OrderRequest(ex, sym, Side.SELL if net > 0 else Side.BUY, abs(net), OrderType.MKT,
                               Product.MIS if prd in ("H", "B") else Product(prd), None, None, remarks="")
            placed.append(self.place(req, prd=prd if prd in ("H", "B") else None))
        return placed

    def new_day(self) -> dict[tuple[str, str], Decimal]:
        """Roll to the next trading day, as Noren's books do overnight.

        Intraday products are squared off first. Then the order and trade books are emptied (open DAY orders
        vanish without an update), NRML positions are carried at the last price (cfbuyqty/cfsellqty), CNC
        buys move to holdings, and no contract has a last price until it trades again. Answers the previous
        closes, by (exchange, symbol)."""
        self.square_off()
        with self._lock:
            closes = dict(self._ltp)
            carry: dict[tuple[str, str, str], tuple[int, Decimal]] = {}
            for (ex, sym, prd), row in self.position_book().items():
                net = row.math.net_qty
                if not net:
                    continue
                if prd == Product.NRML.value:
                    carry[(ex, sym, prd)] = (net, closes.get((ex, sym), row.math.avg_price))
                elif prd == Product.CNC.value and net > 0:
                    held, avg = self.holdings.get((ex, sym), (0, Decimal("0")))
                    self.holdings[(ex, sym)] = (held + net, tidy((held * avg + net * row.math.avg_price) / (held + net)))
            self.carry = carry
            self._orders.clear()
            self._by_remarks.clear()
            self._ltp.clear()
            self.day += timedelta(days=3 if self.day.weekday() == 4 else 2 if self.day.weekday() == 5 else 1)
            self._save_day()
        return closes

    # ---- matching ----
    def _settle(self, touched: list[SimOrder]) -> list[SimOrder]:
        """After matching: a filled cover/bracket main order gets its legs; a filled leg cancels its sibling.
        Answers every order that changed, the touched ones first."""
        out = list(touched)
        for o in touched:
            if o.status is not OrderStatus.FILLED:
                continue
            if o.prd in ("H", "B") and not o.parent:
                out += self._settle(self._spawn_legs(o))
            elif o.parent:
                for sib in self._orders.values():
                    if sib.parent == o.parent and sib is not o and not sib.status.terminal:
                        sib.status, sib.reason = OrderStatus.CANCELLED, "cancelled: the other leg filled"
                        out.append(sib)
        return list({o.broker_order_id: o for o in out}.values())

    def _spawn_legs(self, main: SimOrder) -> list[SimOrder]:
        if any(o.parent == main.broker_order_id for o in self._orders.values()):
            return []
        avg = main.value / main.filled_qty
        sign = main.req.side.sign  # the legs close the main order: a stop below a buy, a target above it
        exit_side = Side.SELL if main.req.side is Side.BUY else Side.BUY
        stop, target = main.offsets
        legs = []
        if stop is not None:
            legs.append(("SL", replace(main.req, side=exit_side, order_type=OrderType.SL_MKT, price=None,
                                       trigger_price=tidy(avg - sign * stop))))
        if target is not None and main.prd == "B":
            legs.append(("TGT", replace(main.req, side=exit_side, order_type=OrderType.LMT,
                                        price=tidy(avg + sign * target), trigger_price=None)))
        made = []
        for name, req in legs:
            leg = SimOrder(self._next_id(), req, prd=main.prd, parent=main.broker_order_id, leg=name)
            self._add(leg)
            self._match(leg)
            made.append(leg)
        return made

    def _match(self, o: SimOrder) -> bool:
        """Fill o as far as the current LTP allows; True when anything changed."""
        ltp = self._ltp.get((o.req.exchange, o.req.symbol))
        if ltp is None or o.remaining <= 0:
            return False
        req, buy = o.req, o.req.side is Side.BUY
        changed = False
        if req.order_type.needs_trigger and not o.triggered:
            if (ltp >= req.trigger_price) if buy else (ltp <= req.trigger_price):
                o.triggered = changed = True
            else:
                return False
        if req.order_type in (OrderType.MKT, OrderType.SL_MKT):
            price = ltp
        elif (ltp <= req.price) if buy else (ltp >= req.price):
            price = ltp
        else:
            return changed
        qty = o.remaining if self.max_fill_qty is None else min(o.remaining, self.max_fill_qty)
        o.fills.append(FillReport(f"{o.broker_order_id}-{len(o.fills) + 1}", qty, price))
        o.filled_qty += qty
        o.value += qty * price
        o.status = OrderStatus.FILLED if o.remaining == 0 else OrderStatus.PARTIAL
        return True
