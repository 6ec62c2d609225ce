"""An exit is capped at the broker's net (a position closed in the broker's app is never sold again), but the net
holds every strategy's positions: another strategy's opposite position must not stop this one's exit.

Live: the real NorenRestApiPy against the Noren simulator. What is asserted is the broker's net (from the
simulator's books) against what the trader meant, and the host's own positions.
"""
from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest

from conftest import SYMBOL, alert, wait_for
from test_issue12_live import booked, broker_net, control, entry, events, live, net, place, wait_status  # noqa: F401


def _opposite(h, sim) -> None:
    """s1 long 75, s2 short 75: the account at the broker is flat."""
    sim.sim.tick("NFO", SYMBOL, Decimal("42.5"))
    wait_status(h, entry(h, strategy="s1", direction="BUY", qty=75, price="43"), "FILLED")
    wait_status(h, entry(h, strategy="s2", direction="SELL", qty=75, price="42"), "FILLED")
    wait_for(lambda: net(h, "s1", SYMBOL) == 75 and net(h, "s2", SYMBOL) == -75)
    assert broker_net(sim, SYMBOL) == 0


def _position(h, strategy: str, target: int, alert_id: str) -> dict:
    r = h.post({"secret_key": "test-webhook-secret", "execution_type": "POSITION", "strategy_name": strategy,
                "exchange": "NFO", "alert_id": alert_id,
                "legs": [{"tradingsymbol": SYMBOL, "position": str(target), "order_type": "MKT", "product_type": "M"}]})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


@pytest.mark.parametrize("how", ["EXIT", "POSITION 0"])
def test_a_strategys_exit_is_not_stopped_by_another_strategys_opposite_position(live, sim, how):
    h = live()
    _opposite(h, sim)
    if how == "EXIT":
        answer = place(h, execution_type="EXIT", strategy="s1", direction="SELL", qty=75, order_type="MKT", price=None)
    else:
        answer = _position(h, "s1", 0, "flat")
    assert answer["status"] == "accepted" and len(answer["orders"]) == 1, answer
    wait_for(lambda: net(h, "s1", SYMBOL) == 0, timeout=6)
    assert broker_net(sim, SYMBOL) == -75  # s2's short, as the trader meant
    assert net(h, "s2", SYMBOL) == -75


def test_opposite_strategies_both_exit_and_the_account_ends_flat(live, sim):
    h = live()
    _opposite(h, sim)
    place(h, execution_type="EXIT", strategy="s1", direction="SELL", qty=75, order_type="MKT", price=None)
    place(h, execution_type="EXIT", strategy="s2", direction="BUY", qty=75, order_type="MKT", price=None)
    wait_for(lambda: net(h, "s1", SYMBOL) == 0 and net(h, "s2", SYMBOL) == 0, timeout=8)
    time.sleep(0.5)
    assert broker_net(sim, SYMBOL) == 0
    assert place(h, strategy="s1", direction="BUY", qty=75, price="43", alert_id="again")["status"] == "accepted"


def test_a_strategy_at_its_max_loss_is_exited_though_another_strategy_offsets_it(live, sim):
    h = live(RISK_STRATEGY_MAX_LOSS="-500", RISK_BASE_MAX_LOSS="-100000")
    _opposite(h, sim)
    for ltp in ("40", "36", "34"):
        sim.sim.tick("NFO", SYMBOL, Decimal(ltp))
        time.sleep(0.5)
    wait_for(lambda: net(h, "s1", SYMBOL) == 0, timeout=10)
    assert broker_net(sim, SYMBOL) == -75 and net(h, "s2", SYMBOL) == -75


def test_two_longs_and_a_sale_in_the_app_still_end_flat_never_short(live, sim):
    """The account's own rule still holds: what the app sold is not sold again by the strategies' exits."""
    h = live()
    sim.sim.tick("NFO", SYMBOL, Decimal("42.5"))
    wait_status(h, entry(h, strategy="s1", direction="BUY", qty=75, price="43"), "FILLED")
    wait_status(h, entry(h, strategy="s2", direction="BUY", qty=75, price="43"), "FILLED")
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)
    place(h, execution_type="EXIT", strategy="s1", direction="SELL", qty=75, order_type="MKT", price=None)
    place(h, execution_type="EXIT", strategy="s2", direction="SELL", qty=75, order_type="MKT", price=None)
    time.sleep(3)
    assert broker_net(sim, SYMBOL) == 0


