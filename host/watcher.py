"""Order watcher: applies broker updates (fills, partials, rejections, cancels) and reconciles."""
from __future__ import annotations

import logging
import time
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Iterable, Optional

import sqlite_utils

from .market import IST
from .models import BrokerOrder, ExecutionType, OrderStatus, Side
from .orders import _order_row, advance, transition
from .positions import PositionMath
from .pricing import tidy
from .storage import Storage, dec, utcnow

log = logging.getLogger(__name__)
UNFINISHED = (OrderStatus.SUBMITTED.value, OrderStatus.UNKNOWN.value, OrderStatus.OPEN.value, OrderStatus.PARTIAL.value)
EVENT_FOR = {OrderStatus.FILLED: ("order_filled", "info"), OrderStatus.PARTIAL: ("order_partial", "info"),
             OrderStatus.REJECTED: ("order_rejected", "warning"), OrderStatus.CANCELLED: ("order_cancelled", "info")}


def apply_update(db: sqlite_utils.Database, update: BrokerOrder) -> Optional[dict]:
    """Apply one broker view of an order to ours (idempotent); the order's new row if anything changed.

    Positions follow the order's cumulative fill, not the fill messages: a fill message that was
    lost is made up from the broker's totals, and one seen twice counts once.
    """
    order = _order_row(db, update.remarks)
    if order is None:
        return None
    for fill in update.fills:
        db.execute("insert or ignore into fills (fill_id, order_id, qty, price, at) values (?, ?, ?, ?, ?)",
                   (fill.fill_id, order["id"], fill.qty, str(fill.price), utcnow()))
    row = dict(order)  # kept in step with what is written below; `order` stays as the update found it
    filled = _apply_cumulative(db, row, update)
    # the count the position now follows: the broker's total, or its fills if more of them came in
    count, price = _filled(order, row, update)
    # updates can arrive out of order (feed and book): an older one never lowers the fill count;
    # advance() keeps the status from moving back
    newer = count >= (order["filled_qty"] or 0)
    reason = _reason(order, update)  # the order's history keeps the broker's own words (the detail)
    changed = advance(db, row, update.status, update.reason,
                      filled_qty=count if newer else None, avg_price=price if newer else None,
                      broker_order_id=update.broker_order_id, reason=reason) is not None
    ended = not changed and OrderStatus(order["status"]).terminal
    late = ended and count > (order["filled_qty"] or 0)
    if late:
        _late_fill(db, row, count, price)
    elif ended and count == (order["filled_qty"] or 0) and price is not None and price != dec(order["avg_price"]):
        _repriced(db, row, price)  # the broker's own average for the count it reported: it has the last word
    if changed and update.status in EVENT_FOR:
        kind, severity = EVENT_FOR[update.status]
        words = {OrderStatus.FILLED: f"filled {row['filled_qty']} @ {row['avg_price']}",
                 OrderStatus.PARTIAL: f"partially filled {row['filled_qty']}/{order['qty']} @ {row['avg_price']}",
                 OrderStatus.REJECTED: f"rejected by the broker: {update.reason}",
                 OrderStatus.CANCELLED: f"cancelled: {reason}"}[update.status]
        Storage.add_event(db, kind, f"{order['side']} {order['qty']} {order['exchange']}:{order['symbol']} "
                          f"({order['strategy']}, order {order['id']}) {words}", severity, order["strategy"],
                          {"order_id": order["id"], "broker_order_id": update.broker_order_id,
                           "version": order["strategy_version"]})
    if changed and OrderStatus(order["status"]) is OrderStatus.LOST:
        Storage.add_event(db, "order_found", f"order {order['id']}, marked LOST, is at the broker after all "
                          f"({update.status.value}, {update.filled_qty} filled)", "warning", order["strategy"],
                          {"order_id": order["id"], "broker_order_id": update.broker_order_id})
    return row if changed or filled or late else None


def _filled(order: dict, row: dict, update: BrokerOrder) -> tuple[int, Optional[Decimal]]:
    """The order's fill count and average price after this update: the broker's, unless the fills applied to
    the position (a trade book ahead of a row without its count) show more than it and than the order knew."""
    applied = row["applied_qty"] or 0
    broker = min(update.filled_qty, order["qty"])  # a count above the quantity is never the order's
    value = dec(row["applied_value"])
    if applied <= max(broker, order["filled_qty"] or 0) or value is None:
        return broker, update.avg_price
    return applied, tidy(value / applied)


