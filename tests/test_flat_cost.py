"""A flat cost per alert (issue 17): no query on an alert's path scans a table that grows with the day."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest

from conftest import SYMBOL, alert, wait_for
from host.market import MarketClock
from host.notify import CURSOR_KEY
from host.storage import Storage



class _Steps:
    """SQLite VM steps (in hundreds) of the host's connections, counted while `on` (not on `skip`, the test's own)."""

    def __init__(self) -> None:
        self.on, self.n, self.skip = False, 0, None

    def tick(self, conn: object) -> int:
        if self.on and conn is not self.skip:
            self.n += 1
        return 0


@pytest.fixture
def steps(monkeypatch):
    """Every connection the host opens counts its steps from its start. Set later, from the test's thread, a
    progress handler waits for the connection's mutex while holding the GIL, and a thread inside a statement waits
    for the GIL to run the handler: the suite hung for good (fresh-check, stop 28)."""
    counter, real = _Steps(), Storage._connect

    def connect(self):
        conn = real(self)
        conn.set_progress_handler(lambda: counter.tick(conn), 100)  # before any other thread can use it
        return conn
    monkeypatch.setattr(Storage, "_connect", connect)
    return counter


def _vm_steps(h, steps: _Steps, send) -> int:
    """SQLite VM steps (in hundreds) the host's connections take while `send` runs and the host settles."""
    steps.skip = h.runtime.storage._reader().conn  # this thread's reader: the test's own look-ups are not counted
    steps.n, steps.on = 0, True
    try:
        send()
        h.settle()
    finally:
        steps.on = False
    return steps.n


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


def test_the_cost_of_an_alert_does_not_grow_with_the_days_orders(steps, host_factory):
    h = host_factory(RISK_MAX_ORDERS_PER_DAY="100000", RISK_MAX_QTY_PER_SYMBOL="10000000")
    for i in range(3):  # every thread has its reader by now
        r = h.post(alert("ENTRY" if i == 0 else "ADJUST", strategy="flat", qty=75, alert_id=f"warm{i}"))
        assert r.status_code == 200, r.get_json()
        h.settle()

    def one(tag: str) -> None:
        r = h.post(alert("ADJUST", strategy="flat", qty=75, alert_id=tag))
        assert r.status_code == 200 and r.get_json()["status"] == "accepted", r.get_json()
    quiet = min(_vm_steps(h, steps, lambda: one(f"quiet{i}")) for i in range(3))
    _a_busy_day(h, 5000)
    # the notification pump reads the 5,000 new events 200 at a time in the background: measure once it is done
    storage = h.runtime.storage
    wait_for(lambda: int(storage.get_state(CURSOR_KEY) or 0) >= storage.one("select max(id) n from events")["n"],
             timeout=20)
    busy = min(_vm_steps(h, steps, lambda: one(f"busy{i}")) for i in range(3))
    # a query that read the day's 5,000 orders once would take more than 5,000 VM steps more
    assert quiet > 0, quiet  # the count sees the alert's statements (the engine's, the sender's, the store)
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


def test_a_days_count_that_is_not_a_number_is_counted_again_from_the_orders(host_factory):
    """The count is kept in one statement (an UPDATE adding 1); a stored count that is not a number (a hand edit)
    is neither read as 0 (the limit would start again) nor a failed alert: it is counted again from the orders."""
    from host.storage import Storage
    h = host_factory(RISK_MAX_ORDERS_PER_DAY="3")
    today = MarketClock().day(datetime.now(timezone.utc))
    key = f"orders_today:{today.isoformat()}:cap"
    for i in range(2):
        assert h.post(alert(strategy="cap", tradingsymbol=f"S{i}", alert_id=f"e{i}")).get_json()["status"] == "accepted"
    assert h.runtime.storage.get_state(key) == "2"
    h.runtime.storage.write(lambda db: Storage.put_state(db, key, "two"))
    assert h.post(alert(strategy="cap", tradingsymbol="S2", alert_id="e2")).get_json()["status"] == "accepted"
    assert h.runtime.storage.get_state(key) == "3"
    refused = h.post(alert(strategy="cap", tradingsymbol="S3", alert_id="e3")).get_json()
    assert refused["status"] == "refused" and "max of 3 orders today" in refused["reason"], refused


