"""Trades made outside the host (the trader in the broker's app, the broker's square-off): whose position
they changed.

Ownership is never re-assigned by arithmetic. An outside fill first reduces the positions it closes,
the `manual` pseudo-strategy's first, then the strategies' (largest first), each of which gets a
`closed_outside` event; only exposure that no strategy held becomes `manual`. Each fill is applied
once (by the broker's order and fill ids), from the broker's order and trade books.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timezone
from decimal import Decimal
from typing import Callable, Iterable, Optional

import sqlite_utils

from .brokers.base import SessionExpired
from .flatten import MANUAL, OPEN_STATUSES, closing_room, exits_now
from .ids import new_id
from .market import IST
from .models import BrokerOrder, BrokerView, Product, Side
from .storage import Storage, utcnow
from .watcher import move_position

log = logging.getLogger(__name__)

PRODUCTS = {p.value for p in Product}
READS_FOR_EXITS = 3  # reads of the books before an exit is capped, while a fill falls between two of them
READS_BUDGET_S = 2.0  # no further read begins after this long: a slow broker's exits are capped on the last one


def allocate(db: sqlite_utils.Database, exchange: str, symbol: str, product: str, side: Side, qty: int,
             price: Decimal, source: str) -> list[tuple[str, int]]:
    """Apply an outside trade of `qty` on `side`: close what it closes, the rest is `manual`; the split."""
    closing = "net_qty > 0" if side is Side.SELL else "net_qty < 0"
    holders = list(db.query(f"select strategy, net_qty from positions where exchange = ? and symbol = ? and "
                            f"product = ? and {closing} order by strategy != ?, abs(net_qty) desc, strategy",
                            (exchange, symbol, product, MANUAL)))
    split: list[tuple[str, int]] = []
    left = qty
    for h in holders:
        if not left:
            break
        take = min(left, abs(h["net_qty"]))
        split.append((h["strategy"], take))
        left -= take
    if left:
        split.append((MANUAL, left))
    where = f"{exchange}:{symbol} ({product})"
    for strategy, n in split:
        move_position(db, (strategy, exchange, symbol, product), side, n, price)
        if strategy == MANUAL:
            Storage.add_event(db, "manual_trade", f"{side.value} {n} {where} @ {price} {source} belongs to no "
                              f"strategy: counted in the PnL as strategy 'manual'", "warning", MANUAL,
                              {"qty": side.sign * n, "price": str(price)})
        else:
            Storage.add_event(db, "closed_outside", f"{side.value} {n} {where} @ {price} {source} closed part of "
                              f"strategy {strategy}'s position: its position shrinks by {n}", "warning", strategy,
                              {"qty": side.sign * n, "price": str(price), "strategy": strategy})
    return split


def foreign_fills(book: Iterable[BrokerOrder], ours: set[str]) -> list[tuple[BrokerOrder, str, int, Decimal]]:
    """(order, fill key, qty, price) of every fill in the book whose order carries none of our ids."""
    out = []
    for o in book:
        if o.remarks in ours:
            continue
        for f in o.fills:
            out.append((o, f"{o.broker_order_id}:{f.fill_id}", f.qty, f.price))
    return out


def _today_from() -> str:
    """The start of today's trading day (Asia/Kolkata) as a stored timestamp: the broker's books are the day's."""
    start = datetime.now(IST).replace(hour=0, minute=0, second=0, microsecond=0)
    return start.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def _counted_before(db: sqlite_utils.Database, order: BrokerOrder, qty: int) -> int:
    """How much of `qty` today's differences found in the positions (same instrument and side) have counted
    already; that much is taken off what they have left."""
    counted = 0
    if qty <= 0:
        return 0
    for row in list(db.query("select fill_id, unexplained_left from outside_fills where exchange = ? and symbol = ? "
                             "and product = ? and side = ? and unexplained_left > 0 and at >= ? order by at",
                             (order.exchange, order.symbol, order.product, order.side.value, _today_from()))):
        take = min(qty - counted, row["unexplained_left"])
        db.execute("update outside_fills set unexplained_left = unexplained_left - ? where fill_id = ?",
                   (take, row["fill_id"]))
        counted += take
        if counted == qty:
            break
    return counted


def _seen(db: sqlite_utils.Database, key: str) -> bool:
    """This outside fill has been applied (or recorded as not counted) before."""
    return db.execute("select 1 from outside_fills where fill_id = ?", (key,)).fetchone() is not None


