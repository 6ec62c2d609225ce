"""An ADJUST is relative to the position TradingView believes the strategy holds (alert_positions.py). Live: the
real NorenRestApiPy against the Noren simulator; what is asserted is the broker's net (the simulator's books)
against what the trader meant.

TradingView never sees a trade made in the broker's app. Long 75, the trader sells the 75 there; the strategy's
next ADJUST SELL 75 is the reduction it believes it still has to make. The host used to treat it as an addition on
the flat position and sold 75 more: the account ended short 75.
"""
from __future__ import annotations

import time
from decimal import Decimal

from conftest import SECRET, SYMBOL, wait_for
from test_issue12_live import PUT, broker_net, control, entry, events, live, net, place, wait_status  # noqa: F401


def _long(h, sim, qty: int = 75, strategy: str = "s1") -> None:
    sim.sim.tick("NFO", SYMBOL, Decimal("42.5"))
    wait_status(h, entry(h, strategy=strategy, direction="BUY", qty=qty, price="43", alert_id=f"in-{strategy}"),
                "FILLED")
    wait_for(lambda: net(h, strategy, SYMBOL) == qty, timeout=6)


def _app(sim, side: str, qty: int) -> str:
    """A trade in the broker's app; its broker order number."""
    return control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side=side, qty=qty)["norenordno"]


def _long_then_sold_in_the_app(h, sim, qty: int = 75) -> None:
    _long(h, sim, qty)
    _app(sim, "S", qty)


def _adjust(h, qty: int, alert_id: str, side: str = "SELL", expect: int = 200, **kw) -> dict:
    return place(h, expect=expect, execution_type="ADJUST", strategy="s1", direction=side, qty=qty, order_type="MKT",
                 price=None, alert_id=alert_id, **kw)


def _filled(h, answer: dict) -> None:
    for o in answer.get("orders", []):
        wait_status(h, o["id"], "FILLED", "REJECTED")


def _position(h, target: str, alert_id: str) -> dict:
    """A POSITION alert for s1's target; its answer (200 asserted)."""
    r = h.post({"secret_key": SECRET, "execution_type": "POSITION", "strategy_name": "s1", "exchange": "NFO",
                "alert_id": alert_id, "legs": [{"tradingsymbol": SYMBOL, "position": target, "order_type": "MKT",
                                                "product_type": "M"}]})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def _seen(h) -> None:
    """The host has booked the app's trade to s1."""
    wait_for(lambda: net(h, "s1", SYMBOL) == 0, timeout=8)


def test_an_adjust_right_after_the_app_closed_the_position_does_not_open_a_short(live, sim):
    h = live()
    _long_then_sold_in_the_app(h, sim)
    answer = _adjust(h, 75, "trim")  # at once: the host may not have seen the app's trade yet
    assert answer["orders"] == [], answer
    time.sleep(2)
    assert broker_net(sim, SYMBOL) == 0, "the ADJUST sold the position a second time: account short 75"
    assert net(h, "s1", SYMBOL) == 0


def test_an_adjust_after_the_host_saw_the_app_close_is_cut_and_says_why(live, sim):
    h = live()
    _long_then_sold_in_the_app(h, sim)
    _seen(h)
    answer = _adjust(h, 75, "late")
    assert answer["orders"] == [] and "ADJUST SELL 75 cut to 0" in answer["reason"], answer
    assert "TradingView believes the strategy holds +75 and means flat; it holds flat with its working orders" \
        in answer["reason"], answer
    assert "a trade in the broker's app" in answer["reason"] and "A POSITION alert sets both" in answer["reason"]
    [said] = events(h, "adjust_capped")
    assert said["strategy"] == "s1" and said["severity"] == "warning" and "cut to 0" in said["message"]
    time.sleep(1)
    assert broker_net(sim, SYMBOL) == 0
    [row] = [p for p in h.api("/api/positions").get_json()["alerts_add_up_to"] if p["strategy"] == "s1"]
    assert (row["exchange"], row["symbol"], row["qty"]) == ("NFO", SYMBOL, 0), row


def test_a_reversal_by_adjust_after_the_app_close_sells_only_what_takes_it_to_the_short(live, sim):
    """ADJUST SELL 150 after the app sold the 75: TradingView goes from +75 to -75, so 75 is sold. The next ADJUST
    SELL 75 adds to the short as usual."""
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


def test_one_app_close_of_150_then_two_scale_out_adjusts_of_75_sell_nothing(live, sim):
    """Found from outside: the first ADJUST counted the whole close as used; the second sold 75 (short 75)."""
    h = live()
    _long_then_sold_in_the_app(h, sim, 150)
    wait_for(lambda: net(h, "s1", SYMBOL) == 0, timeout=8)
    assert _adjust(h, 75, "scale1")["orders"] == []
    second = _adjust(h, 75, "scale2")
    _filled(h, second)
    time.sleep(1.5)
    assert second["orders"] == [], second
    assert broker_net(sim, SYMBOL) == 0


