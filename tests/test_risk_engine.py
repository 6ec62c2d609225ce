"""Risk through the running engine on the paper broker: breach, violation, blind, limits, square-off."""
from __future__ import annotations

from datetime import datetime, time, timedelta, timezone
from decimal import Decimal

import pytest

from host.market import IST, MarketClock
from host.models import OrderRequest, OrderType, Product, Side

from conftest import SYMBOL, alert, wait_for
from plugin_files import strategy_source, wait_strategy, write


@pytest.fixture
def risky(host_factory):
    h = host_factory(RISK_BASE_MAX_LOSS="-1000", RISK_TRAIL_STEP="0", RISK_STATUS_UPDATE_MIN="0")
    h.runtime.engine.risk_poll_s = 0.05
    return h


def _long(h, strategy="s1", qty=100, price="100", symbol=SYMBOL):
    h.tick(price, symbol=symbol)
    r = h.post(alert(strategy=strategy, direction="BUY", qty=qty, price=price, tradingsymbol=symbol))
    assert r.status_code == 200, r.get_json()
    h.settle()


def _events(h, kind):
    return [e for e in h.api("/api/events", query_string={"limit": 500}).get_json()["items"] if e["kind"] == kind]


def test_a_breach_halts_flattens_and_refuses_entries_but_not_exits(risky):
    _long(risky, qty=100, price="100")
    risky.tick("95")  # -500: fine
    assert risky.api("/api/risk").get_json()["breached"] is False
    risky.tick("89.9")  # -1010 <= -1000
    wait_for(lambda: risky.api("/api/risk").get_json()["breached"])
    # the day's breach and the halt are two writes: the state follows within the same beat
    risk = wait_for(lambda: (r := risky.api("/api/risk").get_json())["state"] == "halted" and r, timeout=2)
    assert risk["state_by"] == "risk"
    wait_for(lambda: risky.net() == 0)  # flattened through the normal order path
    exit_order = next(o for o in risky.orders() if o["action"] == "EXIT")
    assert exit_order["order_type"] == "MKT" and exit_order["status"] == "FILLED"
    assert risky.post(alert("ENTRY", "other", tradingsymbol="OTHER")).status_code == 423
    assert _events(risky, "risk_breach")
    # the breach itself exited the position; nothing had to be caught later as a violation
    assert any("daily max loss breached" in e["message"] for e in _events(risky, "exit_all"))
    assert _events(risky, "risk_violation") == []


def test_a_warning_before_the_breach(risky):
    _long(risky, qty=100, price="100")
    risky.tick("91.5")  # -850: within 20 % of the limit
    wait_for(lambda: _events(risky, "risk_warning"))
    assert risky.api("/api/risk").get_json()["warning"] is True


def test_a_manual_trade_after_the_breach_is_flattened_again(risky):
    _long(risky, qty=100, price="100")
    risky.tick("89")
    wait_for(lambda: risky.net() == 0 and risky.api("/api/risk").get_json()["breached"])
    # someone trades by hand at the broker after the breach
    risky.broker.place(OrderRequest("NFO", SYMBOL, Side.BUY, 50, OrderType.LMT, Product.NRML, Decimal("89"),
                                    remarks="by-hand-1"))
    wait_for(lambda: _events(risky, "manual_trade"), timeout=5)
    wait_for(lambda: _events(risky, "risk_violation"), timeout=5)
    wait_for(lambda: risky.net("manual") == 0 and any(o["strategy"] == "manual" and o["status"] == "FILLED"
                                                      for o in risky.orders()), timeout=5)
    broker_net = sum(p.net_qty for p in risky.broker.positions())
    assert broker_net == 0


def test_a_manual_trade_counts_in_the_pnl(risky):
    risky.tick("100")
    risky.broker.place(OrderRequest("NFO", SYMBOL, Side.SELL, 10, OrderType.LMT, Product.NRML, Decimal("100"),
                                    remarks="by-hand-2"))
    wait_for(lambda: risky.net("manual") == -10, timeout=5)
    assert "was not placed by this host" in _events(risky, "manual_order")[0]["message"]
    risky.tick("90")
    wait_for(lambda: risky.api("/api/risk").get_json()["day_pnl"] == "100")
    assert "no strategy" in _events(risky, "manual_trade")[0]["message"]


def test_a_blind_broker_refuses_entries_and_says_so_once(risky):
    _long(risky)
    risky.broker.fail_positions = "connection refused"
    wait_for(lambda: risky.api("/api/risk").get_json()["blind"])
    r = risky.post(alert("ENTRY", "other", tradingsymbol="OTHER"))
    assert r.status_code == 423 and "risk is blind" in r.get_json()["reason"]
    assert risky.post(alert("EXIT")).status_code == 200  # exits are still allowed
    risky.broker.fail_positions = None
    wait_for(lambda: risky.api("/api/risk").get_json()["blind"] is None)
    wait_for(lambda: _events(risky, "risk_sighted"))  # the day record is stored first, then its event
    assert len(_events(risky, "risk_blind")) == 1
    assert risky.post(alert("ENTRY", "other", tradingsymbol="OTHER")).status_code == 200