def _late_fill(db: sqlite_utils.Database, row: dict, count: int, price: Optional[Decimal]) -> None:
    """A fill reported after the order ended (a cancel seen before its fill): counted, the status kept.

    Louder for a stop or an exit: the position it leaves is one nobody asked for."""
    before = row["filled_qty"] or 0
    row.update(filled_qty=count, updated_at=utcnow(), avg_price=str(price) if price is not None else row["avg_price"])
    db.execute("update orders set filled_qty = ?, avg_price = ?, updated_at = ? where id = ?",
               (count, row["avg_price"], row["updated_at"], row["id"]))
    Storage.insert(db, "order_history", {"order_id": row["id"], "at": row["updated_at"], "status": row["status"],
                                         "detail": f"late fill: filled {count} (was {before}) after it was "
                                                   f"{row['status']}"})
    at = f"@ {price}" if price is not None else "(the broker gave no average price)"
    exit_like = bool(row["protection"]) or row["action"] == ExecutionType.EXIT.value
    Storage.add_event(db, "order_late_fill", f"{row['side']} {row['qty']} {row['exchange']}:{row['symbol']} "
                      f"({row['strategy']}, order {row['id']}) was {row['status']} with {before} filled, but the broker "
                      f"reports {count} filled {at}: the position counts them"
                      + ("; this stop or exit filled after it ended: check the position" if exit_like else ""),
                      "error" if exit_like else "warning", row["strategy"],
                      {"order_id": row["id"], "filled_qty": count, "was": before})


def _repriced(db: sqlite_utils.Database, row: dict, price: Decimal) -> None:
    """A finished order's average price as the broker gives it for the same count (it was missing or a guess)."""
    row.update(avg_price=str(price), updated_at=utcnow())
    db.execute("update orders set avg_price = ?, updated_at = ? where id = ?", (row["avg_price"], row["updated_at"],
                                                                                row["id"]))
    Storage.insert(db, "order_history", {"order_id": row["id"], "at": row["updated_at"], "status": row["status"],
                                         "detail": f"average price {price}, as the broker reports it"})


def _reason(order: dict, update: BrokerOrder) -> Optional[str]:
    """The reason to show: for a cancel the host asked for (a breach, exit-all, a target), the host's why,
    not the broker's "cancelled by user"."""
    if update.status is OrderStatus.CANCELLED and order.get("cancel_requested"):
        return f"cancelled by the host: {order['cancel_requested']}"
    return update.reason


def _apply_cumulative(db: sqlite_utils.Database, order: dict, update: BrokerOrder) -> bool:
    """Move the position by what the order has filled beyond what was applied; True if it moved."""
    applied = order["applied_qty"] or 0
    applied_value = dec(order["applied_value"]) or Decimal("0")
    fills = db.execute("select qty, price from fills where order_id = ?", (order["id"],)).fetchall()
    fills_qty = sum(q for q, _ in fills)
    fills_value = sum((q * Decimal(p) for q, p in fills), Decimal("0"))  # Decimal: never SQLite's float sum
    target = min(max(applied, fills_qty, update.filled_qty), order["qty"])
    if target <= applied:
        return False
    delta = target - applied
    if update.avg_price and update.filled_qty == target:
        value = update.avg_price * target
    elif fills_qty == target:
        value = fills_value
    else:
        value = applied_value + (update.avg_price or dec(order["avg_price"]) or dec(order["price"]) or Decimal("0")) * delta
    price = ((value - applied_value) / delta).quantize(Decimal("0.0001"))
    if price <= 0:  # the broker's rounded average cannot price the gap: use its average
        price = update.avg_price or dec(order["avg_price"]) or Decimal("0")
    move_position(db, (order["strategy"], order["exchange"], order["symbol"], order["product"]),
                   Side(order["side"]), delta, price)
    order.update(applied_qty=target, applied_value=str(applied_value + price * delta))
    db.execute("update orders set applied_qty = ?, applied_value = ? where id = ?",
               (order["applied_qty"], order["applied_value"], order["id"]))
    if fills_qty < target:
        log.warning("order %s: the broker reports %s filled but only %s arrived as fills; the position takes the "
                    "broker's total", order["id"], target, fills_qty)
    return True