def test_two_adjust_legs_in_one_alert_after_the_app_close(live, sim):
    """Two legs of SELL 75 after the app sold the 75: TradingView means -75, so the second leg sells 75."""
    h = live()
    _long_then_sold_in_the_app(h, sim)
    _seen(h)
    leg = {"tradingsymbol": SYMBOL, "direction": "SELL", "qty": 75, "order_type": "MKT", "product_type": "M"}
    r = h.post({"secret_key": SECRET, "execution_type": "ADJUST", "strategy_name": "s1", "exchange": "NFO",
                "alert_id": "two", "legs": [leg, dict(leg)]})
    assert r.status_code == 200, r.get_json()
    answer = r.get_json()
    assert [o["qty"] for o in answer["orders"]] == [75], answer
    assert "cut to 0" in answer["reason"] and "cut to 75" not in answer["reason"], answer
    _filled(h, answer)
    wait_for(lambda: broker_net(sim, SYMBOL) == -75, timeout=6)


def test_a_refused_adjust_still_moves_what_tradingview_believes(live, sim):
    """TradingView never sends an alert again: refused while halted, its ADJUST SELL 150 still took TradingView's
    strategy from +75 to -75. After the resume its ADJUST BUY 75 (to flat, as it believes) sends nothing: the account
    is flat already (it used to buy 75 and leave a long nobody asked for). The refusal says no cut, and no event
    says one."""
    h = live()
    _long_then_sold_in_the_app(h, sim)
    _seen(h)
    assert h.api("/api/halt", "POST", json={"mode": "halted"}).status_code == 200
    refused = _adjust(h, 150, "rev1", expect=423)
    assert "cut" not in refused["reason"], refused
    assert events(h, "adjust_capped") == []
    assert h.api("/api/halt", "POST", json={"mode": "active"}).status_code == 200
    cover = _adjust(h, 75, "cover", side="BUY")
    assert cover["orders"] == [] and "TradingView believes the strategy holds -75" in cover["reason"], cover
    time.sleep(1)
    assert broker_net(sim, SYMBOL) == 0


def test_a_rejected_alert_still_moves_what_tradingview_believes(live, sim):
    """Rejected for its second leg (10 is not a lot), the ADJUST SELL 75 still took TradingView's strategy to flat:
    its next ADJUST SELL 75 opens the short it means."""
    h = live()
    _long_then_sold_in_the_app(h, sim)
    _seen(h)
    sim.sim.tick("NFO", PUT, Decimal("60"))
    adj = {"tradingsymbol": SYMBOL, "direction": "SELL", "qty": 75, "order_type": "MKT", "product_type": "M"}
    body = {"secret_key": SECRET, "execution_type": "ADJUST", "strategy_name": "s1", "exchange": "NFO",
            "alert_id": "two-legs", "legs": [adj, {"tradingsymbol": PUT, "direction": "BUY", "qty": 10,
                                                   "order_type": "MKT", "product_type": "M"}]}
    refused = h.post(body).get_json()
    assert refused["status"] == "rejected" and "legs[1].qty" in refused["reason"], refused
    opened = _adjust(h, 75, "open-short")
    assert [o["qty"] for o in opened["orders"]] == [75], opened
    _filled(h, opened)
    wait_for(lambda: broker_net(sim, SYMBOL) == -75, timeout=6)


def test_a_partly_filled_entry_then_a_trim_sells_what_it_means(live, sim):
    """Found from outside: the trim counted only the filled 75 of ENTRY BUY 150, not the 75 still working, and was
    cut to nothing; when the rest filled the account held 150 where TradingView meant 75."""
    h = live()
    sim.sim.tick("NFO", SYMBOL, Decimal("42.5"))
    control(sim, action="partial", max_fill_qty=75)
    oid = entry(h, strategy="s1", direction="BUY", qty=150, price="43", alert_id="in")
    wait_for(lambda: net(h, "s1", SYMBOL) == 75, timeout=6)
    trim = _adjust(h, 75, "trim")
    assert [o["qty"] for o in trim["orders"]] == [75], trim
    control(sim, action="partial", max_fill_qty=None)
    sim.sim.tick("NFO", SYMBOL, Decimal("42.4"))
    wait_status(h, oid, "FILLED", "CANCELLED")
    _filled(h, trim)
    time.sleep(1)
    assert broker_net(sim, SYMBOL) == 75


def test_after_an_exit_alert_the_next_adjust_opens_as_meant(live, sim):
    """Found from outside: an EXIT after the app's close (nothing left to exit) told TradingView's side of the
    story: the strategy is flat. Its next ADJUST SELL 75 opens the short it means."""
    h = live()
    _long_then_sold_in_the_app(h, sim)
    _seen(h)
    ex = place(h, execution_type="EXIT", strategy="s1", direction="SELL", qty=75, order_type="MKT", price=None,
               alert_id="exit")
    assert ex["orders"] == []
    opened = _adjust(h, 75, "open-short")
    assert [o["qty"] for o in opened["orders"]] == [75], opened
    _filled(h, opened)
    wait_for(lambda: broker_net(sim, SYMBOL) == -75, timeout=6)


