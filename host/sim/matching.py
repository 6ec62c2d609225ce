"""The simulator's matching engine: LTP-driven fills for MKT, LMT, SL-LMT and SL-MKT orders."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Callable, Optional

import sqlite_utils

from ..models import BrokerOrder, FillReport, OrderRequest, OrderStatus, OrderType, Side
from ..positions import PositionMath
from ..pricing import tidy

UpdateListener = Callable[[BrokerOrder], None]


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

    @property
    def remaining(self) -> int:
        return self.req.qty - self.filled_qty

    def view(self) -> BrokerOrder:
        avg = tidy(self.value / self.filled_qty) if self.filled_qty else None
        return BrokerOrder(self.broker_order_id, self.req.remarks, self.status, self.filled_qty, avg,
                           self.reason, tuple(self.fills))

    def to_json(self) -> str:
        r = self.req
        return json.dumps({
            "id": self.broker_order_id, "remarks": r.remarks, "exchange": r.exchange, "symbol": r.symbol,
            "side": r.side.value, "qty": r.qty, "order_type": r.order_type.value, "product": r.product.value,
            "price": _s(r.price), "trigger_price": _s(r.trigger_price), "status": self.status.value,
            "triggered": self.triggered, "filled_qty": self.filled_qty, "value": str(self.value),
            "reason": self.reason, "fills": [[f.fill_id, f.qty, str(f.price)] for f in self.fills],
        })

    @classmethod
    def from_json(cls, text: str) -> "SimOrder":
        from ..models import Product
        d = json.loads(text)
        req = OrderRequest(d["exchange"], d["symbol"], Side(d["side"]), d["qty"], OrderType(d["order_type"]),
                           Product(d["product"]), _d(d["price"]), _d(d["trigger_price"]), remarks=d["remarks"])
        return cls(d["id"], req, OrderStatus(d["status"]), d["triggered"], d["filled_qty"], Decimal(d["value"]),
                   d["reason"], [FillReport(f[0], f[1], Decimal(f[2])) for f in d["fills"]])


def _s(v: Optional[Decimal]) -> Optional[str]:
    return None if v is None else str(v)


def _d(v: Optional[str]) -> Optional[Decimal]:
    return None if v is None else Decimal(v)


class MatchingEngine:
    """A thread-safe order book against last traded prices, optionally persisted to SQLite."""

    def __init__(self, path: Optional[Path] = None):
        self._lock = threading.RLock()
        self._orders: dict[str, SimOrder] = {}
        self._by_remarks: dict[str, str] = {}
        self._ltp: dict[tuple[str, str], Decimal] = {}
        self._listeners: list[UpdateListener] = []
        self._seq = 0
        # fault controls for tests
        self.reject_next: Optional[str] = None
        self.delay_next_s: float = 0.0
        self.max_fill_qty: Optional[int] = None
        self._db = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=5)
            self._db = sqlite_utils.Database(conn)  # used only under self._lock
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # survives a killed process, as paper mode needs
            self._db["sim_orders"].create({"id": str, "data": str}, pk="id", if_not_exists=True)
            self._db["sim_ltp"].create({"exchange": str, "symbol": str, "ltp": str},
                                       pk=("exchange", "symbol"), if_not_exists=True)
            self._load()

    def _load(self) -> None:
        for row in self._db["sim_orders"].rows:
            o = SimOrder.from_json(row["data"])
            self._orders[o.broker_order_id] = o
            self._by_remarks[o.req.remarks] = o.broker_order_id
            self._seq = max(self._seq, int(o.broker_order_id[-9:]))
        for row in self._db["sim_ltp"].rows:
            self._ltp[(row["exchange"], row["symbol"])] = Decimal(row["ltp"])

    def _save(self, orders: list[SimOrder], ltp_key: Optional[tuple[str, str]] = None) -> None:
        if self._db is None:
            return
        with self._db.atomic():
            if orders:
                self._db["sim_orders"].upsert_all([{"id": o.broker_order_id, "data": o.to_json()} for o in orders], pk="id")
            if ltp_key is not None:
                self._db["sim_ltp"].upsert({"exchange": ltp_key[0], "symbol": ltp_key[1],
                                            "ltp": str(self._ltp[ltp_key])}, pk=("exchange", "symbol"))

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

    def set_ltp(self, exchange: str, symbol: str, ltp: Decimal) -> list[BrokerOrder]:
        """Move the market; fill whatever the new price crosses."""
        with self._lock:
            key = (exchange, symbol)
            self._ltp[key] = ltp
            touched = [o for o in self._orders.values()
                       if not o.status.terminal and (o.req.exchange, o.req.symbol) == key and self._match(o)]
            self._save(touched, key)
            updates = [o.view() for o in touched]
        self._emit(updates)
        return updates

    # ---- orders ----
    def place(self, req: OrderRequest) -> str:
        """Accept an order and match it at once if the price allows; return the broker order id."""
        if self.delay_next_s:
            delay, self.delay_next_s = self.delay_next_s, 0.0
            time.sleep(delay)
        with self._lock:
            if req.remarks in self._by_remarks:
                raise SimRejected(f"duplicate remarks {req.remarks}")
            if self.reject_next:
                reason, self.reject_next = self.reject_next, None
                raise SimRejected(reason)
            key = (req.exchange, req.symbol)
            if key not in self._ltp:
                # a limit price may stand in for the market; a stop order cannot be judged without one
                if req.order_type is not OrderType.LMT:
                    raise SimRejected(f"no price for {req.exchange}:{req.symbol}: send a tick to "
                                      f"/api/paper/ticks before a {req.order_type.value} order")
                self._ltp[key] = req.price
            self._seq += 1
            oid = time.strftime("%y%m%d") + f"{self._seq:09d}"
            o = SimOrder(oid, req)
            self._orders[oid] = o
            self._by_remarks[req.remarks] = oid
            self._match(o)
            self._save([o], key)
            update = o.view()
        self._emit([update])
        return oid

    def record_rejected(self, req: OrderRequest, reason: str) -> str:
        """Book an order the exchange refused, as a real OMS shows it: an order number, status REJECTED."""
        with self._lock:
            self._seq += 1
            oid = time.strftime("%y%m%d") + f"{self._seq:09d}"
            o = SimOrder(oid, req, OrderStatus.REJECTED, reason=reason)
            self._orders[oid] = o
            self._by_remarks.setdefault(req.remarks, oid)
            self._save([o])
            update = o.view()
        self._emit([update])
        return oid

    def modify(self, broker_order_id: str, qty: int, order_type: OrderType, price: Optional[Decimal],
               trigger_price: Optional[Decimal]) -> BrokerOrder:
        """Change a working order's quantity and prices; it is matched again at once."""
        from dataclasses import replace as _replace
        with self._lock:
            o = self._working(broker_order_id)
            if qty < o.filled_qty or qty <= 0:
                raise SimRejected(f"quantity {qty} is below the {o.filled_qty} already filled")
            o.req = _replace(o.req, qty=qty, order_type=order_type, price=price, trigger_price=trigger_price)
            self._match(o)
            self._save([o])
            update = o.view()
        self._emit([update])
        return update

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

    def order_book(self) -> list[BrokerOrder]:
        with self._lock:
            return [o.view() for o in self._orders.values()]

    def find(self, remarks: str) -> Optional[BrokerOrder]:
        with self._lock:
            oid = self._by_remarks.get(remarks)
            return self._orders[oid].view() if oid else None

    def positions(self) -> dict[tuple[str, str, str], PositionMath]:
        """Account-level net positions from every fill (the broker's truth)."""
        with self._lock:
            out: dict[tuple[str, str, str], PositionMath] = {}
            for o in self._orders.values():
                key = (o.req.exchange, o.req.symbol, o.req.product.value)
                for f in o.fills:
                    out[key] = out.get(key, PositionMath()).apply(o.req.side, f.qty, f.price)
            return out

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