def test_the_paper_books_cost_does_not_grow_with_the_days_finished_orders(monkeypatch):
    """The engine reads the paper broker's whole order book at every reconcile, and its positions at every
    risk poll: a finished order's view is made once, and its fills are added up once, not again at every read
    (the 20,000th alert of a day cost up to 1.35x the first)."""
    from host.models import OrderRequest, OrderStatus, OrderType, Product, Side
    from host.sim import matching
    from host.sim.matching import MatchingEngine

    engine = MatchingEngine()
    engine.set_ltp("NFO", "X", Decimal("10"))
    for n in range(300):
        engine.place(OrderRequest("NFO", "X", Side.BUY if n % 2 else Side.SELL, 1, OrderType.MKT, Product.MIS,
                                  None, None, remarks=f"o{n}"))
    engine.place(OrderRequest("NFO", "X", Side.BUY, 5, OrderType.LMT, Product.MIS, Decimal("9"), None,
                              remarks="working"))
    made = []
    real = matching.BrokerOrder
    monkeypatch.setattr(matching, "BrokerOrder", lambda *a, **k: made.append(a) or real(*a, **k))
    first = engine.order_book()
    assert len(first) == 301
    made.clear()
    again = engine.order_book()
    assert made == [] and again == first  # nothing changed: nothing made again
    applied = []
    real_apply = matching.PositionRow.apply
    monkeypatch.setattr(matching.PositionRow, "apply", lambda row, *a: applied.append(a) or real_apply(row, *a))
    engine.position_book()
    applied.clear()
    assert engine.position_book()[("NFO", "X", "I")].math.net_qty == 0 and applied == []  # 300 finished fills kept

    engine.max_fill_qty = 2
    engine.set_ltp("NFO", "X", Decimal("9"))  # the working order fills 2 of 5
    book = {o.remarks: o for o in engine.order_book()}
    assert len(made) == 1 and book["working"].status is OrderStatus.PARTIAL and book["working"].filled_qty == 2
    assert len(book["working"].fills) == 1
    engine.max_fill_qty = None
    engine.set_ltp("NFO", "X", Decimal("8.5"))
    book = {o.remarks: o for o in engine.order_book()}
    assert book["working"].status is OrderStatus.FILLED and book["working"].filled_qty == 5
    assert book["working"].avg_price == Decimal("8.7") and len(book["working"].fills) == 2


def test_the_paper_position_book_kept_for_finished_orders_equals_one_made_from_every_fill():
    """position_book keeps what the day's finished orders add up to; after orders that finish out of turn,
    partial fills, a carried position and a new day, it equals the book made again from every fill."""
    import random
    from dataclasses import asdict
    from host.models import OrderRequest, OrderType, Product, Side
    from host.positions import PositionMath
    from host.sim.matching import MatchingEngine, PositionRow

    def from_every_fill(engine: MatchingEngine) -> dict:
        out = {k: PositionRow(q, p, math=PositionMath(q, p)) for k, (q, p) in engine.carry.items()}
        for o in engine._orders.values():
            for f in o.fills:
                out.setdefault((o.req.exchange, o.req.symbol, o.product_code), PositionRow()).apply(
                    o.req.side, f.qty, f.price)
        return {k: asdict(r) for k, r in out.items()}

    rng = random.Random(17)
    engine = MatchingEngine()
    engine.set_ltp("NFO", "X", Decimal("100"))
    engine.set_ltp("NFO", "Y", Decimal("50"))
    for step in range(400):
        symbol = rng.choice("XY")
        ltp = engine.ltp("NFO", symbol)
        roll = rng.random()
        if roll < 0.1:
            engine.max_fill_qty = rng.choice([None, 1, 2])
            engine.set_ltp("NFO", symbol, ltp + Decimal(rng.choice([-2, -1, 1, 2])))  # working ones fill
        elif roll < 0.13:
            engine.new_day()
            engine.set_ltp("NFO", "X", Decimal("100"))
            engine.set_ltp("NFO", "Y", Decimal("50"))
        else:
            side = rng.choice([Side.BUY, Side.SELL])
            away = Decimal(rng.choice([0, 1])) * (-1 if side is Side.BUY else 1)  # some rest, some fill now
            engine.place(OrderRequest("NFO", symbol, side, rng.randint(1, 5), OrderType.LMT,
                                      rng.choice([Product.MIS, Product.NRML]), ltp + away, None, remarks=f"o{step}"))
        assert {k: asdict(r) for k, r in engine.position_book().items()} == from_every_fill(engine), step
    assert engine._finished[1], "no finished order was ever kept: the test did not exercise the kept part"


def _reader_steps(storage, fn) -> int:
    """SQLite VM steps (in hundreds) that fn takes on this thread's read connection."""
    counted = [0]

    def count() -> int:
        counted[0] += 1
        return 0
    conn = storage._reader().conn
    conn.set_progress_handler(count, 100)
    try:
        fn()
    finally:
        conn.set_progress_handler(None, 100)
    return counted[0]


def test_ended_protections_cost_nothing_to_the_ones_at_work(tmp_path):
    """Every symbol ever traded with a stop keeps its ended row: a year of weekly options is thousands of them."""
    from host.protect import Protector, position_fields
    from host.storage import Storage
    storage = Storage(tmp_path / "h.sqlite")
    try:
        protector = Protector(storage, dispatch=lambda d: None, evaluate=lambda *a: None, modify=lambda *a: None)

        def steps() -> int:
            return _reader_steps(storage, lambda: (protector.sync(), position_fields(storage)))
        quiet = steps()
        storage.write(lambda db: db.conn.executemany(
            "insert into protections (strategy, exchange, symbol, product, side, spec, status, created_at) "
            "values ('s', 'NFO', ?, 'M', 'BUY', '{}', 'done', '2026-01-01T00:00:00.000+00:00')",
            [(f"NIFTY{i}CE",) for i in range(5000)]))
        busy = steps()
        assert busy <= quiet * 1.2 + 3, f"SQLite VM steps (x100): {quiet} with no ended protections, {busy} with 5,000"
    finally:
        storage.close()