def test_a_manual_opposite_position_still_caps_the_exit_and_says_so(live, sim):
    """A trade in the broker's app is the trader's and may be the very close of the strategy's position: the exit
    stays capped at the account's net, and an event says so (TradingView keeps no answer)."""
    h = live()
    sim.sim.tick("NFO", SYMBOL, Decimal("42.5"))
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="B", qty=75)
    wait_for(lambda: net(h, "manual", SYMBOL) == 75, timeout=8)
    wait_status(h, entry(h, strategy="s1", direction="SELL", qty=75, price="42"), "FILLED")
    answer = place(h, execution_type="EXIT", strategy="s1", direction="BUY", qty=75, order_type="MKT", price=None)
    assert answer["orders"] == [] and "exit capped from 75 to 0" in answer["reason"], answer
    [said] = events(h, "exit_capped")
    assert "exit capped from 75 to 0" in said["message"] and said["severity"] == "warning"
    time.sleep(1)
    assert broker_net(sim, SYMBOL) == 0


@pytest.mark.parametrize("stop_loss", [None, "38"], ids=["plain", "protected"])
def test_a_reducing_adjust_is_capped_at_the_broker_net_like_an_exit(host, stop_loss):
    """The broker's positions show the sale in the app before its trade is in the books (so nothing has shrunk the
    strategy yet): a reducing ADJUST, a trim held for the stop's cancel included, is cut to what the net allows."""
    from host.flatten import Room
    from host.models import ExecutionType, Intent, OrderType, Product, Side
    host.tick("42.5")
    leg = {"stop_loss": stop_loss} if stop_loss else {}
    assert host.post(alert(strategy="s1", direction="BUY", qty=75, price="43", **leg)).status_code == 200
    wait_for(lambda: net(host, "s1", SYMBOL) == 75, timeout=6)
    key = ("NFO", SYMBOL, "M")
    trim = Intent("NFO", SYMBOL, Side.SELL, 75, OrderType.MKT, Product.NRML, action=ExecutionType.ADJUST)
    decide = host.runtime.engine.decider.evaluate
    d = host.runtime.storage.write(lambda db: decide(db, "s1", [trim], alert_id=None, room=Room({key: 0}, {})))
    assert d.orders == () and "exit capped from 75 to 0" in d.reason, d
    d = host.runtime.storage.write(lambda db: decide(db, "s1", [trim], alert_id=None, room=Room({key: 30}, {})))
    assert "exit capped from 75 to 30" in d.reason, d
    if stop_loss:  # held for the stop's cancel, with the capped quantity
        assert d.orders == ()
        held = host.runtime.storage.one("select pending_exit from protections where strategy = 's1'")["pending_exit"]
        assert json.loads(held)["qty"] == 30
    else:
        assert [o["qty"] for o in host.orders() if o["id"] in d.orders] == [30]


# ---- a sale in the broker's app with a third strategy: the account's zero stays the bound (review 35) ----

def _three(h, sim) -> None:
    sim.sim.tick("NFO", SYMBOL, Decimal("42.5"))
    wait_status(h, entry(h, strategy="a", direction="BUY", qty=75, price="43"), "FILLED")
    wait_status(h, entry(h, strategy="b", direction="SELL", qty=75, price="42"), "FILLED")
    wait_status(h, entry(h, strategy="c", direction="BUY", qty=75, price="43"), "FILLED")
    wait_for(lambda: (net(h, "a", SYMBOL), net(h, "b", SYMBOL), net(h, "c", SYMBOL)) == (75, -75, 75), timeout=6)
    assert broker_net(sim, SYMBOL) == 75


def test_an_unsent_exit_of_a_strategy_closed_in_the_app_is_not_sent_late(live, sim):
    """a +75, b -75, c +75. a's EXIT is stored and not sent (sent late, after a restart or a login); the trader sells
    75 in the app, booked to a. The late exit is cut to what a holds, nothing: it would open a short a never
    entered (an outside trade today: the account's zero is the bound too)."""
    h = live()
    _three(h, sim)
    h.runtime.sender.stop(2)
    answer = place(h, execution_type="EXIT", strategy="a", direction="SELL", qty=75, order_type="MKT", price=None)
    [o] = answer["orders"]
    oid = o["id"]
    time.sleep(0.5)
    assert booked(sim, oid) == []  # never sent
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)
    wait_for(lambda: net(h, "a", SYMBOL) == 0, timeout=8)  # the app's sale closed a (allocate: tie -> name)
    assert broker_net(sim, SYMBOL) == 0
    h.restart()
    time.sleep(4)
    assert booked(sim, oid) == [], "a's exit was sent late though a holds nothing"
    assert broker_net(sim, SYMBOL) == 0