def test_max_orders_per_day_stops_a_runaway_strategy(host_factory):
    h = host_factory(RISK_MAX_ORDERS_PER_DAY="2")
    codes = [h.post(alert(strategy="loop", tradingsymbol=f"S{i}")).status_code for i in range(3)]
    assert codes == [200, 200, 423]
    assert h.post(alert(strategy="calm", tradingsymbol="S9")).status_code == 200  # per strategy
    usage = h.api("/api/risk").get_json()["strategies"]
    assert usage["loop"]["orders_today"] == 2


def test_a_strategy_over_its_max_loss_is_exited_alone(risky):
    write(risky.runtime.strategies.folder, "fragile", strategy_source(
        "fragile", meta_extra=', "params": {"max_loss": 200}'))
    wait_strategy(risky, "fragile", status="running")
    _long(risky, strategy="fragile", qty=10, price="100")
    _long(risky, strategy="sturdy", qty=10, price="50", symbol="OTHER")
    risky.tick("75")  # fragile: -250
    risky.tick("75")  # a 25 % jump is held until a second tick confirms it
    wait_for(lambda: risky.net("fragile") == 0)
    assert risky.net("sturdy", "OTHER") == 10
    r = risky.post(alert(strategy="fragile", tradingsymbol="THIRD"))
    assert r.status_code == 423 and "hit its max loss" in r.get_json()["reason"]


def test_intraday_square_off_exits_mis_positions_only(host_factory):
    h = host_factory(SQUARE_OFF_TIME="15:15", RISK_STATUS_UPDATE_MIN="0")
    # the next trading day, 10:00: a host started on a trading day after 15:15 has squared off today already
    day = MarketClock().next_trading_day(datetime.now(IST).date())
    h.runtime.clock_offset = datetime.combine(day, time(10, 0), IST) - datetime.now(timezone.utc)
    h.tick("100")
    h.tick("100", symbol="NRMLSYM")
    h.post(alert(strategy="intraday", direction="BUY", qty=10, product_type="MIS", price="100"))
    h.post(alert(strategy="carry", direction="BUY", qty=10, product_type="NRML", price="100", tradingsymbol="NRMLSYM"))
    h.settle()
    target = datetime.combine(day, time(15, 16), IST)
    h.runtime.clock_offset = target - datetime.now(timezone.utc)
    wait_for(lambda: h.net("intraday") == 0, timeout=5)
    assert h.net("carry", "NRMLSYM") == 10
    assert any("square-off" in e["message"] for e in h.api("/api/events").get_json()["items"])


def test_the_risk_record_has_the_contract_fields(risky):
    risk = risky.api("/api/risk").get_json()
    for f in ("state", "day_pnl", "max_loss", "peak_pnl", "breached", "warning", "consecutive_loss_days",
              "cooldown_until", "blind", "strategies"):
        assert f in risk, f
    assert risk["max_loss"] == "-1000"


def test_a_steady_stream_of_feed_ticks_never_nests(host):
    """A slow on_tick while ticks keep arriving: each batch waits for the next step, never nests."""
    import threading
    import time
    from host.models import Tick
    write(host.runtime.strategies.folder, "slowtick", strategy_source("slowtick", body='''
import time

@hookimpl
def strategy_on_tick(ctx, tick):
    time.sleep(0.02)
''', meta_extra=f', "symbols": ["NFO:{SYMBOL}"]'))
    wait_strategy(host, "slowtick", status="running")
    engine = host.runtime.engine
    depth, deepest = [0], [0]
    real = engine._apply_ticks

    def counting(ticks):
        depth[0] += 1
        deepest[0] = max(deepest[0], depth[0])
        try:
            real(ticks)
        finally:
            depth[0] -= 1
    engine._apply_ticks = counting
    stop = threading.Event()

    def feed():
        i = 0
        while not stop.is_set():
            i += 1
            engine.on_ticks([Tick("NFO", SYMBOL, Decimal("100") + Decimal(i % 50) / 10)])
            time.sleep(0.002)
    t = threading.Thread(target=feed)
    t.start()
    time.sleep(1.5)
    stop.set()
    t.join()
    wait_for(lambda: engine._events.empty(), timeout=20)
    assert deepest[0] == 1


def test_fills_from_the_brokers_app_read_the_books_at_once_and_at_most_once_a_second(host_factory):
    """A fill of an order from outside makes risk read the broker's books now (not at the next RISK_POLL_S), and a
    burst of them reads them about once a second, never at every fill."""
    import time as clock
    h = host_factory(RISK_POLL_S="60")
    h.tick("100")
    reads = []
    positions = h.broker.positions
    h.broker.positions = lambda: (reads.append(clock.monotonic()), positions())[1]
    clock.sleep(0.5)
    assert reads == []  # the 60 s poll is not due
    started = clock.monotonic()
    for n in range(40):  # 40 fills from the app over 2 s
        h.broker.place(OrderRequest("NFO", SYMBOL, Side.BUY, 1, OrderType.LMT, Product.NRML, Decimal("100"),
                                    remarks=f"app-{n}"))
        clock.sleep(0.05)
    clock.sleep(1.2)
    assert reads and reads[0] - started < 0.6, reads  # the first fill: at once
    assert 2 <= len(reads) <= 4, [round(r - started, 2) for r in reads]  # about once a second, not 40
    wait_for(lambda: h.net("manual") == 40, timeout=3)
