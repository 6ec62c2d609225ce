"""An ADJUST that follows a close in the broker's app (live: NorenRestApiPy against the Noren simulator).

TradingView's strategy never sees a trade made in the broker's app. Long 75, the trader sells the 75 in the app;
the strategy's next ADJUST SELL 75 is the reduction it believes it still has to make. On the flat position that
remains, the host used to treat it as an addition and sold 75 more: the account ended short 75. What is asserted
is the broker's net (the simulator's books) against what the trader meant.
"""
from __future__ import annotations

import time
from decimal import Decimal

from conftest import SYMBOL, wait_for
from test_issue12_live import broker_net, control, entry, events, live, net, place, wait_status  # noqa: F401


def _long_then_sold_in_the_app(h, sim) -> None:
    sim.sim.tick("NFO", SYMBOL, Decimal("42.5"))
    wait_status(h, entry(h, strategy="s1", direction="BUY", qty=75, price="43"), "FILLED")
    wait_for(lambda: net(h, "s1", SYMBOL) == 75, timeout=6)
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)


def _adjust(h, qty: int, alert_id: str) -> dict:
    return place(h, execution_type="ADJUST", strategy="s1", direction="SELL", qty=qty, order_type="MKT", price=None,
                 alert_id=alert_id)


def test_an_adjust_right_after_the_app_closed_the_position_does_not_open_a_short(live, sim):
    h = live()
    _long_then_sold_in_the_app(h, sim)
    answer = _adjust(h, 75, "trim")  # at once: the host may not have seen the app's trade yet
    assert answer["orders"] == [], answer
    assert "counted 75 as done by the trade outside the host" in answer["reason"], answer
    time.sleep(2)
    assert broker_net(sim, SYMBOL) == 0, "the ADJUST sold the position a second time: account short 75"
    assert net(h, "s1", SYMBOL) == 0
    [said] = events(h, "exit_capped")
    assert said["strategy"] == "s1" and "ADJUST SELL 75" in said["message"], said


def test_an_adjust_after_the_app_closed_the_position_a_while_ago_is_also_not_sent(live, sim):
    """The host saw the app's trade well before the alert: the strategy has not traded there since, so its ADJUST
    is still the reduction it believes it has to make."""
    h = live()
    _long_then_sold_in_the_app(h, sim)
    wait_for(lambda: net(h, "s1", SYMBOL) == 0, timeout=8)
    time.sleep(0.5)
    assert _adjust(h, 75, "late")["orders"] == []
    time.sleep(1.5)
    assert broker_net(sim, SYMBOL) == 0


def test_the_close_in_the_app_is_counted_once_and_only_for_its_quantity(live, sim):
    """ADJUST SELL 150 after the app sold the 75: TradingView goes from +75 to -75, so 75 is sold (opening the short
    it meant). Counted once: the next ADJUST SELL 75 adds to the short as usual."""
    h = live()
    _long_then_sold_in_the_app(h, sim)
    [o] = _adjust(h, 150, "reverse")["orders"]
    assert o["qty"] == 75, o
    wait_status(h, o["id"], "FILLED")
    wait_for(lambda: broker_net(sim, SYMBOL) == -75, timeout=6)
    wait_for(lambda: net(h, "s1", SYMBOL) == -75, timeout=6)
    [o2] = _adjust(h, 75, "more")["orders"]
    assert o2["qty"] == 75
    wait_status(h, o2["id"], "FILLED")
    wait_for(lambda: broker_net(sim, SYMBOL) == -150, timeout=6)


def test_an_adjust_that_adds_after_an_earlier_outside_close_is_sent_whole(live, sim):
    """A close in the app before the strategy's own later trades is old news: an ADJUST adding now is sent whole."""
    h = live()
    _long_then_sold_in_the_app(h, sim)
    wait_for(lambda: net(h, "s1", SYMBOL) == 0, timeout=8)
    wait_status(h, entry(h, strategy="s1", direction="SELL", qty=75, price="42", alert_id="short"), "FILLED")
    [o] = _adjust(h, 75, "add")["orders"]
    assert o["qty"] == 75
    wait_for(lambda: broker_net(sim, SYMBOL) == -150, timeout=6)


def test_a_position_target_after_the_app_closed_the_position_is_still_met(live, sim):
    """A POSITION alert names where to end, whatever happened in the app: -75 from the flat position is a sale of
    75, not counted against the app's close."""
    h = live()
    _long_then_sold_in_the_app(h, sim)
    wait_for(lambda: net(h, "s1", SYMBOL) == 0, timeout=8)
    r = h.post({"secret_key": "test-webhook-secret", "execution_type": "POSITION", "strategy_name": "s1",
                "exchange": "NFO", "alert_id": "short",
                "legs": [{"tradingsymbol": SYMBOL, "position": "-75", "order_type": "MKT", "product_type": "M"}]})
    assert r.status_code == 200, r.get_json()
    [o] = r.get_json()["orders"]
    assert o["qty"] == 75
    wait_for(lambda: broker_net(sim, SYMBOL) == -75, timeout=6)