def test_an_exit_right_after_a_close_in_the_app_is_capped_though_a_third_strategy_is_short(live, sim):
    """As test_1b (the order book lags the positions), with a third strategy short: the broker's net no longer
    matches the host's book, so the account's zero is the bound and c's EXIT sends nothing."""
    h = live()
    _three(h, sim)
    manual = control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)["norenordno"]
    control(sim, action="hide_order", norenordno=manual)
    place(h, execution_type="EXIT", strategy="c", direction="SELL", qty=75, order_type="MKT", price=None)
    control(sim, action="hide_order", norenordno=manual, on=False)
    time.sleep(3)
    assert broker_net(sim, SYMBOL) == 0, "the trader's sale in the app was sold again: account short"


def test_the_same_once_the_app_sale_is_booked_to_another_strategy(live, sim):
    """The app's sale is booked to a (by name, on a tie), while the trader meant c: after a trade outside the host
    today, the account's zero is the bound, and c's EXIT sends nothing."""
    h = live()
    _three(h, sim)
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)
    wait_for(lambda: net(h, "a", SYMBOL) == 0, timeout=8)
    answer = place(h, execution_type="EXIT", strategy="c", direction="SELL", qty=75, order_type="MKT", price=None)
    assert answer["orders"] == [], answer
    time.sleep(2)
    assert broker_net(sim, SYMBOL) == 0


def test_an_exit_with_another_strategys_fill_unapplied_and_an_app_sale_is_capped(live, sim):
    """a +75, b -75; b's EXIT fills at the broker unheard (the feed stalls), the trader sells a's 75 in the app, then
    a's EXIT: b's stale -75 must not make room for selling a's 75 again."""
    h = live()
    sim.sim.tick("NFO", SYMBOL, Decimal("42.5"))
    wait_status(h, entry(h, strategy="a", direction="BUY", qty=75, price="43"), "FILLED")
    wait_status(h, entry(h, strategy="b", direction="SELL", qty=75, price="42"), "FILLED")
    wait_for(lambda: (net(h, "a", SYMBOL), net(h, "b", SYMBOL)) == (75, -75), timeout=6)
    control(sim, action="stall_feed", on=True)
    place(h, execution_type="EXIT", strategy="b", direction="BUY", qty=75, order_type="MKT", price=None)["orders"]
    wait_for(lambda: broker_net(sim, SYMBOL) == 75, timeout=6)  # b's exit filled at the broker
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)
    place(h, execution_type="EXIT", strategy="a", direction="SELL", qty=75, order_type="MKT", price=None)
    control(sim, action="stall_feed", on=False)
    time.sleep(4)
    assert broker_net(sim, SYMBOL) == 0, "a's position, sold in the app, was sold again"


# ---- the next day, and late sends (review 36) ----

def test_an_app_sale_booked_to_the_wrong_strategy_is_not_sold_again_the_next_day(live, sim):
    """The commit's own case (test_the_same_once_the_app_sale_is_booked_to_another_strategy), one day later: a +75,
    b -75, c +75 (NRML); the trader sells c's 75 in the app, booked to a by the tie-break. That day c's EXIT sends
    nothing. The next day (the outside fill is yesterday's; positions carried) c's EXIT must still send nothing."""
    h = live()
    _three(h, sim)
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)
    wait_for(lambda: net(h, "a", SYMBOL) == 0, timeout=8)
    assert broker_net(sim, SYMBOL) == 0
    # the host's clock passes midnight IST: the outside fill is now yesterday's (nothing else changes)
    h.runtime.storage.write(lambda db: db.execute("update outside_fills set at = '2000-01-01T00:00:00.000+00:00'"))
    answer = place(h, execution_type="EXIT", strategy="c", direction="SELL", qty=75, order_type="MKT", price=None)
    time.sleep(2)
    assert broker_net(sim, SYMBOL) == 0, ("c's 75, sold in the app yesterday, was sold again: account short", answer)


def test_opposite_nrml_positions_carried_overnight_can_still_exit(live, sim):
    """s1 +75 and s2 -75 NRML, carried to the next trading day: the account is flat, so the broker's positions
    have no row for the instrument. s1's EXIT must still sell its 75 (the commit's headline case), not be capped
    to nothing while s2's stop later leaves the account long."""
    h = live()
    sim.sim.tick("NFO", SYMBOL, Decimal("42.5"))
    wait_status(h, entry(h, strategy="s1", direction="BUY", qty=75, price="43"), "FILLED")
    wait_status(h, entry(h, strategy="s2", direction="SELL", qty=75, price="42"), "FILLED")
    wait_for(lambda: net(h, "s1", SYMBOL) == 75 and net(h, "s2", SYMBOL) == -75)
    control(sim, action="new_day", keep_sessions=True)
    sim.sim.tick("NFO", SYMBOL, Decimal("42.5"))
    time.sleep(2.5)  # a few polls of the new day's books
    assert (net(h, "s1", SYMBOL), net(h, "s2", SYMBOL)) == (75, -75)
    # a flat carried instrument has no row in the broker's positions: a net of 0
    assert ("NFO", SYMBOL, "M") not in h.runtime.engine.outside.read_for_exits().net
    answer = place(h, execution_type="EXIT", strategy="s1", direction="SELL", qty=75, order_type="MKT", price=None)
    assert len(answer["orders"]) == 1, answer
    wait_for(lambda: net(h, "s1", SYMBOL) == 0, timeout=6)
    assert broker_net(sim, SYMBOL) == -75


