"""Running counts of each strategy's orders per risk day (RISK_MAX_ORDERS_PER_DAY), kept beside the orders.

The count is updated in the transaction that inserts the order, so checking the limit costs one key
lookup however many orders the day has had. A day without a count yet (the first order of the day, or
orders made before this count existed) is counted once from the orders table.
"""
from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone

import sqlite_utils

from .market import IST
from .storage import Storage

EXIT = "EXIT"  # exits never count towards the limit


def _key(strategy: str, day: date) -> str:
    return f"orders_today:{day.isoformat()}:{strategy}"


def day_start_utc(d: date) -> str:
    """Where the risk day starts, in the stored timestamps' form (risk.py uses it)."""
    return datetime.combine(d, time(0), IST).astimezone(timezone.utc).isoformat(timespec="milliseconds")


def _counted(db: sqlite_utils.Database, strategy: str, day: date) -> int:
    """The day's non-exit orders of the strategy, counted from the orders (indexed on strategy, created_at)."""
    return db.execute("select count(*) from orders where strategy = ? and created_at >= ? and created_at < ? "
                      "and action != ?", (strategy, day_start_utc(day), day_start_utc(day + timedelta(days=1)),
                                          EXIT)).fetchone()[0]


def count_order(db: sqlite_utils.Database, strategy: str, action: str, created_at: str) -> None:
    """An order was just inserted (in this transaction): add it to its day's count."""
    if action == EXIT:
        return
    day = datetime.fromisoformat(created_at).astimezone(IST).date()
    key = _key(strategy, day)
    if not db.execute("update state set value = cast(value as integer) + 1, updated_at = ? where key = ? and "
                      "cast(cast(value as integer) as text) = value", (created_at, key)).rowcount:
        # the first of the day (or a count that is not a number): counted from the orders, this one with them
        Storage.put_state(db, key, str(_counted(db, strategy, day)))


def orders_on(db: sqlite_utils.Database, strategy: str, day: date) -> int:
    """How many non-exit orders the strategy has made on this risk day."""
    row = db.execute("select value from state where key = ?", (_key(strategy, day),)).fetchone()
    return int(row[0]) if row and str(row[0]).isdigit() else _counted(db, strategy, day)  # not a number: counted