def _left(db: sqlite_utils.Database, key: tuple) -> int:
    """How much of today's differences counted from the positions in one instrument no fill has matched yet."""
    return db.execute("select coalesce(sum(unexplained_left), 0) from outside_fills where exchange = ? and symbol = ? "
                      "and product = ? and unexplained_left > 0 and at >= ?", (*key, _today_from())).fetchone()[0]


def _surplus(db: sqlite_utils.Database, key: tuple, fills: list[tuple[BrokerOrder, str, int, Decimal]],
             broker_net: int) -> dict[Side, int]:
    """Per side, how much of one instrument's new fills the host has counted already (from the positions, before
    the books showed them): as far as counting them all would take the host's net past the broker's. A trade
    made after that difference moved the broker's net too, and is counted in full."""
    buys = sum(q for o, _, q, _ in fills if o.side is Side.BUY)
    sells = sum(q for o, _, q, _ in fills if o.side is Side.SELL)
    mine = db.execute("select coalesce(sum(net_qty), 0) from positions where exchange = ? and symbol = ? and "
                      "product = ?", key).fetchone()[0]
    excess = mine + buys - sells - broker_net
    return {Side.BUY: max(0, min(buys, excess)), Side.SELL: max(0, min(sells, -excess))}


def adopt_fill(db: sqlite_utils.Database, order: BrokerOrder, key: str, qty: int, price: Decimal,
               surplus: Optional[dict[Side, int]] = None) -> Optional[list]:
    """Apply one outside fill, once; the split, or None if it was seen before. Of the `surplus` (_surplus), what
    today's differences in the positions counted already is not counted again."""
    if _seen(db, key):
        return None
    usable = order.exchange and order.symbol and order.side is not None and order.product in PRODUCTS
    counted = _counted_before(db, order, min(qty, surplus.get(order.side, 0))) if usable and surplus else 0
    if counted:
        surplus[order.side] -= counted
    if counted:
        where = f"{order.exchange}:{order.symbol} ({order.product})"
        Storage.add_event(db, "outside_fill_counted", f"{order.side.value} {counted} {where} @ {price} by broker "
                          f"order {order.broker_order_id} (placed outside the host) was counted already, from the "
                          f"broker's positions before its order book showed it: not counted again", "info", None,
                          {"broker_order_id": order.broker_order_id, "qty": counted, "price": str(price)})
    split = allocate(db, order.exchange, order.symbol, order.product, order.side, qty - counted, price,
                     f"by broker order {order.broker_order_id} (placed outside the host)") \
        if usable and qty > counted else []
    db["outside_fills"].insert({
        "fill_id": key, "broker_order_id": order.broker_order_id, "exchange": order.exchange, "symbol": order.symbol,
        "product": order.product, "side": order.side.value if order.side else None, "qty": qty, "price": str(price),
        "at": utcnow(), "allocation": json.dumps(split if usable else f"not counted: product {order.product!r}")})
    return split


def _count_unexplained(db: sqlite_utils.Database, ex: str, sym: str, prod: str, side: Side, qty: int, price: Decimal,
                       basis: str) -> None:
    """Count a difference no order in today's books explains, and keep it: the order's fill, if the books show
    it later, is then not counted a second time (_counted_before)."""
    split = allocate(db, ex, sym, prod, side, qty, price, f"found in the broker's positions (no order in today's "
                     f"books explains it; priced at {basis}, no fill price is known)")
    now = utcnow()
    db["outside_fills"].insert({"fill_id": f"positions:{ex}:{sym}:{prod}:{now}:{new_id('u')}", "broker_order_id": None,
                                "exchange": ex, "symbol": sym, "product": prod, "side": side.value, "qty": qty,
                                "price": str(price), "at": now, "allocation": json.dumps(split),
                                "unexplained_left": qty})