def test_carried_opposite_positions_max_loss_flatten(live, sim):
    """As above, but the exit is risk's: s1 at its max loss on the next day."""
    h = live(RISK_STRATEGY_MAX_LOSS="-500", RISK_BASE_MAX_LOSS="-100000")
    sim.sim.tick("NFO", SYMBOL, Decimal("42.5"))
    wait_status(h, entry(h, strategy="s1", direction="BUY", qty=75, price="43"), "FILLED")
    wait_status(h, entry(h, strategy="s2", direction="SELL", qty=75, price="42"), "FILLED")
    wait_for(lambda: net(h, "s1", SYMBOL) == 75 and net(h, "s2", SYMBOL) == -75)
    control(sim, action="new_day", keep_sessions=True)
    for ltp in ("42.5", "40", "36", "34"):
        sim.sim.tick("NFO", SYMBOL, Decimal(ltp))
        time.sleep(0.5)
    wait_for(lambda: net(h, "s1", SYMBOL) == 0, timeout=10)
    assert broker_net(sim, SYMBOL) == -75 and net(h, "s2", SYMBOL) == -75


def test_an_unsent_reducing_adjust_of_a_position_closed_in_the_app_is_not_sent_late(live, sim):
    """s1 +75; a reducing ADJUST SELL 75 is stored and not sent (sender stopped: sent late after a restart); the
    trader sells the 75 in the app. Sent late, the ADJUST must be capped as an EXIT is (the commit: reducing ADJUSTs
    are capped like EXITs; a late send is capped), not open a short of 75."""
    h = live()
    sim.sim.tick("NFO", SYMBOL, Decimal("42.5"))
    wait_status(h, entry(h, strategy="s1", direction="BUY", qty=75, price="43"), "FILLED")
    wait_for(lambda: net(h, "s1", SYMBOL) == 75, timeout=6)
    h.runtime.sender.stop(2)
    answer = place(h, execution_type="ADJUST", strategy="s1", direction="SELL", qty=75, order_type="MKT", price=None)
    [o] = answer["orders"]
    time.sleep(0.5)
    assert booked(sim, o["id"]) == []
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)
    wait_for(lambda: net(h, "s1", SYMBOL) == 0, timeout=8)
    assert broker_net(sim, SYMBOL) == 0
    h.restart()
    time.sleep(4)
    assert broker_net(sim, SYMBOL) == 0, "the late ADJUST sold the position a second time: account short 75"


def test_exit_all_with_a_resting_exit_and_an_opposite_strategy(live, sim):
    """s1 +75, s2 -75; s1's EXIT is a limit above the market (now sent: across lets it past the flat account).
    Exit-all crosses s1 and s2 in the host's book; the resting exit must not fill afterwards and leave a short."""
    h = live()
    sim.sim.tick("NFO", SYMBOL, Decimal("42.5"))
    wait_status(h, entry(h, strategy="s1", direction="BUY", qty=75, price="43"), "FILLED")
    wait_status(h, entry(h, strategy="s2", direction="SELL", qty=75, price="42"), "FILLED")
    wait_for(lambda: net(h, "s1", SYMBOL) == 75 and net(h, "s2", SYMBOL) == -75)
    answer = place(h, execution_type="EXIT", strategy="s1", direction="SELL", qty=75, order_type="LMT", price="60")
    [o] = answer["orders"]
    wait_status(h, o["id"], "OPEN")
    r = h.api("/api/exit-all", "POST")
    assert r.status_code == 200
    time.sleep(3)
    for ltp in ("50", "61", "62"):
        sim.sim.tick("NFO", SYMBOL, Decimal(ltp))
        time.sleep(0.7)
    time.sleep(2)
    assert broker_net(sim, SYMBOL) == 0, [(x["id"], x["side"], x["qty"], x["status"]) for x in h.orders()]


def test_a_cap_that_leaves_other_strategies_out_says_why(live, sim):
    h = live()
    _three(h, sim)
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)
    wait_for(lambda: net(h, "a", SYMBOL) == 0, timeout=8)
    answer = place(h, execution_type="EXIT", strategy="c", direction="SELL", qty=75, order_type="MKT", price=None)
    assert "other strategies' -75 there is not counted (a trade outside the host touched this contract" \
        in answer["reason"], answer