def move_position(db: sqlite_utils.Database, key: tuple, side: Side, qty: int, price: Decimal) -> None:
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
        self._doubled: set[str] = set()  # our orders found more than once at the broker (reported once)
        self._missing: dict[str, float] = {}  # working orders of ours absent from today's book: since when (monotonic)
        self.outside_filled = False  # an update showed a fill of an order from outside: the books are to be read now

    def apply(self, updates: Iterable[BrokerOrder]) -> list[dict]:
        """Apply broker updates in one transaction; return the rows of our orders that changed."""
        updates = list(updates)
        if not updates:
            return []
        told: set[str] = set()  # in this transaction: remembered only once it commits (a retry tells again)

        def run(db: sqlite_utils.Database) -> list[dict]:
            changed = []
            told.clear()
            for u in updates:
                row = apply_update(db, u)
                if row is not None:
                    changed.append(row)
                    continue
                outside = _order_row(db, u.remarks) is None
                if outside and u.filled_qty:
                    self.outside_filled = True
                if outside and u.broker_order_id not in self._foreign and u.broker_order_id not in told:
                    told.add(u.broker_order_id)
                    Storage.add_event(db, "manual_order", f"broker order {u.broker_order_id} ({u.status.value}, "
                                      f"remarks {u.remarks!r}) was not placed by this host: its fills close strategies' "
                                      f"positions first (closed_outside), and the rest counts as strategy 'manual'", "warning", "manual", {"broker_order_id": u.broker_order_id})
            return changed
        changed = self.storage.write(run)
        self._foreign |= told
        return changed

    def reconcile(self, book: list[BrokerOrder], in_flight: set[str], startup: bool = False,
                  resend_max_age_s: float = 0, book_is_synchronous: bool = False) -> list[str]:
        """Match every unfinished order of ours with the broker's book, by our id in remarks.

        Nothing that may have reached the broker is ever sent again: an order marked SUBMITTED (the
        process may have died after writing the request) or UNKNOWN (the reply was lost) is resolved only
        by finding it in the book. With no trace for `unknown_grace_s` it becomes LOST, an error event
        asks the trader to check the broker, and it is still looked for (a late booking moves it on).
        Only a NEW order, never handed to the broker, is returned at start-up to be sent now (if younger
        than resend_max_age_s). A DAY order from an earlier day that the new day's book lacks EXPIRED.
        The one exception is a broker whose book is written in the same step as the order (the paper
        broker, `book_is_synchronous`): at start-up, an order its book lacks was never placed, and is sent.
        """
        by_remarks: dict[str, BrokerOrder] = {}
        copies: dict[str, int] = {}
        for o in book:
            by_remarks.setdefault(o.remarks, o)
            copies[o.remarks] = copies.get(o.remarks, 0) + 1
        now = datetime.now(timezone.utc)
        cutoff = (now - timedelta(seconds=self.unknown_grace_s)).isoformat(timespec="milliseconds")
        too_old = (now - timedelta(seconds=resend_max_age_s)).isoformat(timespec="milliseconds")
        lost_since = (now - timedelta(days=1)).isoformat(timespec="milliseconds")
        today = now.astimezone(IST).date()
        statuses = (OrderStatus.NEW.value, *UNFINISHED) if startup else UNFINISHED

        def end(db: sqlite_utils.Database, order: dict, status: OrderStatus, kind: str, reason: str) -> None:
            if transition(db, order["id"], status, reason, reason=reason):
                Storage.add_event(db, kind, f"order {order['id']} ({order['strategy']} {order['side']} {order['qty']} "
                                  f"{order['exchange']}:{order['symbol']}): {reason}",
                                  "error" if status is OrderStatus.LOST else "warning", order["strategy"],
                                  {"order_id": order["id"]})

        doubled: set[str] = set()  # told in this transaction: remembered only once it commits

        def run(db: sqlite_utils.Database) -> list[str]:
            unsent = []
            doubled.clear()
            marks = ",".join("?" * len(statuses))
            rows = list(db.query(f"select * from orders where status in ({marks}) or (status = 'LOST' and "
                                 f"updated_at >= ?) order by rowid", (*statuses, lost_since)))
            for order in rows:
                if order["id"] in in_flight:
                    continue
                found = by_remarks.get(order["id"])
                if found is not None:
                    self._missing.pop(order["id"], None)
                    apply_update(db, found)
                    if copies[order["id"]] > 1 and order["id"] not in self._doubled:
                        doubled.add(order["id"])
                        Storage.add_event(db, "order_doubled", f"order {order['id']} is at the broker "
                                          f"{copies[order['id']]} times (same remarks): check the broker terminal",
                                          "error", order["strategy"], {"order_id": order["id"]})
                elif startup and book_is_synchronous and order["status"] != OrderStatus.NEW.value \
                        and order["status"] in (OrderStatus.SUBMITTED.value, OrderStatus.UNKNOWN.value) \
                        and order["created_at"] >= too_old:
                    db.execute("update orders set status = 'NEW', updated_at = ? where id = ?", (utcnow(), order["id"]))
                    Storage.insert(db, "order_history", {"order_id": order["id"], "at": utcnow(), "status": "NEW",
                                                         "detail": "not in the paper broker's book, which is written "
                                                                   "with the order: it was never placed; sent now"})
                    unsent.append(order["id"])
                elif order["status"] == OrderStatus.NEW.value:
                    if order["created_at"] >= too_old:
                        unsent.append(order["id"])
                    else:
                        end(db, order, OrderStatus.REJECTED, "order_lost", "never reached the broker (the host stopped, "
                            f"or the broker session was over, before it was sent), and is older than "
                            f"ALERT_MAX_AGE_S={resend_max_age_s:g} s; not sent late")
                elif order["status"] in (OrderStatus.OPEN.value, OrderStatus.PARTIAL.value):
                    if _day(order["created_at"]) < today:
                        end(db, order, OrderStatus.EXPIRED, "order_expired", f"a DAY order of {_day(order['created_at'])}"
                            f" is gone from the broker's book of {today}: expired at the close "
                            f"({order['filled_qty'] or 0} filled)")
                    elif time.monotonic() - self._missing.setdefault(order["id"], time.monotonic()) \
                            >= self.unknown_grace_s:
                        self._vanished(db, order)
                elif order["status"] in (OrderStatus.SUBMITTED.value, OrderStatus.UNKNOWN.value) \
                        and order["updated_at"] < cutoff:
                    end(db, order, OrderStatus.LOST, "order_lost", f"no trace in the broker's books "
                        f"{self.unknown_grace_s:g} s after it was sent; it is NOT sent again: check the broker "
                        f"terminal (if it is there, the host finds it by its remarks)")
            return unsent
        unsent = self.storage.write(run, durable=True)
        self._doubled |= doubled
        return unsent

    def _vanished(self, db: sqlite_utils.Database, order: dict) -> None:
        """A working order gone from today's book without an update: LOST (still looked for), and said loudly.
        A stop loss of the host's is placed again (protect), so the position is not left unprotected."""
        self._missing.pop(order["id"], None)
        why = (f"was {order['status']} at the broker ({order['filled_qty'] or 0} filled) and has been missing from "
               f"today's order book for {self.unknown_grace_s:g} s without an update: check the broker terminal")
        db.execute("update orders set status = 'LOST', updated_at = ?, reason = ? where id = ?",
                   (utcnow(), why, order["id"]))
        Storage.insert(db, "order_history", {"order_id": order["id"], "at": utcnow(), "status": "LOST", "detail": why})
        Storage.add_event(db, "order_missing", f"order {order['id']} ({order['strategy']} {order['side']} "
                          f"{order['qty']} {order['exchange']}:{order['symbol']}) {why}", "error", order["strategy"],
                          {"order_id": order["id"], "broker_order_id": order["broker_order_id"]})


def _day(stamp: str) -> date:
    """The trading day (Asia/Kolkata) of a stored UTC timestamp."""
    return datetime.fromisoformat(stamp).astimezone(IST).date()
