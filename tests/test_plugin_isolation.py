"""Plugins cannot stall the engine: a slow strategy delays only itself (issue 13, item 11)."""
from __future__ import annotations

import threading
import time
from decimal import Decimal

from conftest import SYMBOL, alert, wait_for
from host.models import Tick
from plugin_files import strategy_source, wait_strategy, write

OTHER = "NIFTY28APR26P24500"
META = f', "symbols": ["NFO:{SYMBOL}", "NFO:{OTHER}"]'


def events(h, kind):
    return [e for e in h.api("/api/events", query_string={"limit": 500}).get_json()["items"] if e["kind"] == kind]


def feed(h, ltp, symbol=SYMBOL):
    """A tick the way the broker's feed delivers it: queued for the engine, nobody waits."""
    h.runtime.engine.on_ticks([Tick("NFO", symbol, Decimal(str(ltp)))])


def timed_post(h, body):
    """Post on a client of its own (usable from another thread); the answer and how long it took."""
    t0 = time.monotonic()
    r = h.app.test_client().post("/webhook", json=body)
    return r, time.monotonic() - t0


def slow_tick_strategy(name, sleep_s, returns="None"):
    return strategy_source(name, body=f'''
import time

@hookimpl
def strategy_on_tick(ctx, tick):
    ctx.state.setdefault("seen", []).append([tick.symbol, str(tick.ltp)])
    time.sleep({sleep_s})
    return {returns}

@hookimpl
def strategy_on_alert(ctx, alert):
    ctx.state["alerts"] = ctx.state.get("alerts", 0) + 1
    return [Intent(l.exchange, l.symbol, l.side, l.qty, l.order_type, l.product, l.price,
                   action=alert.execution_type) for l in alert.legs]
''', meta_extra=META)


BUY = "Intent(tick.exchange, tick.symbol, Side.BUY, 1, OrderType.MKT, Product.NRML, action=ExecutionType.ENTRY)"


def test_a_slow_on_tick_inside_its_budget_does_not_delay_another_strategys_alert(host_factory):
    h = host_factory(plugin_budget_s=1.0)
    write(h.runtime.strategies.folder, "slowtick", slow_tick_strategy("slowtick", 0.8))
    wait_strategy(h, "slowtick", status="running")
    stop = threading.Event()

    def ticks():  # a busy market: a tick every 50 ms
        n = 0
        while not stop.is_set() and n < 100:
            feed(h, 100 + n)
            n += 1
            time.sleep(0.05)
    t = threading.Thread(target=ticks, daemon=True)
    t.start()
    try:
        times = []
        for i in range(4):
            time.sleep(0.3)
            r, took = timed_post(h, alert(strategy="someone_else", alert_id=f"o{i}", tradingsymbol=f"X{i}"))
            assert r.status_code == 200, r.get_json()
            times.append(took)
        assert max(times) < 0.5, times
    finally:
        stop.set()
        t.join(5)
    assert h.runtime.strategies.live("slowtick").ctx.state.get("seen")  # it did get ticks


def test_an_alert_hook_past_its_budget_is_abandoned_and_its_late_intents_are_dropped_and_reported(host_factory):
    h = host_factory(plugin_budget_s=1.0)
    write(h.runtime.strategies.folder, "sleeper", strategy_source("sleeper", body='''
import time

@hookimpl
def strategy_on_alert(ctx, alert):
    time.sleep(3)
    return [Intent(l.exchange, l.symbol, l.side, l.qty, l.order_type, l.product, l.price,
                   action=alert.execution_type) for l in alert.legs]
'''))
    wait_strategy(h, "sleeper", status="running")
    r, took = timed_post(h, alert(strategy="sleeper"))
    assert r.status_code == 503 and "budget" in r.get_json()["reason"], r.get_json()
    assert 0.9 <= took < 1.6, took  # abandoned after about its budget, not awaited
    r, took = timed_post(h, alert(strategy="someone_else", alert_id="o1"))
    assert r.status_code == 200 and took < 0.5, (r.get_json(), took)
    late = wait_for(lambda: events(h, "plugin_late"), timeout=4)
    assert "strategy_on_alert" in late[0]["message"] and "dropped" in late[0]["message"]
    assert "1 intent" in late[0]["message"] and late[0]["strategy"] == "sleeper"
    assert late[0]["data"]["duration_s"] >= 2.9
    assert [o["strategy"] for o in h.orders()] == ["someone_else"]


