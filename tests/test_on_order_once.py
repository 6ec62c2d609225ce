"""Plugins hear each change once: strategy_on_order is called once per real change of an order (its status or
its filled quantity), never twice for the same state; a strategy hears its protective stop's orders too."""
from __future__ import annotations

from collections import Counter

import pytest

from conftest import SYMBOL, alert, wait_for
from plugin_files import strategy_source, wait_strategy, write

LISTENER = '''
@hookimpl
def strategy_on_order(ctx, order):
    ctx.state.setdefault("seen", []).append([order.id, order.status.value, order.filled_qty, order.protective])
'''


@pytest.fixture
def paper(host_factory):
    h = host_factory(TRAIL_MIN_INTERVAL_S=0)
    h.tick("42.5")
    return h


def heard(h) -> list:
    live = h.runtime.strategies.live("counter")
    return [tuple(s) for s in live.ctx.state.get("seen", [])] if live else []


def test_entry_partial_fill_fill_and_stop_are_each_heard_once(paper):
    h = paper
    write(h.runtime.strategies.folder, "counter", strategy_source("counter", body=LISTENER))
    wait_strategy(h, "counter", status="running")
    h.broker.engine.max_fill_qty = 25  # the entry fills 25, then 25 more on the next tick, then the rest
    body = alert(strategy="counter", direction="BUY", qty=75, order_type="LMT", price="42.5", stop_loss="40")
    r = h.post(body)
    assert r.status_code == 200, r.get_json()
    entry = r.get_json()["orders"][0]["id"]
    wait_for(lambda: (entry, "PARTIAL", 25, False) in heard(h), timeout=5)
    h.tick("42.5")
    wait_for(lambda: (entry, "PARTIAL", 50, False) in heard(h), timeout=5)
    h.broker.engine.max_fill_qty = None
    h.tick("42.45")
    wait_for(lambda: (entry, "FILLED", 75, False) in heard(h), timeout=5)
    stop = wait_for(lambda: h.runtime.storage.one("select * from orders where protection is not null and status = "
                                                   "'OPEN' and qty = 75"), timeout=5)
    wait_for(lambda: (stop["id"], "OPEN", 0, True) in heard(h), timeout=5)
    h.settle()
    h.tick("42.45")  # more ticks, clock and reconciles: nothing new to hear
    h.settle()
    seen = heard(h)
    twice = [state for state, n in Counter(seen).items() if n > 1]
    assert twice == [], f"heard more than once: {twice} in {seen}"
    mine = [s for s in seen if s[0] == entry]
    assert [s[1:3] for s in mine][-3:] == [("PARTIAL", 25), ("PARTIAL", 50), ("FILLED", 75)], mine
    assert {s[0] for s in seen if s[3]} == {stop["id"]}  # the stop's orders are heard, marked protective
    assert all(s[0] in (entry, stop["id"]) for s in seen)
    h.restart()  # the strategy keeps its state; what it heard before the stop is not told again
    wait_strategy(h, "counter", status="running")
    h.settle()
    h.tick("42.45")
    h.settle()
    assert heard(h) == seen


def test_a_fill_found_only_by_reconciling_is_heard_once(paper):
    """A broker update lost on the way (live: around a feed reconnect): the reconcile finds the fill and the
    strategy hears it, once."""
    h = paper
    write(h.runtime.strategies.folder, "counter", strategy_source("counter", body=LISTENER))
    wait_strategy(h, "counter", status="running")
    engine = h.runtime.engine
    updates = h.broker.engine._listeners
    saved = list(updates)
    updates.clear()  # the broker's updates stop reaching the host
    try:
        r = h.post(alert(strategy="counter", direction="BUY", qty=75, order_type="LMT", price="42.5"))
        entry = r.get_json()["orders"][0]["id"]
        h.tick("42.5")
        wait_for(lambda: h.broker.engine.find_all(entry) and h.broker.engine.find_all(entry)[0].status.value
                 == "FILLED", timeout=5)
    finally:
        updates.extend(saved)
    engine.request_reconcile()
    wait_for(lambda: (entry, "FILLED", 75, False) in heard(h), timeout=5)
    engine.request_reconcile()
    h.settle()
    assert Counter(heard(h))[(entry, "FILLED", 75, False)] == 1
