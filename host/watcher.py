"""Order watcher: applies broker updates (fills, partials, rejections, cancels) and reconciles."""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Iterable, Optional

import sqlite_utils

from .models import BrokerOrder, OrderStatus, Side
from .orders import _order_row, transition
from .positions import PositionMath
from .storage import Storage, dec, utcnow

log = logging.getLogger(__name__)
UNFINISHED = (OrderStatus.SUBMITTED.value, OrderStatus.UNKNOWN.value, OrderStatus.OPEN.value, OrderStatus.PARTIAL.value)
EVENT_FOR = {OrderStatus.FILLED: ("order_filled", "info"), OrderStatus.PARTIAL: ("order_partial", "info"),
             OrderStatus.REJECTED: ("order_rejected", "warning"), OrderStatus.CANCELLED: ("order_cancelled", "info")}


def apply_update(db: sqlite_utils.Database, update: BrokerOrder) -> Optional[dict]:
    """Apply one broker view of an order to ours (idempotent); the order's new row if anything changed."""
    order = _order_row(db, update.remarks)
    if order is None:
        return None
    filled = False
    for fill in update.fills:
        if db.execute("select 1 from fills where fill_id = ?", (fill.fill_id,)).fetchone():
            continue
        Storage.insert(db, "fills", {"fill_id": fill.fill_id, "order_id": order["id"], "qty": fill.qty,
                                     "price": str(fill.price), "at": utcnow()})
        _apply_fill(db, order, fill.qty, fill.price)
        filled = True
    # updates can arrive out of order (feed and book): an older one never lowers the fill count;
    # transition() keeps the status from moving back
    newer = update.filled_qty >= (order["filled_qty"] or 0)
    changed = transition(db, order["id"], update.status, update.reason,
                         filled_qty=update.filled_qty if newer else None, avg_price=update.avg_price if newer else None,
                         broker_order_id=update.broker_order_id, reason=update.reason)
    if changed and update.status in EVENT_FOR:
        kind, severity = EVENT_FOR[update.status]
        now = _order_row(db, order["id"])
        words = {OrderStatus.FILLED: f"filled {now['filled_qty']} @ {now['avg_price']}",
                 OrderStatus.PARTIAL: f"partially filled {now['filled_qty']}/{order['qty']} @ {now['avg_price']}",
                 OrderStatus.REJECTED: f"rejected by the broker: {update.reason}",
                 OrderStatus.CANCELLED: f"cancelled: {update.reason}"}[update.status]
        Storage.add_event(db, kind, f"{order['side']} {order['qty']} {order['exchange']}:{order['symbol']} "
                          f"({order['strategy']}, order {order['id']}) {words}", severity, order["strategy"],
                          {"order_id": order["id"], "broker_order_id": update.broker_order_id,
                           "version": order["strategy_version"]})
    return _order_row(db, order["id"]) if changed or filled else None


def _apply_fill(db: sqlite_utils.Database, order: dict, qty: int, price: Decimal) -> None:
    _move_position(db, (order["strategy"], order["exchange"], order["symbol"], order["product"]),
                   Side(order["side"]), qty, price)


def apply_manual(db: sqlite_utils.Database, exchange: str, symbol: str, product: str, qty: int, price: Decimal) -> None:
    """Count a position found at the broker that no strategy owns under the pseudo-strategy `manual`."""
    _move_position(db, ("manual", exchange, symbol, product), Side.BUY if qty > 0 else Side.SELL, abs(qty), price)


def _move_position(db: sqlite_utils.Database, key: tuple, side: Side, qty: int, price: Decimal) -> None:
    rows = list(db.query("select * from positions where strategy = ? and exchange = ? and symbol = ? and product = ?", key))
    pos = PositionMath(rows[0]["net_qty"], dec(rows[0]["avg_price"]), dec(rows[0]["realized_pnl"])) if rows else PositionMath()
    pos = pos.apply(side, qty, price)
    Storage.insert(db, "positions", {"strategy": key[0], "exchange": key[1], "symbol": key[2], "product": key[3],
                                     "net_qty": pos.net_qty, "avg_price": str(pos.avg_price),
                                     "realized_pnl": str(pos.realized_pnl), "updated_at": utcnow()},
                   upsert_pk=("strategy", "exchange", "symbol", "product"))


class Watcher:
    """Keeps our orders and positions in step with the broker."""

    def __init__(self, storage: Storage, unknown_grace_s: float = 30.0):
        self.storage = storage
        self.unknown_grace_s = unknown_grace_s
        self._foreign: set[str] = set()  # broker orders already reported as manual

    def apply(self, updates: Iterable[BrokerOrder]) -> list[dict]:
        """Apply broker updates in one transaction; return the rows of our orders that changed."""
        updates = list(updates)
        if not updates:
            return []
        def run(db: sqlite_utils.Database) -> list[dict]:
            changed = []
            for u in updates:
                row = apply_update(db, u)
                if row is not None:
                    changed.append(row)
                elif u.broker_order_id not in self._foreign and _order_row(db, u.remarks) is None:
                    self._foreign.add(u.broker_order_id)
                    Storage.add_event(db, "manual_order", f"broker order {u.broker_order_id} ({u.status.value}, "
                                      f"remarks {u.remarks!r}) was not placed by this host: it is counted as a manual "
                                      f"trade", "warning", "manual", {"broker_order_id": u.broker_order_id})
            return changed
        return self.storage.write(run)

    def reconcile(self, book: list[BrokerOrder], in_flight: set[str], startup: bool = False,
                  resend_max_age_s: float = 0) -> list[str]:
        """Match every unfinished order of ours with the broker's book, by our id in remarks.

        While running, an order sent but still missing after the grace period is rejected, never
        resent: a timeout may mean the broker is slow, and a resend could trade twice. At start-up
        nothing of ours is in flight any more, so an order the book has never seen was never
        placed: its id is returned to be sent now, if it is younger than resend_max_age_s.
        """
        by_remarks = {o.remarks: o for o in book}
        now = datetime.now(timezone.utc)
        cutoff = (now - timedelta(seconds=self.unknown_grace_s)).isoformat(timespec="milliseconds")
        too_old = (now - timedelta(seconds=resend_max_age_s)).isoformat(timespec="milliseconds")
        statuses = (OrderStatus.NEW.value, *UNFINISHED) if startup else UNFINISHED

        def lose(db: sqlite_utils.Database, order: dict, reason: str) -> None:
            if transition(db, order["id"], OrderStatus.REJECTED, reason, reason=reason):
                Storage.add_event(db, "order_lost", f"order {order['id']}: {reason}", "error",
                                  order["strategy"], {"order_id": order["id"]})

        def run(db: sqlite_utils.Database) -> list[str]:
            unsent = []
            marks = ",".join("?" * len(statuses))
            for order in list(db.query(f"select * from orders where status in ({marks}) order by rowid", statuses)):
                if order["id"] in in_flight:
                    continue
                found = by_remarks.get(order["id"])
                if found is not None:
                    apply_update(db, found)
                elif order["status"] in ("OPEN", "PARTIAL"):
                    continue
                elif startup and order["created_at"] >= too_old:
                    unsent.append(order["id"])
                elif startup:
                    lose(db, order, f"never reached the broker before the host stopped, and is older than "
                                    f"ALERT_MAX_AGE_S={resend_max_age_s:g} s; not sent late")
                elif order["status"] != OrderStatus.NEW.value and order["updated_at"] < cutoff:
                    lose(db, order, f"not found in the broker's order book {self.unknown_grace_s:g} s after it "
                                    f"was sent; not resent — check the broker terminal")
            return unsent
        return self.storage.write(run, durable=True)
