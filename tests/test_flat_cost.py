"""A flat cost per alert (issue 17): no query on an alert's path scans a table that grows with the day."""
from __future__ import annotations

from datetime import datetime, timezone

from conftest import SYMBOL, alert
from host.market import MarketClock



def _vm_steps(h, send) -> int:
    """SQLite VM steps (in hundreds) the host's connections take while `send` runs and the host settles."""
    storage = h.runtime.storage
    mine = storage._reader().conn  # this thread's reader: the test's own look-ups are not counted
    conns = [storage.conn, *(c for c in storage._readers if c is not mine)]
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0
    for c in conns:
        c.set_progress_handler(count, 100)
    try:
        send()
        h.settle()
    finally:
        for c in conns:
            c.set_progress_handler(None, 100)
    return steps[0]


def _a_busy_day(h, n: int) -> None:
    """n more of today's orders (filled, with their trail and events) for the strategy and symbol traded."""
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")

    def run(db) -> None:
        for i in range(n):
            oid = f"o-busy-{i}"
            db.execute("insert into orders (id, strategy, action, exchange, symbol, side, qty, order_type, product, "
                       "status, filled_qty, created_at, updated_at, applied_qty, applied_value) values "
                       "(?, 'flat', 'ADJUST', 'NFO', ?, 'SELL', 75, 'LMT', 'M', 'FILLED', 75, ?, ?, 75, '0')",
                       (oid, SYMBOL, now, now))
            db.execute("insert into order_history (order_id, at, status) values (?, ?, 'FILLED')", (oid, now))
            db.execute("insert into events (at, kind, severity, strategy, message) values (?, 'x', 'info', 'flat', 'x')",
                       (now,))
    h.runtime.storage.write(run)


def test_the_cost_of_an_alert_does_not_grow_with_the_days_orders(host_factory):
    h = host_factory(RISK_MAX_ORDERS_PER_DAY="100000", RISK_MAX_QTY_PER_SYMBOL="10000000")
    for i in range(3):  # every thread has its reader by now
        r = h.post(alert("ENTRY" if i == 0 else "ADJUST", strategy="flat", qty=75, alert_id=f"warm{i}"))
        assert r.status_code == 200, r.get_json()
        h.settle()

    def one(tag: str) -> None:
        r = h.post(alert("ADJUST", strategy="flat", qty=75, alert_id=tag))
        assert r.status_code == 200 and r.get_json()["status"] == "accepted", r.get_json()
    quiet = min(_vm_steps(h, lambda: one(f"quiet{i}")) for i in range(3))
    _a_busy_day(h, 5000)
    busy = min(_vm_steps(h, lambda: one(f"busy{i}")) for i in range(3))
    # a query that read the day's 5,000 orders once would take more than 5,000 VM steps more
    assert busy <= quiet * 1.2 + 3, f"SQLite VM steps (x100) for one alert: {quiet} on a quiet day, {busy} on a busy one"


def test_the_days_order_count_is_kept_running_and_exits_do_not_count(host_factory):
    from host.day_counts import orders_on
    h = host_factory(RISK_MAX_ORDERS_PER_DAY="3")
    for i in range(3):
        r = h.post(alert("ENTRY" if i == 0 else "ADJUST", strategy="cap", qty=75, alert_id=f"e{i}")).get_json()
        assert r["status"] == "accepted", r
        h.settle()
    exit_ = h.post(alert("EXIT", strategy="cap", qty=75, direction="BUY", alert_id="x1")).get_json()
    assert exit_["status"] == "accepted", exit_
    h.settle()
    refused = h.post(alert("ADJUST", strategy="cap", qty=75, alert_id="e3")).get_json()
    assert refused["status"] == "refused" and "max of 3 orders today" in refused["reason"], refused
    today = MarketClock().day(datetime.now(timezone.utc))
    counted = h.runtime.storage.read(lambda db: orders_on(db, "cap", today))
    stored = h.runtime.storage.get_state(f"orders_today:{today.isoformat()}:cap")
    actual = h.runtime.storage.one("select count(*) n from orders where strategy = 'cap' and action != 'EXIT'")["n"]
    assert counted == int(stored) == actual == 3