def test_an_on_tick_past_its_budget_is_abandoned_and_its_late_intents_are_dropped_and_reported(host_factory):
    h = host_factory(plugin_budget_s=1.0)
    write(h.runtime.strategies.folder, "laggard", slow_tick_strategy("laggard", 3, returns=BUY))
    wait_strategy(h, "laggard", status="running")
    t0 = time.monotonic()
    feed(h, 100)
    r, took = timed_post(h, alert(strategy="someone_else", alert_id="o1"))  # the engine never waits for on_tick
    assert r.status_code == 200 and took < 0.5, (r.get_json(), took)
    slow = wait_for(lambda: events(h, "plugin_slow"), timeout=3)
    assert time.monotonic() - t0 < 1.8  # reported when its budget ran out, not when it ended
    assert "strategy_on_tick" in slow[0]["message"] and slow[0]["strategy"] == "laggard"
    late = wait_for(lambda: events(h, "plugin_late"), timeout=4)
    assert "strategy_on_tick" in late[0]["message"] and "1 intent" in late[0]["message"]
    assert "dropped" in late[0]["message"]
    time.sleep(0.3)
    assert [o["strategy"] for o in h.orders()] == ["someone_else"]  # the late BUY never became an order


def test_ticks_during_a_slow_on_tick_are_coalesced_to_the_latest_per_symbol(host_factory):
    h = host_factory(plugin_budget_s=1.0)
    write(h.runtime.strategies.folder, "chart", slow_tick_strategy("chart", 0.3))
    wait_strategy(h, "chart", status="running")
    for n in range(20):
        feed(h, 100 + n)
        feed(h, 200 + n, symbol=OTHER)
        time.sleep(0.01)
    state = h.runtime.strategies.live("chart").ctx.state
    last = lambda: {sym: ltp for sym, ltp in state.get("seen", [])}  # noqa: E731
    wait_for(lambda: last() == {SYMBOL: "119", OTHER: "219"}, timeout=4)
    time.sleep(0.5)
    seen = state["seen"]
    assert len(seen) <= 8, seen  # 40 ticks, a handful of calls
    for sym in (SYMBOL, OTHER):  # each symbol's prices only move forward
        prices = [int(p) for s, p in seen if s == sym]
        assert prices == sorted(prices) and prices[-1] in (119, 219)


def test_an_alert_for_a_strategy_busy_past_its_budget_fails_with_the_reason_and_another_succeeds(host_factory):
    h = host_factory(plugin_budget_s=1.0)
    write(h.runtime.strategies.folder, "stuck", slow_tick_strategy("stuck", 3))
    wait_strategy(h, "stuck", status="running")
    feed(h, 100)
    wait_for(lambda: events(h, "plugin_slow"), timeout=3)  # its on_tick is past its budget
    answers = {}
    threads = [threading.Thread(target=lambda k=k, body=body: answers.__setitem__(k, timed_post(h, body)))
               for k, body in (("stuck", alert(strategy="stuck", alert_id="s1")),
                               ("other", alert(strategy="someone_else", alert_id="o1")))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    (stuck, stuck_took), (other, other_took) = answers["stuck"], answers["other"]
    assert other.status_code == 200 and other_took < 0.5, (other.get_json(), other_took)
    assert stuck.status_code == 503 and stuck_took < 0.5, (stuck.get_json(), stuck_took)
    reason = stuck.get_json()["reason"]
    assert "busy" in reason and "strategy_on_tick" in reason and "1 s budget" in reason, reason
    assert h.api("/api/alerts", query_string={"strategy": "stuck"}).status_code == 200
    wait_for(lambda: events(h, "plugin_late"), timeout=4)  # the on_tick ended; the alert was never handed over
    time.sleep(0.3)
    assert "alerts" not in h.runtime.strategies.live("stuck").ctx.state
    r, took = timed_post(h, alert(strategy="stuck", alert_id="s2"))  # free again: it trades
    assert r.status_code == 200 and took < 0.5, (r.get_json(), took)