def test_the_feeds_symbols_cost_the_same_after_a_year_of_finished_orders(tmp_path):
    """The live feed asks every 2 s which symbols to watch: finished orders must not be read for it."""
    from host.storage import Storage
    from host.views import traded_symbols
    storage = Storage(tmp_path / "h.sqlite")
    try:
        def one_order(oid: str, status: str, symbol: str) -> tuple:
            return (oid, symbol, status, "2026-01-01T00:00:00.000+00:00")
        insert = ("insert into orders (id, strategy, action, exchange, symbol, side, qty, order_type, product, status, "
                  "filled_qty, created_at, updated_at, applied_qty, applied_value) values "
                  "(?, 's', 'ENTRY', 'NFO', ?, 'BUY', 75, 'LMT', 'M', ?, 0, ?, '', 0, '0')")
        storage.write(lambda db: db.conn.executemany(insert, [one_order("w1", "OPEN", "WORKING"),
                                                              one_order("l1", "LOST", "LOSTSYM")]))

        def steps() -> int:
            found: list[set] = []
            n = _reader_steps(storage, lambda: found.append(traded_symbols(storage)))
            assert found == [{("NFO", "WORKING"), ("NFO", "LOSTSYM")}]
            return n
        quiet = steps()
        storage.write(lambda db: db.conn.executemany(insert, [one_order(f"f{i}", "FILLED", f"OLD{i % 300}")
                                                              for i in range(20000)]))
        busy = steps()
        assert busy <= quiet * 1.2 + 3, f"SQLite VM steps (x100): {quiet} with 2 orders, {busy} with 20,000 finished"
    finally:
        storage.close()


def test_the_risk_beats_and_an_exits_reads_of_working_exits_do_not_grow_with_the_days_orders(steps, host_factory):
    """Review 34: `protection is null` (every order but a protective stop) made SQLite read the working exits through
    the protection index, walking every order ever made: the risk beat's look for oversized exits and triggered
    stops, and each exit's read of the working exits (flatten.exits_now), grew with the history (30 ms at 200,000
    orders). The index holds protective stops only now, and those reads go by status. The exits a read of the
    broker's books counts (flatten.closing_room, on every exit and inside risk's flattens) were found with an OR
    of three conditions that SQLite answered by reading every order (25 ms at 200,000): each part has its index."""
    from host import flatten
    from host.models import BrokerView
    h = host_factory()
    storage, risk = h.runtime.storage, h.runtime.engine.risk

    def cost() -> int:
        def once() -> int:
            steps.skip, steps.n, steps.on = None, 0, True
            try:
                risk.escalate()
                storage.read(lambda db: flatten.closing_room(db, BrokerView({("NFO", SYMBOL, "M"): 75}, [], [],
                                                                            *flatten.exits_now(db))))
            finally:
                steps.on = False
            return steps.n
        return min(once() for _ in range(3))
    quiet = cost()
    _a_busy_day(h, 5000)
    busy = cost()
    assert busy <= quiet * 1.2 + 3, f"SQLite VM steps (x100): {quiet} with no orders, {busy} after 5,000"


def test_todays_order_counts_do_not_read_earlier_days_orders(steps, host_factory):
    """Review 34: today's orders by status (the dashboard, /api/status, /api/risk's per-strategy counts, Telegram's
    /status) were counted through the status or strategy index, reading every order ever made (27 ms at 200,000),
    on every refresh. They are read by their time."""
    from host import views
    h = host_factory()
    storage = h.runtime.storage

    def cost() -> int:
        steps.skip, steps.n, steps.on = None, 0, True
        try:
            views.day_summary(storage, h.runtime.gate)
            views.risk(storage, h.runtime.gate)
        finally:
            steps.on = False
        return steps.n
    quiet = cost()

    def earlier(db) -> None:
        for i in range(5000):
            db.execute("insert into orders (id, strategy, action, exchange, symbol, side, qty, order_type, product, "
                       "status, filled_qty, created_at) values (?, 'old', 'ENTRY', 'NFO', ?, 'BUY', 75, 'LMT', 'M', "
                       "'FILLED', 75, '2026-01-02T04:00:00.000+00:00')", (f"old{i}", SYMBOL))
    storage.write(earlier)
    busy = cost()
    assert busy <= quiet * 1.2 + 3, f"SQLite VM steps (x100): {quiet} before, {busy} after 5,000 earlier orders"