class OutsideTrades:
    """Polls the broker's positions and books; applies what was traded outside the host."""

    def __init__(self, storage: Storage, positions: Callable[[], list], book: Callable[[], list[BrokerOrder]]):
        self.storage = storage
        self.broker_positions = positions
        self.broker_book = book
        self.blind: Optional[str] = None
        self.broker_net: dict[tuple, int] = {}  # the broker's net per (exchange, symbol, product), last poll
        self._manual_seen: dict[tuple, int] = {}
        self._proposed: dict[tuple, tuple] = {}  # fills taken as counted already, as the last read proposed it
        self._book: Optional[list[BrokerOrder]] = None  # the order book of the last poll
        self.unsure = False  # a difference or a fill waits for the next read to be confirmed: read again soon
        self._lock = threading.Lock()  # the risk thread and the engine (before an EXIT) both poll

    def poll(self) -> bool:
        """Read positions (unreadable: blind, never "flat") and books; True if anything was adopted."""
        with self._lock:
            return self._poll()

    def read_for_exits(self) -> Optional[BrokerView]:
        """The order book, a poll (the positions, then the book again): what caps exits (flatten.closing_room).
        Read again, up to READS_FOR_EXITS times, while an exit of ours filled between the reads. None while blind."""
        with self._lock:
            view = None
            began = time.monotonic()
            for _ in range(READS_FOR_EXITS):
                if view is not None and time.monotonic() - began >= READS_BUDGET_S:
                    log.warning("exits capped on a read the books could not settle: the broker answered slowly "
                                "(%.1f s), so the books are not read again", time.monotonic() - began)
                    break
                mark, exits_then = self.storage.read(exits_now)  # before the books: what the host did since is seen
                try:
                    before: Optional[list[BrokerOrder]] = self.broker_book()
                except Exception as e:  # our own rows then say what is working: counted in full
                    log.warning("exits capped by our own orders: the broker's order book is unreadable (%s)", e)
                    before = None
                self._poll()
                if self.blind:
                    return None
                view = BrokerView(dict(self.broker_net), before, self._book, mark, exits_then)
                if before is None or self._book is None or not self.storage.read(
                        lambda db: closing_room(db, view).unsure):  # type: ignore[union-attr]
                    break
            return view

    def _poll(self) -> bool:
        try:
            positions = self.broker_positions()
        except Exception as e:  # an expired session is said once by broker_session, with the login link
            self.blind = "no valid broker session" if isinstance(e, SessionExpired) else f"{type(e).__name__}: {e}"
            return False
        self.blind = None
        self.broker_net = {(p.exchange, p.symbol, p.product.value): p.net_qty for p in positions}
        try:
            book: Optional[list[BrokerOrder]] = self.broker_book()
        except Exception as e:  # without the books no outside trade can be told from our own: adopt nothing
            log.warning("outside trades not checked: the broker's books are unreadable (%s)", e)
            book = None
        self._book = book
        return self.adopt(book, positions)

    def adopt(self, book: Optional[list[BrokerOrder]], broker_positions: list) -> bool:
        """Apply fills of orders placed outside the host; then count what still differs, if nothing explains it.

        An unexplained difference must be seen on two polls in a row, and is ignored where one of our orders
        may have fills the host has not applied yet (_unsettled), or an outside order is still working or its
        fills wait. An outside fill some of which the positions counted already (_surplus) is taken so only
        when two reads in a row agree, and not while our own fills in that instrument are unsettled.
        """
        if book is None:
            self._manual_seen = {}
            return False
        moved = False
        remarks = list({o.remarks for o in book if o.remarks})
        ours: set[str] = set()
        for i in range(0, len(remarks), 500):
            chunk = remarks[i:i + 500]
            ours |= {r["id"] for r in self.storage.rows(
                f"select id from orders where id in ({','.join('?' * len(chunk))})", tuple(chunk))}
        net = {(p.exchange, p.symbol, p.product.value): p.net_qty for p in broker_positions}
        unsettled = self._unsettled(book)
        fills = foreign_fills(book, ours)
        pending: set[tuple] = set()  # instruments whose new outside fills wait for a later poll
        if fills:
            proposed: dict[tuple, tuple] = {}

            def run(db: sqlite_utils.Database) -> list:
                proposed.clear()
                pending.clear()
                fresh: dict[tuple, list] = {}
                out = []
                for f in fills:
                    o = f[0]
                    if o.side is None or not (o.exchange and o.symbol) or o.product not in PRODUCTS:
                        out.append(adopt_fill(db, *f))  # recorded as not counted
                    elif not _seen(db, f[1]):
                        fresh.setdefault((o.exchange, o.symbol, o.product), []).append(f)
                for key, group in fresh.items():
                    if not _left(db, key):
                        out += [adopt_fill(db, *f) for f in group]
                        continue
                    if key in unsettled:  # our own fills are not all applied: the host's net is not the truth yet
                        pending.add(key)
                        continue
                    surplus = _surplus(db, key, group, net.get(key, 0))
                    proposal = (surplus[Side.BUY], surplus[Side.SELL])  # new fills may come meanwhile: the amounts
                    if any(surplus.values()) and self._proposed.get(key) != proposal:
                        proposed[key] = proposal  # only what two reads in a row agree on is taken as counted
                        pending.add(key)
                        continue
                    out += [adopt_fill(db, *f, surplus=surplus) for f in group]
                return out
            adopted = self.storage.write(run)
            self._proposed = dict(proposed)
            moved = any(a is not None for a in adopted)
        else:
            self._proposed = {}
        explained = pending | self._fills_to_come(book, ours)
        mine: dict[tuple, int] = {}
        for r in self.storage.rows("select exchange, symbol, product, sum(net_qty) n from positions "
                                   "group by exchange, symbol, product"):
            mine[(r["exchange"], r["symbol"], r["product"])] = r["n"]
        theirs = {(p.exchange, p.symbol, p.product.value): p for p in broker_positions}
        diffs = {}
        for key in (set(mine) | set(theirs)) - explained - unsettled:
            diff = (theirs[key].net_qty if key in theirs else 0) - mine.get(key, 0)
            if diff:
                diffs[key] = diff
        confirmed = {k: d for k, d in diffs.items() if self._manual_seen.get(k) == d}
        self._manual_seen = {k: d for k, d in diffs.items() if k not in confirmed}
        self.unsure = bool(self._manual_seen or pending)
        for (ex, sym, prod), diff in confirmed.items():
            bp = theirs.get((ex, sym, prod))
            price, basis = self._unexplained_price(ex, sym, prod, bp)
            side = Side.BUY if diff > 0 else Side.SELL
            self.storage.write(lambda db: _count_unexplained(db, ex, sym, prod, side, abs(diff), price, basis))
            moved = True
        return moved

    def _fills_to_come(self, book: list[BrokerOrder], ours: set[str]) -> set[tuple]:
        """Instruments where an outside order shows more filled than its fills counted so far (the trade book
        lags the order book): what differs there is likely those fills. A resting order with nothing filled, or
        one whose fills are all counted, explains nothing."""
        outside = [o for o in book if o.remarks not in ours and o.filled_qty > 0]
        if not outside:
            return set()
        counted: dict[str, int] = {}
        for i in range(0, len(outside), 500):
            chunk = [o.broker_order_id for o in outside[i:i + 500]]
            for r in self.storage.rows(f"select broker_order_id, sum(qty) n from outside_fills where broker_order_id "
                                       f"in ({','.join('?' * len(chunk))}) group by broker_order_id", tuple(chunk)):
                counted[r["broker_order_id"]] = r["n"]
        return {(o.exchange, o.symbol, o.product) for o in outside if o.filled_qty > counted.get(o.broker_order_id, 0)}

    def _unsettled(self, book: list[BrokerOrder]) -> set[tuple]:
        """Instruments where one of our unfinished orders may have fills the host has not applied yet: the book
        shows more filled than we applied, or does not show the order at all (sent, not booked yet)."""
        filled = {o.remarks: o.filled_qty for o in book if o.remarks}
        rows = self.storage.rows(f"select id, exchange, symbol, product, applied_qty from orders where status in "
                                 f"({','.join('?' * len(OPEN_STATUSES))})", OPEN_STATUSES)
        return {(r["exchange"], r["symbol"], r["product"]) for r in rows
                if filled.get(r["id"]) is None or filled[r["id"]] != (r["applied_qty"] or 0)}

    def _unexplained_price(self, ex: str, sym: str, prod: str, bp) -> tuple[Decimal, str]:
        """A price for a change no fill explains, and where it came from: never 0 while anything is known."""
        quote = self.storage.one("select ltp from quotes where exchange = ? and symbol = ?", (ex, sym))
        if quote and quote["ltp"] not in (None, "") and Decimal(quote["ltp"]) > 0:
            return Decimal(quote["ltp"]), "the last traded price"
        if bp is not None and bp.avg_price:
            return bp.avg_price, "the broker's average price"
        own = [(abs(r["net_qty"]), Decimal(r["avg_price"])) for r in self.storage.rows(
            "select net_qty, avg_price from positions where exchange = ? and symbol = ? and product = ? and "
            "net_qty != 0 and avg_price is not null and avg_price != ''", (ex, sym, prod))]
        qty = sum(n for n, _ in own)
        if qty:
            return (sum(n * p for n, p in own) / qty).quantize(Decimal("0.01")), "the position's own average price"
        return Decimal("0"), "0: no price is known for it"