def test_after_a_flat_position_alert_the_next_adjust_opens_as_meant(live, sim):
    h = live()
    _long_then_sold_in_the_app(h, sim)
    _seen(h)
    assert _position(h, "0", "flat")["orders"] == []
    opened = _adjust(h, 75, "open-short")
    assert [o["qty"] for o in opened["orders"]] == [75], opened


def test_an_adjust_the_books_capped_before_the_host_saw_the_app_trade_is_not_counted_again(live, sim):
    """Found from outside: the broker's order book lags; the trim ADJUST is capped at the broker's net (0), the
    app's trade is booked to s1 after it. TradingView is flat then: its next ADJUST SELL 75 opens a short."""
    h = live()
    _long(h, sim)
    manual = _app(sim, "S", 75)
    control(sim, action="hide_order", norenordno=manual)
    assert _adjust(h, 75, "trim")["orders"] == []
    control(sim, action="hide_order", norenordno=manual, on=False)
    _seen(h)
    opened = _adjust(h, 75, "open-short")
    assert [o["qty"] for o in opened["orders"]] == [75], opened


def test_an_adjust_naming_another_product_after_the_app_close_sells_nothing(live, sim):
    """Found from outside: the NRML position closed in the app, then ADJUST SELL 75 naming MIS (I): every product of
    the instrument counts together, as TradingView knows no products."""
    h = live()
    _long_then_sold_in_the_app(h, sim)
    _seen(h)
    a = _adjust(h, 75, "mis", product_type="I")
    _filled(h, a)
    time.sleep(1)
    assert a["orders"] == [], a
    assert broker_net(sim, SYMBOL, "I") == 0 and broker_net(sim, SYMBOL) == 0


def test_an_adjust_that_adds_after_an_earlier_outside_close_is_sent_whole(live, sim):
    """A close in the app before the strategy's own later ENTRY is old news: an ADJUST adding now is sent whole."""
    h = live()
    _long_then_sold_in_the_app(h, sim)
    _seen(h)
    wait_status(h, entry(h, strategy="s1", direction="SELL", qty=75, price="42", alert_id="short"), "FILLED")
    [o] = _adjust(h, 75, "add")["orders"]
    assert o["qty"] == 75
    wait_for(lambda: broker_net(sim, SYMBOL) == -150, timeout=6)


def test_a_position_target_after_the_app_closed_the_position_is_still_met(live, sim):
    """A POSITION alert names where to end, whatever happened in the app: -75 from the flat position is a sale of
    75."""
    h = live()
    _long_then_sold_in_the_app(h, sim)
    _seen(h)
    [o] = _position(h, "-75", "short")["orders"]
    assert o["qty"] == 75
    wait_for(lambda: broker_net(sim, SYMBOL) == -75, timeout=6)


def test_an_unfilled_entry_then_a_trim_adjust_opens_nothing(live, sim):
    """The same belief covers an entry that never filled: ENTRY BUY 75 at a limit below the market, cancelled;
    TradingView's strategy (filled in its own emulator) then trims with ADJUST SELL 75: nothing to sell."""
    h = live()
    sim.sim.tick("NFO", SYMBOL, Decimal("42.5"))
    oid = entry(h, strategy="s1", direction="BUY", qty=75, price="30", alert_id="low")
    wait_status(h, oid, "OPEN")
    sim.sim.engine.cancel(sim.sim.engine.find(oid).broker_order_id)  # in the broker's app, say
    wait_status(h, oid, "CANCELLED")
    trim = _adjust(h, 75, "trim")
    assert trim["orders"] == [], trim
    time.sleep(1)
    assert broker_net(sim, SYMBOL) == 0


def test_a_delivery_buy_carried_overnight_can_still_be_trimmed(live, sim):
    """Found from outside: after the day rolls the broker shows yesterday's CNC buy as holdings, which the host does
    not count (the strategy's position reads 0), so the trim was cut to nothing against a belief of +10. Delivery
    ADJUSTs are not cut."""
    h = live()
    sim.sim.tick("NSE", "RELIANCE-EQ", Decimal("2900"))
    body = {"secret_key": SECRET, "execution_type": "ENTRY", "strategy_name": "s1", "exchange": "NSE",
            "alert_id": "in", "legs": [{"tradingsymbol": "RELIANCE-EQ", "direction": "BUY", "qty": 10,
                                        "order_type": "MKT", "product_type": "C"}]}
    r = h.post(body)
    assert r.status_code == 200, r.get_json()
    wait_status(h, r.get_json()["orders"][0]["id"], "FILLED")
    wait_for(lambda: net(h, "s1", "RELIANCE-EQ", "C") == 10, timeout=6)
    control(sim, action="new_day", keep_sessions=True)
    sim.sim.tick("NSE", "RELIANCE-EQ", Decimal("2910"))
    time.sleep(3)
    body.update(execution_type="ADJUST", alert_id="trim")
    body["legs"][0].update(direction="SELL", qty=5)
    r = h.post(body)
    assert r.status_code == 200, r.get_json()
    [o] = r.get_json()["orders"]
    assert o["qty"] == 5
