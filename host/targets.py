"""Position-target alerts: bring a strategy's own position in a symbol to a signed target.

Only the difference is sent. A reduction goes out as an EXIT (allowed while reduce-only or halted);
an addition as an ADJUST (an entry to risk). A reversal exits first and enters only after the exit
has filled: that half waits in `position_targets` and is planned again from the book then.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import sqlite_utils

from .guard import StrategyBook
from .models import ExecutionType, Intent, OrderStatus, OrderType, Product, Side, TargetLeg
from .storage import dec, utcnow

WAITING = "waiting"


@dataclass(frozen=True)
class TargetPlan:
    """What one target needs now, whether the rest must wait, and the words for the trail."""

    intents: tuple[Intent, ...]
    wait: bool
    note: str


def _signed(n: int) -> str:
    return f"{n:+d}" if n else "flat"


def plan(book: StrategyBook, leg: TargetLeg) -> TargetPlan:
    """The orders that take the strategy's position (filled, plus orders still working) to the target."""
    key = (leg.exchange, leg.symbol, leg.product)
    where = f"{leg.exchange}:{leg.symbol}"
    net = book.net(*key)
    working = [o for o in book.open_orders if (o.exchange, o.symbol, o.product) == key]
    projected = net + sum(o.side.sign * o.remaining for o in working)
    if projected == leg.target:
        pending = f" ({_signed(net)} filled, {_signed(projected - net)} working)" if working else ""
        return TargetPlan((), False, f"{where}: already at target {_signed(leg.target)}{pending}; nothing sent")
    delta = leg.target - projected
    side = Side.BUY if delta > 0 else Side.SELL
    reduce = min(abs(delta), abs(projected)) if projected and (projected > 0) != (delta > 0) else 0
    add = abs(delta) - reduce
    intents: list[Intent] = []
    words = [f"{where}: from {_signed(projected)} to {_signed(leg.target)}"]

    def intent(qty: int, action: ExecutionType) -> Intent:
        return Intent(leg.exchange, leg.symbol, side, qty, leg.order_type, leg.product, leg.price, action=action)
    if reduce:
        intents.append(intent(reduce, ExecutionType.EXIT))
        words.append(f"exit {reduce} now")
    wait = False
    if add:
        crossing = reduce or (net and (net > 0) != (delta > 0)) or any(o.side is not side for o in working)
        if crossing:
            wait = True
            words.append(f"the entry of {add} {side.value} is sent once the exit has filled")
        else:
            intents.append(intent(add, ExecutionType.ADJUST))
            words.append(f"{'enter' if not projected else 'add'} {add} {side.value}")
    return TargetPlan(tuple(intents), wait, "; ".join(words))


def supersede(db: sqlite_utils.Database, strategy: str, symbols: set[tuple[str, str]], by_alert: str) -> int:
    """Newer alerts win: waiting targets of this strategy in these symbols are dropped."""
    n = 0
    for ex, sym in symbols:
        n += db.execute("update position_targets set status = 'superseded', reason = ?, decided_at = ? where "
                        "status = ? and strategy = ? and exchange = ? and symbol = ?",
                        (f"superseded by alert {by_alert}", utcnow(), WAITING, strategy, ex, sym)).rowcount
    return n


def store_waiting(db: sqlite_utils.Database, alert_id: str, strategy: str, leg: TargetLeg, after: list[str]) -> None:
    db["position_targets"].insert({
        "alert_id": alert_id, "strategy": strategy, "exchange": leg.exchange, "symbol": leg.symbol,
        "product": leg.product.value, "order_type": leg.order_type.value,
        "price": None if leg.price is None else str(leg.price), "target": leg.target, "after": json.dumps(after),
        "status": WAITING, "created_at": utcnow()})


def leg_of(row: dict) -> TargetLeg:
    """A stored waiting target (a row of position_targets, or an alert's stored target) as a TargetLeg."""
    return TargetLeg(row["exchange"], row["symbol"], Product(row["product"]), OrderType(row["order_type"]),
                     row["target"], dec(row["price"]))


def blocking(db: sqlite_utils.Database, row: dict) -> tuple[bool, Optional[str]]:
    """(still waiting, why it cannot go on): the exits it waits for, unfinished or not filled."""
    ids = json.loads(row["after"] or "[]")
    if ids:
        marks = ",".join("?" * len(ids))
        orders = list(db.query(f"select id, status, reason, filled_qty, qty from orders where id in ({marks})", ids))
        if any(not OrderStatus(o["status"]).terminal for o in orders):
            return True, None
        failed = [o for o in orders if o["status"] != OrderStatus.FILLED.value]
        if failed:
            o = failed[0]
            return False, (f"the exit {o['id']} ended {o['status']} ({o['filled_qty']} of {o['qty']} filled"
                           f"{': ' + o['reason'] if o['reason'] else ''}): the entry was not sent")
    return False, None


def matching_orders(db: sqlite_utils.Database, order_ids: tuple[str, ...], leg: TargetLeg) -> list[str]:
    """The ids among order_ids that trade the leg's symbol and product."""
    if not order_ids:
        return []
    marks = ",".join("?" * len(order_ids))
    return [r["id"] for r in db.query(f"select id from orders where id in ({marks}) and exchange = ? and symbol = ? "
                                      f"and product = ?", (*order_ids, leg.exchange, leg.symbol, leg.product.value))]
