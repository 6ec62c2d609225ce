"""Trades made outside the host (the trader in the broker's app, the broker's square-off): whose position
they changed.

Ownership is never re-assigned by arithmetic. An outside fill first reduces the positions it closes,
the `manual` pseudo-strategy's first, then the strategies' (largest first), each of which gets a
`closed_outside` event; only exposure that no strategy held becomes `manual`. Each fill is applied
once (by the broker's order and fill ids), from the broker's order and trade books.
"""
from __future__ import annotations

import json
from decimal import Decimal
from typing import Iterable, Optional

import sqlite_utils

from .models import BrokerOrder, Product, Side
from .storage import Storage, utcnow
from .watcher import move_position

PRODUCTS = {p.value for p in Product}
MANUAL = "manual"


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


def adopt_fill(db: sqlite_utils.Database, order: BrokerOrder, key: str, qty: int, price: Decimal) -> Optional[list]:
    """Apply one outside fill, once; the split, or None if it was seen before."""
    if db.execute("select 1 from outside_fills where fill_id = ?", (key,)).fetchone():
        return None
    usable = order.exchange and order.symbol and order.side is not None and order.product in PRODUCTS
    split = allocate(db, order.exchange, order.symbol, order.product, order.side, qty, price,
                     f"by broker order {order.broker_order_id} (placed outside the host)") if usable else []
    db["outside_fills"].insert({
        "fill_id": key, "broker_order_id": order.broker_order_id, "exchange": order.exchange, "symbol": order.symbol,
        "product": order.product, "side": order.side.value if order.side else None, "qty": qty, "price": str(price),
        "at": utcnow(), "allocation": json.dumps(split if usable else f"not counted: product {order.product!r}")})
    return split
