"""Issue 14: exits that travel with the alert. Stops rest at the broker (SL-LMT, our id in remarks), targets
and trailing are watched on ticks (one-cancels-other: the exit only after the stop's cancel is confirmed),
strategy MTM limits, and every other exit goes around the stops. Paper mode and live mode (the real
NorenRestApiPy against the Noren simulator), and a kill -9 of a real `strategy-host run`."""
from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

import pytest
import requests

from conftest import SYMBOL, alert, wait_for
from host.flatten import HEALED
from test_e2e_gunicorn import noren_sim  # noqa: F401  (the Noren simulator as its own process)
from test_issue12_live import _lowest_net, _sold_in_the_app_unbooked, broker_net, control

D = Decimal


# ---- helpers ----

def protected(h: Any, expect: int = 200, strategy: str = "s1", **leg: Any) -> dict:
    fields = {"direction": "BUY", "qty": 75, "order_type": "LMT", "price": "42.5", **leg}
    top = {k: fields.pop(k) for k in list(fields) if k.startswith("strategy_")}
    body = {**alert(strategy=strategy, **fields), **top}
    r = h.post(body)
    assert r.status_code == expect, r.get_json()
    return r.get_json()


def refuse_exits(h: Any, reason: str = "RMS: exits blocked") -> list:
    """The broker rejects every order but a stop (SL-LMT) while the returned list is not empty (clear() it)."""
    from host.brokers.base import Rejected
    real_place, refusing = h.broker.place, [True]

    def place(req: Any) -> str:
        if refusing and req.order_type.value != "SL-LMT":
            raise Rejected(reason)
        return real_place(req)
    h.broker.place = place
    return refusing


def stops(h: Any, status: tuple = ("NEW", "SUBMITTED", "OPEN", "PARTIAL", "UNKNOWN")) -> list[dict]:
    marks = ",".join("?" * len(status))
    return h.runtime.storage.rows(f"select * from orders where protection is not null and status in ({marks}) "
                                  f"order by rowid", status)


def all_stops(h: Any) -> list[dict]:
    return h.runtime.storage.rows("select * from orders where protection is not null order by rowid")


def resting(h: Any, qty: int = 75) -> dict:
    """The one stop resting at the broker, once it covers qty."""
    return wait_for(lambda: (s := stops(h, ("OPEN", "PARTIAL"))) and len(s) == 1 and s[0]["qty"] == qty
                    and s[0]["broker_order_id"] and s[0], timeout=6)


def paper_order(h: Any, remarks: str) -> Any:
    [o] = [o for o in h.broker.engine._orders.values() if o.req.remarks == remarks]
    return o


def events(h: Any, kind: str) -> list[dict]:
    return h.runtime.storage.rows("select * from events where kind = ? order by id", (kind,))


def history_at(h: Any, oid: str, status: str) -> str:
    return h.runtime.storage.one("select at from order_history where order_id = ? and status = ? order by id",
                                 (oid, status))["at"]


def exits(h: Any, strategy: str = "s1") -> list[dict]:
    return h.runtime.storage.rows("select * from orders where action = 'EXIT' and protection is null and "
                                  "strategy = ? order by rowid", (strategy,))


@pytest.fixture
def paper(host_factory):
    h = host_factory(TRAIL_MIN_INTERVAL_S=0)
    h.tick("42.5")
    return h


# ---- paper mode ----

def test_entry_then_fill_rests_one_sl_lmt_with_our_remarks_and_the_target_exits_flat(paper):
    h = paper
    answer = protected(h, stop_loss="40", target="46")
    entry = answer["orders"][0]["id"]
    stop = resting(h)
    assert stop["order_type"] == "SL-LMT" and stop["side"] == "SELL" and stop["action"] == "EXIT"
    assert D(stop["trigger_price"]) == D("40") and D(stop["price"]) == D("39.2")  # one 2 % step beyond, on the tick
    at_broker = paper_order(h, stop["id"])
    assert at_broker.req.remarks == stop["id"] and at_broker.req.order_type.value == "SL-LMT"
    assert D(str(h.position()["stop_loss"])) == D("40") and D(str(h.position()["target"])) == D("46")
    h.tick("46")
    wait_for(lambda: h.net() == 0, timeout=6)
    h.settle()
    [done] = all_stops(h)
    assert done["status"] == "CANCELLED" and done["filled_qty"] == 0
    [out] = exits(h)
    assert out["status"] == "FILLED" and out["qty"] == 75
    assert out["created_at"] >= history_at(h, done["id"], "CANCELLED")  # the exit only after the cancel
    # moved towards the market until it fills, and healed by risk if an app sale makes it oversized (review 19)
    assert h.runtime.storage.one("select escalate from orders where id = ?", (out["id"],))["escalate"] == HEALED
    assert events(h, "target_hit") and not stops(h)
    assert h.broker.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0
    assert entry


def test_price_to_the_stop_fills_it_and_no_target_exit_is_sent(paper):
    h = paper
    protected(h, stop_loss="40", target="46")
    stop = resting(h)
    h.tick("39.5")
    wait_for(lambda: h.net() == 0, timeout=6)
    h.tick("47")
    time.sleep(0.5)
    h.settle()
    assert [s["status"] for s in all_stops(h)] == ["FILLED"] and stop["id"] == all_stops(h)[0]["id"]
    assert exits(h) == [] and not events(h, "target_hit") and events(h, "stop_hit")
    assert h.broker.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0


@pytest.mark.parametrize("broker_changes_stop_types", [False, True])
def test_a_gap_through_the_stop_moves_it_towards_the_market_until_it_fills(paper, broker_changes_stop_types):
    """Found from outside: a price past the stop's limit left it resting, unfillable, shown as protected.

    A broker that refuses to turn the stop into a limit (the simulator's default) left it there for ever, each
    move failing: the stop is now cancelled and the position exited at market once the cancel has ended."""
    h = paper
    h.broker.engine.stop_type_changes = broker_changes_stop_types
    protected(h, stop_loss="40", target="46")
    stop = resting(h)
    h.tick("36")
    h.tick("36")  # a gap: confirmed by a second print
    wait_for(lambda: h.net() == 0, timeout=8)
    assert events(h, "stop_gapped")
    ended = h.runtime.storage.one("select status from orders where id = ?", (stop["id"],))["status"]
    assert ended == ("FILLED" if broker_changes_stop_types else "CANCELLED")
    assert bool(events(h, "stop_not_moved")) is not broker_changes_stop_types
    h.tick("30")
    h.tick("30")
    h.settle()
    assert h.net() == 0 and not events(h, "stop_placing")[1:]  # no stop placed again once it was cancelled


def test_a_gapped_stop_whose_market_exit_is_rejected_is_not_placed_again_at_once(paper):
    """Review 33: the stop cancelled because the broker would not move it, and the market exit after it rejected,
    protect placed the stop again at once, at the trigger the price had passed: gapped again, refused, cancelled,
    another exit rejected, on every tick. A stop is placed again only after a wait (5, 10 ... 300 s), said."""
    h = paper
    protected(h, stop_loss="40", target="46")
    resting(h)
    real_place = h.broker.place

    def refuse_exits(req):
        from host.brokers.base import Rejected
        if req.order_type.value != "SL-LMT":
            raise Rejected("RMS: blocked for this contract")
        return real_place(req)
    h.broker.place = refuse_exits
    h.tick("36")
    h.tick("36")
    wait_for(lambda: events(h, "exit_rejected"), timeout=8)
    for _ in range(6):
        h.tick("36")
        time.sleep(0.5)
    assert len(all_stops(h)) == 1, [(o["status"], o["created_at"]) for o in all_stops(h)]
    [told] = events(h, "stop_not_moved")
    assert "placed again in 5 s" in told["message"], told
    h.broker.place = real_place
    wait_for(lambda: h.tick("36") and h.net() == 0, timeout=15, interval=0.5)  # the stop again, gapped
    assert len(all_stops(h)) == 2                                                # again: this time the exit goes


def test_a_stop_the_broker_keeps_rejecting_backs_off(paper):
    """Found from outside: a rejected stop was placed again at once, two at a time, with no end."""
    h = paper
    real_place = h.broker.place

    def refuse_stops(req):
        from host.brokers.base import Rejected
        if req.order_type.value == "SL-LMT":
            raise Rejected("RMS: price outside the circuit")
        return real_place(req)
    h.broker.place = refuse_stops
    protected(h, stop_loss="40", target="46")
    time.sleep(7)
    assert 1 <= len(all_stops(h)) <= 2, [(o["status"], o["created_at"]) for o in all_stops(h)]


def test_a_trailing_stop_ratchets_with_the_price_and_never_moves_back(paper):
    h = paper
    protected(h, stop_loss="40", trailing_type="POINTS", trailing_value="2")
    stop = resting(h)
    broker_trigger = lambda: paper_order(h, stop["id"]).req.trigger_price  # noqa: E731
    wait_for(lambda: broker_trigger() == D("40.5"), timeout=5)   # trails from the fill at 42.5
    for ltp, want in (("44", "42"), ("43", "42"), ("42.6", "42"), ("45.5", "43.5"), ("44", "43.5")):
        h.tick(ltp)
        wait_for(lambda: broker_trigger() == D(want), timeout=5)
        time.sleep(0.1)
        assert broker_trigger() == D(want), ltp
    assert [s["id"] for s in all_stops(h)] == [stop["id"]]  # moved by ModifyOrder, never replaced
    assert len(events(h, "stop_moved")) == 3
    h.tick("43.4")
    wait_for(lambda: h.net() == 0, timeout=5)


def test_percent_trailing_waits_for_its_activation_price(paper):
    h = paper
    protected(h, stop_loss_points="2", trailing_type="PERCENT", trailing_value="5", trailing_activation_price="45")
    stop = resting(h)
    assert D(stop["trigger_price"]) == D("40.5")
    h.tick("44.9")
    time.sleep(0.4)
    assert paper_order(h, stop["id"]).req.trigger_price == D("40.5")  # not active yet
    h.tick("46")
    wait_for(lambda: paper_order(h, stop["id"]).req.trigger_price == D("43.7"), timeout=5)  # 46 - 5 %, on the tick


def test_a_partial_fill_protects_exactly_the_filled_quantity(paper):
    h = paper
    h.broker.engine.max_fill_qty = 25
    protected(h, stop_loss="40")
    stop = resting(h, 25)
    assert paper_order(h, stop["id"]).req.qty == 25
    h.tick("42.5")  # the entry fills 25 more
    wait_for(lambda: h.net() == 50 and paper_order(h, stop["id"]).req.qty == 50, timeout=5)
    h.broker.engine.max_fill_qty = None
    h.tick("42.45")
    wait_for(lambda: h.net() == 75 and paper_order(h, stop["id"]).req.qty == 75, timeout=5)
    assert len(all_stops(h)) == 1


def test_an_exit_alert_cancels_the_stop_before_the_exit(paper):
    h = paper
    protected(h, stop_loss="40", target="46")
    stop = resting(h)
    r = h.post(alert("EXIT", direction="SELL", order_type="MKT", price="0"))
    assert r.status_code == 200, r.get_json()
    assert "cancelled first" in r.get_json()["reason"]
    wait_for(lambda: h.net() == 0, timeout=6)
    h.settle()
    [out] = exits(h)
    assert all_stops(h)[0]["status"] == "CANCELLED"
    assert out["created_at"] >= history_at(h, stop["id"], "CANCELLED")
    assert paper_order(h, stop["id"]).status.value == "CANCELLED"


def test_a_rejected_exit_of_a_protected_position_says_it_is_not_retried_and_is_not(paper):
    """Found from outside: the trader's EXIT of a protected position (sent once its stop is cancelled) was rejected
    and the event said "retrying with back-off"; nothing ever retried it. Only risk's own exits after a breach are
    retried: this one says it is not, and the stop is placed again."""
    h = paper
    protected(h, stop_loss="40", target="46")
    resting(h)
    refuse_exits(h, "RMS: no price for a market order")
    assert h.post(alert("EXIT", direction="SELL", order_type="MKT", price="0")).status_code == 200
    wait_for(lambda: events(h, "exit_rejected"), timeout=6)
    again = wait_for(lambda: (s := stops(h, ("OPEN",))) and s[0], timeout=10)  # protected again
    time.sleep(3)  # a retry with back-off would have come within 1 + 2 s
    [said] = events(h, "exit_rejected")
    assert "NOT retried" in said["message"] and "retrying" not in said["message"], said["message"]
    assert len(exits(h)) == 1 and h.net() == 75 and again["qty"] == 75


def test_a_partial_exit_resizes_the_stop(paper):
    h = paper
    protected(h, stop_loss="40")
    resting(h)
    assert h.post(alert("EXIT", direction="SELL", qty=25, order_type="MKT", price="0")).status_code == 200
    wait_for(lambda: h.net() == 50, timeout=6)
    left = resting(h, 50)
    assert paper_order(h, left["id"]).req.qty == 50 and D(left["trigger_price"]) == D("40")


def test_exit_all_cancels_the_resting_stops_first(paper):
    h = paper
    protected(h, stop_loss="40")
    stop = resting(h)
    assert h.api("/api/exit-all", "POST").status_code == 200
    wait_for(lambda: h.net() == 0, timeout=6)
    h.tick("39")  # the stop would have sold again against a closed position
    time.sleep(0.3)
    h.settle()
    assert paper_order(h, stop["id"]).status.value == "CANCELLED"
    assert h.broker.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0


def test_a_reducing_adjust_trims_a_protected_position_and_the_stop_is_resized(paper):
    """Found from outside: the resting stop counted as a working exit, so a trim by ADJUST was dropped (200,
    nothing sent). It is a partial exit: the stop is cancelled first, the trim sent, the rest protected again."""
    h = paper
    protected(h, stop_loss="40")
    stop = resting(h)
    r = h.post(alert("ADJUST", direction="SELL", qty=25, order_type="MKT", price="0"))
    assert r.status_code == 200 and "cancelled first" in r.get_json()["reason"], r.get_json()
    wait_for(lambda: h.net() == 50, timeout=6)
    left = resting(h, 50)
    assert paper_order(h, stop["id"]).status.value == "CANCELLED" and D(left["trigger_price"]) == D("40")
    r = h.post(alert("ADJUST", direction="SELL", qty=500, order_type="MKT", price="0", alert_id="too-much"))
    assert r.status_code == 200, r.get_json()
    wait_for(lambda: h.net() == 0, timeout=6)  # an ADJUST never crosses zero
    h.settle()
    assert h.broker.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0


def test_a_stop_cancelled_by_hand_is_an_error_and_is_placed_again(paper):
    h = paper
    protected(h, stop_loss="40")
    stop = resting(h)
    h.broker.engine.cancel(paper_order(h, stop["id"]).broker_order_id)
    wait_for(lambda: events(h, "stop_cancelled_outside"), timeout=5)
    again = wait_for(lambda: (s := stops(h, ("OPEN",))) and s[0]["id"] != stop["id"] and s[0], timeout=10)
    assert again["qty"] == 75 and D(again["trigger_price"]) == D("40")
    assert events(h, "stop_cancelled_outside")[0]["severity"] == "error"


def test_strategy_mtm_stop_exits_only_that_strategy_and_cancels_its_stops(paper):
    h = paper
    protected(h, strategy="s1", stop_loss="30", strategy_stoploss="100")
    protected(h, strategy="s2", stop_loss="30")
    wait_for(lambda: len(stops(h, ("OPEN",))) == 2, timeout=6)
    h.tick("41")  # s1: 75 x -1.5 = -112.5
    wait_for(lambda: h.net("s1") == 0, timeout=8)
    h.settle()
    assert h.net("s2") == 75
    by = {s["strategy"]: s["status"] for s in all_stops(h)}
    assert by == {"s1": "CANCELLED", "s2": "OPEN"}
    assert events(h, "strategy_stoploss_hit")


def test_strategy_target_and_trailing_step(paper):
    h = paper
    protected(h, strategy="s1", stop_loss="30", strategy_target="150")
    resting(h)
    h.tick("44.5")  # +150
    wait_for(lambda: h.net("s1") == 0, timeout=8)
    assert events(h, "strategy_target_hit")


def test_a_restart_adopts_the_stop_and_trailing_goes_on(host_factory):
    h = host_factory(TRAIL_MIN_INTERVAL_S=0)
    h.tick("42.5")
    protected(h, stop_loss="40", trailing_type="POINTS", trailing_value="2")
    stop = resting(h)
    h.tick("44")
    wait_for(lambda: paper_order(h, stop["id"]).req.trigger_price == D("42"), timeout=5)
    h.restart()
    h.tick("44")
    time.sleep(0.5)
    assert [s["id"] for s in all_stops(h)] == [stop["id"]]
    h.tick("45")
    wait_for(lambda: paper_order(h, stop["id"]).req.trigger_price == D("43"), timeout=5)
    assert len([o for o in h.broker.engine._orders.values() if o.req.remarks == stop["id"]]) == 1


def test_positions_api_and_pages_show_the_protection(paper, host_factory):
    h = paper
    protected(h, stop_loss="40", target="46", trailing_type="POINTS", trailing_value="5")
    stop = resting(h)
    p = h.position()
    assert D(str(p["stop_loss"])) == D("40") and D(str(p["target"])) == D("46")
    assert p["trailing"]["type"] == "POINTS" and p["stop_orders"][0]["id"] == stop["id"]
    assert D(str(p["stop_orders"][0]["trigger_price"])) == D("40")
    from test_dashboard import login
    assert login(h.client).status_code == 302
    page = h.client.get("/panel/positions").get_data(as_text=True)
    assert stop["id"] in page and "40" in page and "46" in page
    orders = h.client.get("/panel/orders").get_data(as_text=True)
    assert "trigger ₹40.00" in orders


GUARDED = '''
from host import hookimpl
from host.models import Intent

@hookimpl
def strategy_meta():
    return {"name": "guarded", "version": "VERSION", "api_version": 1}

@hookimpl
def strategy_on_alert(ctx, alert):
    return [ctx.protect(Intent(**{k: v for k, v in vars(l).items() if k != "protection"}, action=alert.execution_type),
                        stop_loss_points="2.5", target_points="3") for l in alert.legs]
'''  # a strategy that protects every leg through ctx.protect


def test_plugins_protect_through_ctx_protect_and_a_reload_keeps_it(host_factory, data_dir):
    plugins = data_dir.parent / "plugins" / "strategies"
    plugins.mkdir(parents=True, exist_ok=True)
    source = GUARDED
    (plugins / "guarded.py").write_text(source.replace("VERSION", "1.0"))
    h = host_factory(TRAIL_MIN_INTERVAL_S=0)
    h.tick("42.5")
    wait_for(lambda: any(s["name"] == "guarded" and s["status"] == "running"
                         for s in h.api("/api/strategies").get_json()["items"]), timeout=5)
    protected(h, strategy="guarded")
    stop = resting(h)
    assert D(stop["trigger_price"]) == D("40")
    (plugins / "guarded.py").write_text(source.replace("VERSION", "2.0"))
    wait_for(lambda: any(s["name"] == "guarded" and s["version"] == "2.0"
                         for s in h.api("/api/strategies").get_json()["items"]), timeout=8)
    h.tick("45.5")
    wait_for(lambda: h.net("guarded") == 0, timeout=6)
    assert events(h, "target_hit") and all_stops(h)[0]["status"] == "CANCELLED"


# ---- every validation rule: 422 naming the field, the expected value and the value found ----

RULES = [
    ({"stop_loss": "43"}, "legs[0].stop_loss", "below the entry"),
    ({"direction": "SELL", "stop_loss": "42"}, "legs[0].stop_loss", "above the entry"),
    ({"stop_loss": "40", "target": "42"}, "legs[0].target", "profit side"),
    ({"direction": "SELL", "stop_loss": "45", "target": "43"}, "legs[0].target", "profit side"),
    ({"target": "46"}, "legs[0].target", "needs a stop loss"),
    ({"target_points": "3"}, "legs[0].target_points", "needs a stop loss"),
    ({"trailing_type": "POINTS", "trailing_value": "2"}, "legs[0].trailing_type", "trailing moves the stop"),
    ({"stop_loss": "40", "trailing_type": "POINTS"}, "legs[0].trailing_value", "above 0"),
    ({"stop_loss": "40", "trailing_type": "POINTS", "trailing_value": "0"}, "legs[0].trailing_value", "above 0"),
    ({"stop_loss": "40", "trailing_type": "PERCENT", "trailing_value": "150"}, "legs[0].trailing_value", "below 100"),
    ({"stop_loss": "40", "trailing_type": "LADDER", "trailing_value": "2"}, "legs[0].trailing_type", "POINTS | PERCENT"),
    ({"stop_loss": "40", "trailing_value": "2"}, "legs[0].trailing_type", "needs it"),
    ({"stop_loss": "40", "trailing_type": "POINTS", "trailing_value": "1", "trailing_activation_price": "41"},
     "legs[0].trailing_activation_price", "profit"),
    ({"stop_loss": "40", "stop_loss_points": "2"}, "legs[0].stop_loss_points", "only one of"),
    ({"stop_loss_points": "-2"}, "legs[0].stop_loss_points", "above 0"),
    ({"stop_loss_pct": "100"}, "legs[0].stop_loss_pct", "below 100"),
    ({"stop_loss": "abc"}, "legs[0].stop_loss", "price"),
    ({"strategy_stoploss": "-5"}, "strategy_stoploss", "above 0"),
    ({"strategy_trailing_step": "50"}, "strategy_trailing_step", "strategy_stoploss"),
    ({"direction": "SELL", "stop_loss": "45", "target_points": "100"}, "legs[0].target_points", "at or below zero"),
    ({"stop_loss_points": "1000"}, "legs[0].stop_loss_points", "at or below zero"),
    ({"stop_loss": "40", "trailing_type": "POINTS", "trailing_value": "1e9"}, "legs[0].trailing_value", "fewer points"),
    ({"stoploss": "40"}, "legs[0].stoploss", "contract's names"),  # a misspelling is refused, never ignored
    ({"tp": "46"}, "legs[0].tp", "contract's names"),
]


@pytest.mark.parametrize("fields,field,words", RULES, ids=[r[1] + ":" + r[2] for r in RULES])
def test_every_validation_rule_is_a_422_naming_field_expected_found(host, fields, field, words):
    r = protected(host, expect=422, **fields)
    named = {e["field"]: e for e in r["errors"]}
    assert field in named, r
    assert words in named[field]["expected"] and named[field]["found"], named[field]
    assert host.orders() == []


def test_trailing_by_less_than_a_tick_is_refused(host):
    r = protected(host, expect=422, stop_loss="40", trailing_type="POINTS", trailing_value="0.001")
    assert "at least one tick" in json.dumps(r), r
    assert host.orders() == []


def test_exit_fields_on_exit_and_position_alerts_are_refused(host):
    r = host.post(alert("EXIT", stop_loss="40"))
    assert r.status_code == 422 and r.get_json()["errors"][0]["field"] == "legs[0].stop_loss"
    body = {**alert("POSITION", position=75, order_type="MKT"), "strategy_stoploss": "100"}
    body["legs"][0].update(stop_loss="40")
    r = host.post(body)
    fields = {e["field"] for e in r.get_json()["errors"]}
    assert r.status_code == 422 and {"legs[0].stop_loss", "strategy_stoploss"} <= fields


def test_a_market_entry_s_stop_is_checked_against_the_ltp_and_stops_are_on_the_tick(paper):
    """The answer names the field as the alert has it (legs[0], not the host's own intent[0])."""
    r = protected(paper, expect=422, order_type="MKT", price="0", stop_loss="43")
    assert "legs[0].stop_loss: expected a price below the LTP 42.5" in r["reason"]
    r = protected(paper, expect=422, stop_loss="40.03")
    assert "legs[0].stop_loss: expected a multiple of the instrument's tick size 0.05" in r["reason"]
    assert paper.orders() == []


def test_a_bad_second_leg_is_named_by_its_place_in_the_alert(paper):
    """Two legs, the second's stop off the tick: legs[1], though the first leg, a plain entry, comes before it."""
    body = alert(direction="BUY", qty=75, order_type="LMT", price="42.5")
    body["legs"].append({"tradingsymbol": "NIFTY28APR26P24500", "direction": "BUY", "qty": 75, "order_type": "LMT",
                         "price": "42.5", "product_type": "M", "stop_loss": "40.03"})
    r = paper.post(body)
    assert r.status_code == 422, r.get_json()
    assert "legs[1].stop_loss: expected a multiple of the instrument's tick size 0.05" in r.get_json()["reason"]
    assert paper.orders() == []


# ---- found from outside, second round ----

def test_a_market_entry_with_an_absolute_stop_and_no_known_price_is_refused(host):
    """Found from outside: with no LTP the stop-side check was skipped, and a BUY's stop above the market passed."""
    r = protected(host, expect=422, order_type="MKT", price="0", stop_loss="45", target="50")
    assert "legs[0].stop_loss: expected a price checked against the LTP" in r["reason"]
    assert "no last price of NFO:" + SYMBOL in r["reason"] and "found 45" in r["reason"]
    assert "legs[0].target:" in r["reason"] and host.orders() == []
    assert protected(host, order_type="MKT", price="0", stop_loss_points="2")["orders"]  # relative: from the fill


def test_a_market_entry_filled_past_its_stop_is_exited_at_once_with_no_stop_placed(paper):
    """The LTP the check saw was stale; the fill came in below the stop: a stop there could never rest."""
    h = paper
    h.tick("41.5")
    h.runtime.storage.write(lambda db: db.execute("update quotes set ltp = '42.5' where symbol = ?", (SYMBOL,)))
    protected(h, order_type="MKT", price="0", stop_loss="42")
    wait_for(lambda: events(h, "stop_hit"), timeout=6)
    wait_for(lambda: h.net() == 0 and exits(h) and exits(h)[0]["status"] == "FILLED", timeout=6)
    h.settle()
    assert all_stops(h) == [] and "at or past its stop loss 42" in events(h, "stop_hit")[0]["message"]


def test_a_position_alert_leaves_the_resting_stop_alone_and_it_is_resized(paper):
    """Found from outside: a POSITION alert cancelled the protective stop like any working order, which then
    read as a cancel by hand (an error, and a stop placed again)."""
    from test_tradingview_alerts import target
    h = paper
    protected(h, stop_loss="40")
    stop = resting(h)
    r = h.post(target(150, strategy="s1", tradingsymbol=SYMBOL, order_type="MKT"))
    assert r.status_code == 200, r.get_json()
    wait_for(lambda: h.net() == 150 and paper_order(h, stop["id"]).req.qty == 150, timeout=6)
    assert [s["id"] for s in all_stops(h)] == [stop["id"]] and stops(h, ("OPEN",))[0]["qty"] == 150
    r = h.post(target("flat", strategy="s1", tradingsymbol=SYMBOL, order_type="MKT", alert_id="flat"))
    assert r.status_code == 200 and "cancelled first" in r.get_json()["reason"], r.get_json()
    wait_for(lambda: h.net() == 0, timeout=6)
    h.settle()
    assert paper_order(h, stop["id"]).status.value == "CANCELLED"
    assert not events(h, "stop_cancelled_outside") and not events(h, "stop_placing")[1:]


def test_a_breach_counts_a_protected_position_as_exiting_not_left_alone(host_factory):
    """Found from outside: the breach event listed a protected position as "left alone" while its exit waited
    for the stop's cancel."""
    h = host_factory(RISK_BASE_MAX_LOSS="-1000", RISK_TRAIL_STEP="0")
    h.runtime.engine.risk_poll_s = 0.05
    h.tick("100")
    protected(h, qty=100, price="100", stop_loss="80")
    resting(h, 100)
    h.tick("89")
    wait_for(lambda: h.net() == 0, timeout=8)
    [breach] = [e for e in events(h, "exit_all") if "breached" in e["message"]]
    assert "left alone" not in breach["message"], breach["message"]
    assert "1 exits sent once their resting stop is cancelled" in breach["message"]


def test_strategy_mtm_limits_count_from_the_new_day(host_factory):
    """Found from outside: an armed strategy stop kept yesterday's base, so today's carry-over (realised PnL back
    to zero) read as a loss of yesterday's profit and exited the strategy at the open."""
    from test_issue13_risk import _next_trading_day
    h = host_factory(TRAIL_MIN_INTERVAL_S=0)
    h.runtime.engine.risk_poll_s = 0.05
    h.tick("42.5")
    assert h.post(alert(direction="BUY", alert_id="first")).status_code == 200
    wait_for(lambda: h.net() == 75)
    h.tick("44.5")
    assert h.post(alert("EXIT", direction="SELL", order_type="MKT", price="0", alert_id="out")).status_code == 200
    wait_for(lambda: h.net() == 0)  # +150 realised today
    h.tick("42.5")
    protected(h, stop_loss="30", strategy_stoploss="100")
    resting(h)
    _next_trading_day(h)
    wait_for(lambda: events(h, "strategy_limits_rebased"), timeout=8)
    h.tick("42.5")
    time.sleep(0.5)
    assert h.net() == 75 and not events(h, "strategy_stoploss_hit")
    h.tick("41")  # today: 75 x -1.5 = -112.5
    wait_for(lambda: h.net() == 0, timeout=8)
    assert events(h, "strategy_stoploss_hit")


def test_an_exit_while_the_entry_still_fills_also_exits_what_it_fills_afterwards(paper):
    """The entry's cancel races its fill: an EXIT held for the stop's cancel follows up on the late fills."""
    import threading
    h = paper
    engine = h.broker.engine
    engine.max_fill_qty = 25
    entry = protected(h, stop_loss="40")["orders"][0]["id"]
    resting(h, 25)
    real_cancel = h.broker.cancel

    def racing(broker_order_id: str, exchange: str = "") -> None:
        if broker_order_id != paper_order(h, entry).broker_order_id:
            return real_cancel(broker_order_id, exchange)

        def fill_late() -> None:  # the exchange fills the rest before it sees the cancel
            time.sleep(0.5)
            engine.max_fill_qty = None
            engine.set_ltp("NFO", SYMBOL, D("42.5"))
        threading.Thread(target=fill_late, daemon=True).start()
    h.broker.cancel = racing
    r = h.post(alert("EXIT", direction="SELL", qty=75, order_type="MKT", price="0"))
    assert r.status_code == 200, r.get_json()
    wait_for(lambda: paper_order(h, entry).status.value == "FILLED", timeout=6)
    wait_for(lambda: h.net() == 0 and engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0, timeout=8)
    h.settle()
    assert not stops(h, ("OPEN", "PARTIAL"))


# ---- found from outside, third round ----

def _lose_the_first_stop(h: Any) -> None:
    """The stop's PlaceOrder gets no answer, and the broker never books it (UNKNOWN, then LOST, no broker id)."""
    from host.brokers.base import UnknownOutcome
    real_place, lost = h.broker.place, []

    def place(req: Any) -> Any:
        if req.order_type.value == "SL-LMT" and not lost:
            lost.append(req)
            raise UnknownOutcome("ReadTimeout: no answer from PlaceOrder")
        return real_place(req)
    h.broker.place = place


@pytest.mark.parametrize("how", ["exit alert", "exit-all"])
def test_a_lost_stop_is_replaced_and_never_holds_an_exit(host_factory, how):
    """Found from outside: a LOST stop counted as resting, so no stop was placed again, the Positions page showed
    one, and an EXIT (or exit-all) waited for ever for the cancel of an order the broker never had."""
    h = host_factory(TRAIL_MIN_INTERVAL_S=0, unknown_grace_s=1.0)
    h.tick("42.5")
    _lose_the_first_stop(h)
    protected(h, stop_loss="40")
    wait_for(lambda: h.net() == 75 and events(h, "order_lost"), timeout=15)
    again = resting(h)  # a new stop rests at the broker
    assert [o.req.qty for o in h.broker.engine._orders.values() if o.req.order_type.value == "SL-LMT"] == [75]
    assert [o["id"] for o in h.position()["stop_orders"]] == [again["id"]]
    assert "never showed in the broker's book" in events(h, "stop_missing")[0]["message"]
    if how == "exit alert":
        assert h.post(alert("EXIT", direction="SELL", order_type="MKT", price="0", alert_id="out")).status_code == 200
    else:
        assert h.api("/api/exit-all", "POST").status_code == 200
    wait_for(lambda: h.net() == 0, timeout=6)
    h.settle()
    assert h.broker.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0


def test_an_exit_of_one_product_never_closes_the_protected_position_of_another(paper):
    """Found from outside: an EXIT of the unprotected MIS leg was held and sent for the protected NRML leg."""
    h = paper
    assert h.post(alert(direction="BUY", product_type="I", alert_id="mis")).status_code == 200
    wait_for(lambda: any(p["product"] == "I" and p["net_qty"] == 75 for p in h.positions()), timeout=6)
    assert h.post(alert("ADJUST", direction="BUY", product_type="M", stop_loss="40", alert_id="nrml")).status_code == 200
    stop = resting(h)
    r = h.post(alert("EXIT", direction="SELL", order_type="MKT", price="0", product_type="I", alert_id="out-mis"))
    assert r.status_code == 200 and "cancelled first" not in (r.get_json()["reason"] or ""), r.get_json()
    wait_for(lambda: {p["product"]: p["net_qty"] for p in h.positions()} == {"I": 0, "M": 75}
             or {p["product"]: p["net_qty"] for p in h.positions() if p["net_qty"]} == {"M": 75}, timeout=6)
    h.settle()
    assert paper_order(h, stop["id"]).status.value == "OPEN"


def test_exit_all_crossing_two_protected_strategies_cancels_both_stops_at_once(paper):
    """Found from outside: crossed inside the host, both stops kept resting until a later sync; the next print
    filled one and left the account short with every strategy shown flat."""
    h = paper
    protected(h, strategy="s1", stop_loss="40")                    # long 75, SELL stop 40
    protected(h, strategy="s2", direction="SELL", stop_loss="45")  # short 75, BUY stop 45
    resting_two = wait_for(lambda: len(s := stops(h, ("OPEN",))) == 2 and s, timeout=6)
    both = [s["id"] for s in resting_two]
    r = h.api("/api/exit-all", "POST")
    assert r.status_code == 200
    assert sorted(r.get_json()["cancelling"]) == sorted(both), r.get_json()  # both cancels sent in the same step
    wait_for(lambda: h.net("s1") == 0 and h.net("s2") == 0, timeout=5)
    # the price moves once the cancels have reached the broker (one moving before that is the overshoot test below)
    wait_for(lambda: [s["status"] for s in all_stops(h)] == ["CANCELLED", "CANCELLED"], timeout=3)
    h.tick("39.5")
    time.sleep(0.5)
    h.settle()
    assert [s["status"] for s in all_stops(h)] == ["CANCELLED", "CANCELLED"]
    assert h.broker.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0


def test_a_stop_that_fills_after_its_position_was_closed_has_its_overshoot_exited(paper):
    """A cancel that comes too late: the stop fills against a closed position and opens one nobody asked for."""
    h = paper
    protected(h, strategy="s1", stop_loss="40")
    protected(h, strategy="s2", direction="SELL", stop_loss="45")
    s1_stop = wait_for(lambda: [s for s in stops(h, ("OPEN",)) if s["strategy"] == "s1"] or None, timeout=6)[0]
    real_cancel = h.broker.cancel
    h.broker.cancel = lambda bid, exchange="": None if bid == s1_stop["broker_order_id"] else real_cancel(bid)  # lost
    assert h.api("/api/exit-all", "POST").status_code == 200
    wait_for(lambda: h.net("s1") == 0 and h.net("s2") == 0, timeout=5)
    h.tick("39.5")  # s1's stop fills: the account goes short 75
    wait_for(lambda: events(h, "stop_overfilled"), timeout=6)
    wait_for(lambda: h.broker.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0 and h.net("s1") == 0, timeout=8)
    assert events(h, "stop_overfilled")[0]["severity"] == "error"


# ---- live mode: the real NorenRestApiPy against the Noren simulator ----

@pytest.fixture
def live(live_factory):
    return live_factory(TRAIL_MIN_INTERVAL_S=0)


@pytest.fixture
def live_factory(sim, tmp_path):
    from test_issue12_live import live_settings
    from conftest import Host
    started = []

    def make(**env):
        h = Host(live_settings(sim, tmp_path / f"var{len(started)}", **env), broker_timeout_s=1.0, unknown_grace_s=5.0)
        started.append(h)
        h.start()
        wait_for(lambda: not h.api("/api/risk").get_json().get("blind"), timeout=5)
        return h
    yield make
    for h in started:
        h.stop()


def sim_order(sim: Any, remarks: str) -> Any:
    [o] = sim.sim.engine.find_all(remarks)
    return sim.sim.engine.get(o.broker_order_id)


def test_live_stop_rests_at_the_broker_then_the_target_exits_flat(live, sim):
    h = live
    protected(h, stop_loss="40", target="46")
    stop = resting(h)
    at_broker = sim_order(sim, stop["id"])
    assert at_broker.req.order_type.value == "SL-LMT" and at_broker.req.trigger_price == D("40")
    assert at_broker.req.remarks == stop["id"] and at_broker.status.value == "OPEN"
    sim.sim.tick("NFO", SYMBOL, D("46"))
    wait_for(lambda: h.net() == 0, timeout=8)
    wait_for(lambda: sim_order(sim, stop["id"]).status.value == "CANCELLED", timeout=5)
    assert sim.sim.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0
    [out] = exits(h)
    assert out["created_at"] >= history_at(h, stop["id"], "CANCELLED")


def test_live_without_the_symbol_file_a_held_symbol_still_gets_prices_and_its_target_exits(live_factory, sim):
    """Found from outside: when the day's symbol file could not be downloaded, the feed subscribed nothing for a
    held symbol (no token), so no price ever came: no target, no trailing, no gap handling, a loss limit that saw
    0. The feed now asks the broker's SearchScrip for the token."""
    from serverproc import free_port
    h = live_factory(TRAIL_MIN_INTERVAL_S=0, SHOONYA_SYMBOLS_URL=f"http://127.0.0.1:{free_port()}/")  # nothing there
    assert h.broker.instruments.get("NFO", SYMBOL) is None
    protected(h, stop_loss="40", target="46")
    resting(h)
    wait_for(lambda: h.runtime.feed.subscribed, timeout=10)  # the held symbol, by the token SearchScrip gave
    sim.sim.tick("NFO", SYMBOL, D("46"))
    wait_for(lambda: h.net() == 0, timeout=10)
    assert sim.sim.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0 and len(exits(h)) == 1


def test_live_price_to_the_stop_fills_it_and_no_target_exit(live, sim):
    h = live
    protected(h, stop_loss="40", target="46")
    stop = resting(h)
    sim.sim.tick("NFO", SYMBOL, D("39.6"))
    wait_for(lambda: h.net() == 0, timeout=8)
    sim.sim.tick("NFO", SYMBOL, D("47"))
    time.sleep(1)
    assert sim_order(sim, stop["id"]).status.value == "FILLED" and exits(h) == []
    assert sim.sim.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0


def test_live_trailing_ratchets_by_modify_order(live, sim):
    h = live
    protected(h, stop_loss="40", trailing_type="POINTS", trailing_value="2")
    stop = resting(h)
    trigger = lambda: sim_order(sim, stop["id"]).req.trigger_price  # noqa: E731
    wait_for(lambda: trigger() == D("40.5"), timeout=6)
    sim.sim.tick("NFO", SYMBOL, D("44"))
    wait_for(lambda: trigger() == D("42"), timeout=6)
    sim.sim.tick("NFO", SYMBOL, D("43"))
    time.sleep(1)
    assert trigger() == D("42") and len(sim.sim.engine.find_all(stop["id"])) == 1


def test_live_partial_fill_protects_the_filled_quantity_and_exit_alert_cancels_first(live, sim):
    h = live
    sim.sim.engine.max_fill_qty = 75  # F&O fills come in whole lots: one lot of the two
    protected(h, stop_loss="40", qty=150)
    stop = resting(h, 75)
    assert sim_order(sim, stop["id"]).req.qty == 75
    sim.sim.engine.max_fill_qty = None
    sim.sim.tick("NFO", SYMBOL, D("42.5"))
    wait_for(lambda: h.net() == 150 and sim_order(sim, stop["id"]).req.qty == 150, timeout=8)
    assert h.post(alert("EXIT", direction="SELL", qty=150, order_type="MKT", price="0")).status_code == 200
    wait_for(lambda: h.net() == 0, timeout=8)
    assert sim_order(sim, stop["id"]).status.value == "CANCELLED"
    assert sim.sim.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0


def test_live_strategy_mtm_stop_exits_only_that_strategy(live, sim):
    h = live
    protected(h, strategy="s1", stop_loss="30", strategy_stoploss="100")
    protected(h, strategy="s2", stop_loss="30")
    wait_for(lambda: len(stops(h, ("OPEN",))) == 2, timeout=8)
    sim.sim.tick("NFO", SYMBOL, D("41"))
    wait_for(lambda: h.net("s1") == 0, timeout=10)
    assert h.net("s2") == 75
    assert {s["strategy"]: s["status"] for s in all_stops(h)} == {"s1": "CANCELLED", "s2": "OPEN"}


def test_live_a_stop_gone_from_the_book_is_placed_again_and_the_copy_cancelled_when_it_returns(live, sim):
    """A book that loses a resting stop without an update: the position is not left unprotected."""
    from test_issue12_live import control
    h = live
    protected(h, stop_loss="40")
    stop = resting(h)
    control(sim, action="hide_order", norenordno=stop["broker_order_id"])
    again = wait_for(lambda: (s := stops(h, ("OPEN",))) and s[0]["id"] != stop["id"] and s[0], timeout=20)
    assert again["qty"] == 75 and D(again["trigger_price"]) == D("40")
    assert events(h, "order_missing") and events(h, "stop_missing")[0]["severity"] == "error"
    assert h.position()["stop_orders"][0]["id"] == again["id"]
    control(sim, action="hide_order", norenordno=stop["broker_order_id"], on=False)  # it was there all along
    wait_for(lambda: len([o for o in sim.sim.engine.order_book() if o.status.value == "OPEN"]) == 1, timeout=20)
    sim.sim.tick("NFO", SYMBOL, D("39.5"))
    wait_for(lambda: h.net() == 0, timeout=8)
    time.sleep(0.5)
    assert sim.sim.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0  # one stop filled, never two


def test_live_stops_above_the_freeze_quantity_rest_in_slices(live, sim):
    h = live  # NIFTY options: lot 75, freeze 1800 (learnt from GetSecurityInfo), slices strictly below it
    protected(h, qty=2250, stop_loss="40")  # the entry goes in slices, and so does its stop
    wait_for(lambda: h.net() == 2250, timeout=10)
    rest = wait_for(lambda: (s := stops(h, ("OPEN",))) and sum(o["qty"] for o in s) == 2250 and s, timeout=10)
    assert len(rest) >= 2 and all(o["qty"] < 1800 and o["qty"] % 75 == 0 for o in rest), rest
    assert all(sim_order(sim, o["id"]).req.qty == o["qty"] for o in rest)
    sim.sim.tick("NFO", SYMBOL, D("39.5"))
    wait_for(lambda: h.net() == 0, timeout=10)
    assert sim.sim.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0


# ---- kill -9 of a real `strategy-host run` (live, against a simulator process) ----

@pytest.mark.slow
def test_kill_9_with_a_stop_resting_then_restart_adopts_it_and_trailing_goes_on(tmp_path, noren_sim):
    from urllib.parse import urlparse
    from test_e2e_gunicorn import _alert
    from serverproc import ServerProcess
    urls, control = noren_sim
    port = urlparse(urls["SHOONYA_API_URL"]).port

    def book() -> list:
        """The simulator's order book: an empty book is Not_Ok "no data"; any other answer fails, saying what."""
        answer = requests.post(urls["SHOONYA_API_URL"] + "OrderBook", data='jData={"uid":"FA12345"}',
                               headers={"Authorization": "Bearer e2e-token"}, timeout=5).json()
        if isinstance(answer, dict) and answer.get("emsg") == "no data":
            return []
        assert isinstance(answer, list), f"the simulator's OrderBook answered {answer!r}"
        return answer
    env = {"BROKER": "shoonya", "SHOONYA_AUTH": "token", "USER_ID": "FA12345", "SHOONYA_ACCESS_TOKEN": "e2e-token",
           "SQUARE_OFF_TIME": "off", "TRAIL_MIN_INTERVAL_S": "0", "SHOONYA_SYMBOLS_URL": f"http://127.0.0.1:{port}/",
           "ALLOW_AMO": "true",  # any hour: after-market orders when the exchange is closed
           **urls}

    def moved_to(ltp: str, trigger: str) -> bool:  # the feed subscribes held symbols within 2 s: tick until seen
        control(action="tick", exchange="NFO", symbol=SYMBOL, ltp=ltp)
        time.sleep(0.2)
        return D(stop_at_broker()[0]["trgprc"]) == D(trigger)

    def stop_at_broker() -> Any:
        rows = [o for o in book() if isinstance(o, dict) and o.get("prctyp") == "SL-LMT"]
        return rows if rows else None
    servers = []
    try:
        s = ServerProcess(tmp_path, env=env).start()
        servers.append(s)
        secret = s.secrets()["WEBHOOK_SECRET"]
        control(action="tick", exchange="NFO", symbol=SYMBOL, ltp="42.5")
        body = _alert(secret, strategy="crash", direction="BUY")
        body["legs"][0].update(stop_loss="40", trailing_type="POINTS", trailing_value="2")
        r = s.webhook(body)
        assert r.status_code == 200, r.text

        try:
            first = wait_for(stop_at_broker, timeout=10)
        except AssertionError as exc:
            sim_log = (tmp_path / "noren-sim.log").read_text()[-3000:]
            raise AssertionError(f"{exc}\nbroker book: {book()}\n{s.explain()}\nsimulator: {sim_log}") from None
        assert len(first) == 1 and first[0]["remarks"].startswith("o")
        wait_for(lambda: moved_to("44", "42"), timeout=15)
        s.kill9()
        s2 = ServerProcess(tmp_path, env=env).start()
        servers.append(s2)
        wait_for(lambda: moved_to("45", "43"), timeout=15)
        after = stop_at_broker()
        assert len(after) == 1 and after[0]["remarks"] == first[0]["remarks"]  # adopted, not placed again
        positions = s2.api("/api/positions").json()["items"]
        [p] = [p for p in positions if p["strategy"] == "crash"]
        assert p["stop_orders"][0]["id"] == first[0]["remarks"]
    finally:
        for srv in servers:
            srv.stop()


@pytest.mark.slow
def test_a_hot_reload_under_gunicorn_keeps_the_protection(tmp_path):
    """`strategy-host run` (gunicorn): the strategy file changes while its stop rests; the new version takes
    over, the stop is neither cancelled nor placed twice, and the target still exits one-cancels-other."""
    from serverproc import ServerProcess
    from test_e2e_gunicorn import _alert
    folder = tmp_path / "plugins" / "strategies"
    folder.mkdir(parents=True)
    source = GUARDED
    (folder / "guarded.py").write_text(source.replace("VERSION", "1.0"))
    s = ServerProcess(tmp_path).start()
    try:
        def tick(ltp: str) -> None:
            assert s.api("/api/paper/ticks", "POST", json=[{"exchange": "NFO", "symbol": SYMBOL, "ltp": ltp}]).ok

        def version() -> str:
            return next((x["version"] for x in s.api("/api/strategies").json()["items"] if x["name"] == "guarded"), "")

        def position() -> dict:
            return next((p for p in s.api("/api/positions").json()["items"] if p["strategy"] == "guarded"), {})
        wait_for(lambda: version() == "1.0", timeout=10)
        tick("42.5")
        assert s.webhook(_alert(s.secrets()["WEBHOOK_SECRET"], strategy="guarded")).status_code == 200
        first = wait_for(lambda: (p := position()) and p.get("stop_orders") and p["stop_orders"][0]["status"] == "OPEN"
                         and p, timeout=10)
        assert D(str(first["stop_loss"])) == D("40") and D(str(first["target"])) == D("45.5")
        (folder / "guarded.py").write_text(source.replace("VERSION", "2.0"))
        wait_for(lambda: version() == "2.0", timeout=10)
        again = position()
        assert again["stop_orders"] == first["stop_orders"] and again["net_qty"] == 75
        tick("45.5")
        wait_for(lambda: position().get("net_qty") == 0, timeout=10)
        orders = s.api("/api/orders", params={"limit": 50}).json()["items"]
        stop = [o for o in orders if o["id"] == first["stop_orders"][0]["id"]]
        assert stop and stop[0]["status"] == "CANCELLED"
        assert len([o for o in orders if o.get("order_type") == "SL-LMT"]) == 1
    finally:
        s.stop()


def test_live_a_partial_close_in_the_app_resizes_the_stop_before_the_next_position_poll(live_factory, sim):
    """Found from outside: the trader sold half in the broker's app, and the stop (still for the whole) was hit
    before the next position poll (RISK_POLL_S): it sold the whole, taking the account short. The app's fill comes
    over the feed at once: the books are read then, and the stop is resized within a couple of seconds."""
    h = live_factory(TRAIL_MIN_INTERVAL_S=0, RISK_POLL_S=60)
    protected(h, qty=150, stop_loss="40")
    stop = resting(h, qty=150)
    sim.sim.tick("NFO", SYMBOL, D("42.5"))
    requests.post(f"http://127.0.0.1:{sim.port}/sim/control", timeout=5, json={
        "action": "manual_order", "exchange": "NFO", "symbol": SYMBOL, "side": "S", "qty": 75}).raise_for_status()
    wait_for(lambda: sim_order(sim, stop["id"]).req.qty == 75, timeout=4)  # well before the 60 s poll
    sim.sim.tick("NFO", SYMBOL, D("39.6"))  # through the stop
    wait_for(lambda: sim_order(sim, stop["id"]).status.value == "FILLED", timeout=6)
    time.sleep(1.0)
    assert sim.sim.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0


def test_a_rejected_target_exit_waits_before_it_is_tried_again_not_at_every_tick(paper):
    """Found from outside: while the broker rejected exits, every tick at the target cancelled the stop, sent an
    exit (rejected) and placed the stop again: 8 ticks, 8 exits, 9 stops, 8 errors. The target now waits 5, 10,
    20 ... s after a rejection, said once each time; the stop stays meanwhile."""
    h = paper
    protected(h, stop_loss="40", target="46")
    resting(h)
    refuse_exits(h)
    for price in ("46", "46.5", "47", "46.2", "46.8", "47.1", "46.4", "46.9"):
        h.tick(price)
        time.sleep(0.3)
    again = resting(h)  # protected again
    assert len(exits(h)) == 1, [(o["id"], o["status"]) for o in exits(h)]
    [said] = events(h, "target_exit_rejected")
    assert "tried again in 5 s" in said["message"] and "RMS: exits blocked" in said["message"], said["message"]
    assert events(h, "exit_rejected") == []  # not also "NOT retried"
    time.sleep(5.0)
    h.tick("46.6")
    wait_for(lambda: len(exits(h)) == 2, timeout=3)  # tried again after the wait
    wait_for(lambda: len(events(h, "target_exit_rejected")) == 2, timeout=3)
    assert "tried again in 10 s" in events(h, "target_exit_rejected")[1]["message"]
    assert again["qty"] == 75 and h.net() == 75


def test_a_targets_wait_ends_with_its_position_and_a_new_position_exits_at_its_own_target(paper):
    """Found in review: the wait after a rejected target exit was kept by instrument, so a new position there had
    its target ignored for up to 5 minutes. The wait belongs to the protection it was set for."""
    h = paper
    protected(h, stop_loss="40", target="46")
    resting(h)
    refusing = refuse_exits(h)
    h.tick("46")
    wait_for(lambda: len(events(h, "target_exit_rejected")) == 1, timeout=3)
    resting(h)
    refusing.clear()
    h.tick("39.5")  # the stop fills: flat, the protection done
    wait_for(lambda: h.net() == 0, timeout=4)
    h.settle()
    h.tick("42.5")
    protected(h, stop_loss="40", target="46", alert_id="second-entry")
    resting(h)
    h.tick("46")
    wait_for(lambda: h.net() == 0, timeout=3)  # within the first position's 5 s wait


def test_live_a_target_exit_the_broker_rejects_is_said_once(live_factory, sim):
    """Found in review: a target exit rejected at the broker was said twice, 'tried again in 5 s' and risk's 'NOT
    retried', because the sender's answer and the broker's update each brought the rejected order. Once now."""
    h = live_factory(TRAIL_MIN_INTERVAL_S=0)
    protected(h, stop_loss="40", target="46")
    resting(h)
    requests.post(f"http://127.0.0.1:{sim.port}/sim/control", timeout=5,
                  json={"action": "reject_next", "reason": "RED:Margin Shortfall"}).raise_for_status()
    sim.sim.tick("NFO", SYMBOL, D("46"))
    wait_for(lambda: len(events(h, "target_exit_rejected")) == 1, timeout=4)
    resting(h)
    time.sleep(1.5)  # the broker's update of the rejected order comes too
    assert events(h, "exit_rejected") == [] and len(events(h, "target_exit_rejected")) == 1


def test_two_trims_held_for_the_stop_both_go(paper):
    """Found from outside: TP1 and TP2 (two ADJUST SELL 50 of a protected 150) both waited for the stop's cancel;
    the second replaced the first (the larger of the two was kept), so only 50 was sold and 100 stayed open."""
    h = paper
    protected(h, qty=150, stop_loss="40")
    resting(h, 150)
    body = alert(execution_type="ADJUST", direction="SELL", qty=50, order_type="MKT", price=None, alert_id="tp")
    body["legs"].append(dict(body["legs"][0]))
    r = h.post(body)
    assert r.status_code == 200, r.get_json()
    h.tick("42.5")
    wait_for(lambda: h.net() == 50, timeout=8)
    time.sleep(1)
    assert h.net() == 50
    assert wait_for(lambda: (s := stops(h, ("OPEN",))) and s[0]["qty"] == 50 and s[0], timeout=8)


def _target_after_an_app_sale(make: Any, sim: Any, held: int, sold: int, blind: bool = False,
                              **env: Any) -> tuple[Any, str, dict]:
    """`held` protected (stop 40, target 46); the trader sells `sold` in the broker's app and the feed loses that
    order's update (not adopted until a poll); then (blind: with the positions unreadable) the target is reached.
    The host, the app order's number, and the protected_exit event once the stop's cancel is done."""
    h = make(TRAIL_MIN_INTERVAL_S=0, **env)
    protected(h, qty=held, stop_loss="40", target="46")
    stop = resting(h, qty=held)
    control(sim, action="stall_feed", on=True)  # the app's order update is lost on the way
    manual = _sold_in_the_app_unbooked(sim, sold)
    control(sim, action="stall_feed", on=False)
    assert broker_net(sim, SYMBOL) == held - sold
    if blind:
        control(sim, action="forbid_next", count=1000, route="PositionBook")
    sim.sim.tick("NFO", SYMBOL, D("46"))  # the target: the stop is cancelled, then the position exited at market
    wait_for(lambda: sim_order(sim, stop["id"]).status.value == "CANCELLED", timeout=5)
    [said] = wait_for(lambda: events(h, "protected_exit"), timeout=8)
    return h, manual, said


@pytest.mark.parametrize("held, sold", [(75, 75), (150, 75)])
def test_live_a_target_exit_after_a_close_in_the_app_never_takes_the_account_short(live_factory, sim, held, sold):
    """Noticed for many sessions, fixed now: a target's market exit (sent once its stop's cancel was confirmed) was
    the strategy's own net, not capped at the broker's. The trader sold in the broker's app, and the feed lost that
    order's update (so no read of the books was made, and the sale was not adopted before the next position poll):
    the target sold the whole again, short 75. It is capped at the broker's net, read once the stop has ended, as
    an EXIT alert's is: what is left is sold, no more."""
    h, manual, said = _target_after_an_app_sale(live_factory, sim, held, sold, RISK_POLL_S=60)
    lowest = _lowest_net(sim, 1.5)
    control(sim, action="hide_order", norenordno=manual, on=False)
    assert lowest == 0, (lowest, said["message"])
    assert f"exit of {held} cut to {held - sold}" in said["message"], said["message"]
    assert f"exit capped from {held} to {held - sold}" in said["message"], said["message"]
    assert [o["qty"] for o in exits(h)] == ([held - sold] if held > sold else [])


# ---- from review of the held-exit cap: each failed on its first form ----

def test_a_cut_target_exit_places_no_stop_for_what_the_app_already_sold(live_factory, sim):
    """150 held behind a stop at 40; the trader sells 75 in the app (its update lost); the target is reached. The exit
    is cut to 75, and the stop placed again covers what the broker still holds (0), not the host's own net less the
    exit: the price falling back through 40 sells nothing more. (On 9d37c57 a stop of 75 was placed: short 75.)"""
    h, manual, said = _target_after_an_app_sale(live_factory, sim, 150, 75, RISK_POLL_S=5)  # the default poll
    assert "cut to 75" in said["message"], said["message"]
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=5)  # the cut exit filled: flat at the broker
    time.sleep(1.0)
    again = stops(h, ("NEW", "SUBMITTED", "OPEN", "PARTIAL"))  # the first stop was cancelled at the target
    # the price falls back through the stop before the host adopted the app's sale
    sim.sim.tick("NFO", SYMBOL, D("39.9"))
    lowest = _lowest_net(sim, 2.0)
    control(sim, action="hide_order", norenordno=manual, on=False)
    assert lowest == 0, (lowest, [(s["qty"], s["status"]) for s in again])


def test_a_target_exit_cut_to_nothing_places_no_stop_for_what_the_app_sold(live_factory, sim):
    """75 held behind a stop at 40; the trader sells all 75 in the app (its update lost); the target is reached. The
    exit is cut to 0, which is not reported as an error (exit_capped says why), and no stop is placed on the flat
    account. (On 9d37c57: a target_exit_rejected error, and a stop of 75 that took the account short.)"""
    h, manual, said = _target_after_an_app_sale(live_factory, sim, 75, 75, RISK_POLL_S=5)  # the default poll
    time.sleep(1.5)
    rejected = [e["message"] for e in events(h, "target_exit_rejected")]
    again = [(s["qty"], s["status"]) for s in stops(h, ("NEW", "SUBMITTED", "OPEN", "PARTIAL"))]
    sim.sim.tick("NFO", SYMBOL, D("39.9"))
    lowest = _lowest_net(sim, 2.0)
    control(sim, action="hide_order", norenordno=manual, on=False)
    assert lowest == 0, (lowest, again, said["message"], rejected)
    assert rejected == [] and again == [], (rejected, again)  # exit_capped said why; no stop for a flat account
    assert "the broker holds 0 of it" in said["message"], said["message"]


def _target_exit_waits(h: Any, sim: Any, stop: dict) -> float:
    """The target is reached: seconds from its stop's cancel until the exit is stored (a failure after 20 s)."""
    sim.sim.tick("NFO", SYMBOL, D("46"))
    wait_for(lambda: sim_order(sim, stop["id"]).status.value == "CANCELLED", timeout=15)
    cancelled = time.monotonic()
    wait_for(lambda: exits(h), timeout=20)
    return time.monotonic() - cancelled


def test_a_held_exit_whose_engine_is_a_second_late_is_still_sent(live_factory, sim):
    """The target is reached, the stop cancelled, and the exit waits for a read of the books. The engine is busy 1.2 s
    as each read ends (for real: its reconcile of a slow order book, a slow plugin hook), so the view is taken more
    than FRESH_S after it ended. It is used, on the first read. (On 9d37c57 each late view was thrown away and read
    again with no bound: 17 reads and no exit after 20 s, with no stop resting.)"""
    h = live_factory(TRAIL_MIN_INTERVAL_S=0, RISK_POLL_S=5)
    engine = h.runtime.engine
    protected(h, qty=75, stop_loss="40", target="46")
    stop = resting(h, qty=75)
    reads, real = [], engine.exit_reads._read

    def read_then_engine_busy():  # type: ignore[no-untyped-def]
        view = real()
        reads.append(time.monotonic())
        engine.submit(lambda: time.sleep(1.2))  # the engine is busy a little longer than FRESH_S as the read ends
        return view
    engine.exit_reads._read = read_then_engine_busy
    try:
        waited = _target_exit_waits(h, sim, stop)
    finally:
        engine.exit_reads._read = real
    assert waited < 5 and len(reads) == 1, (waited, len(reads))  # the first read, however late it was taken


@pytest.mark.parametrize("app_trade_before", [False, True])
def test_a_target_exit_with_another_strategy_short_the_same_contract(live_factory, sim, app_trade_before):
    """From review: s1 long 75 with a stop and a target, s2 short 75 in the same contract (the account is flat there).
    s1's target sells its 75 (the account then holds s2's short), as an EXIT alert of s1's would. Once a trade in the
    broker's app has touched the contract, which strategy it closed is a guess, and the other strategies' holdings
    are not counted: the exit is bounded by the account's zero, as an EXIT alert's is, and the trader is told why."""
    h = live_factory(TRAIL_MIN_INTERVAL_S=0, RISK_POLL_S=1)
    if app_trade_before:
        control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="B", qty=75)
        control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)
        wait_for(lambda: h.runtime.storage.one("select count(*) n from outside_fills")["n"] >= 2, timeout=10)
    protected(h, qty=75, stop_loss="40", target="46")
    stop = resting(h, qty=75)
    protected(h, strategy="s2", direction="SELL", qty=75, order_type="MKT", price=None)
    wait_for(lambda: h.net("s2") == -75 and broker_net(sim, SYMBOL) == 0, timeout=8)
    sim.sim.tick("NFO", SYMBOL, D("46"))
    wait_for(lambda: sim_order(sim, stop["id"]).status.value == "CANCELLED", timeout=5)
    [said] = wait_for(lambda: events(h, "protected_exit"), timeout=8)
    time.sleep(1.5)
    if not app_trade_before:
        assert h.net("s1") == 0 and broker_net(sim, SYMBOL) == -75, (h.net("s1"), said["message"])
    else:
        assert broker_net(sim, SYMBOL) == 0 and "exit of 75 cut to 0" in said["message"], said["message"]
        assert "not counted (a trade outside the host touched this contract" in said["message"], said["message"]
        assert events(h, "target_exit_rejected") == []  # not a refusal: exit_capped said why
        assert any("exit capped from 75 to 0" in e["message"] for e in events(h, "exit_capped"))
        resting(h, qty=75)  # the host's book explains the broker's net: s1 is protected again at once


def test_a_held_exit_sent_blind_says_it_was_not_capped(live_factory, sim):
    """The broker's positions cannot be read (PositionBook answers 403: blind) when the target is reached. The held
    exit goes by the strategy's own position, uncapped (a stop no longer rests), and protected_exit says so, as a
    warning. (On 9d37c57 it said "exit of 150 sent (accepted)", info, while it took the account short 75.)"""
    h, manual, said = _target_after_an_app_sale(live_factory, sim, 150, 75, blind=True, RISK_POLL_S=60)
    time.sleep(1.0)
    control(sim, action="forbid_next", count=0, route="PositionBook")
    control(sim, action="hide_order", norenordno=manual, on=False)
    net = broker_net(sim, SYMBOL)
    assert said["severity"] == "warning" and "not capped at the broker's net: the broker's positions are unreadable" \
        in said["message"], (net, said["severity"], said["message"])


def test_a_slow_order_book_does_not_hold_a_target_exit_with_no_stop(sim, tmp_path):
    """End to end: the broker answers OrderBook in 2.5 s (under the 5 s timeout) and another strategy's order rests,
    so the engine reconciles with the slow book every 2 s. The target's exit still goes within the read's wait.
    (On 9d37c57 each read ended during a reconcile, was taken too late and thrown away: the exit went 61.8 s after
    the stop's cancel, the position with neither a stop nor an exit meanwhile.)"""
    from conftest import Host
    from test_issue12_live import live_settings
    h = Host(live_settings(sim, tmp_path / "v", TRAIL_MIN_INTERVAL_S=0, RISK_POLL_S=5), broker_timeout_s=5.0,
             unknown_grace_s=5.0)
    h.start()
    try:
        wait_for(lambda: not h.api("/api/risk").get_json().get("blind"), timeout=5)
        protected(h, qty=75, stop_loss="40", target="46")
        stop = resting(h, qty=75)
        protected(h, strategy="s2", qty=75, price="30", stop_loss="25")  # a limit entry resting below the market
        wait_for(lambda: any(o["strategy"] == "s2" and o["status"] == "OPEN" for o in h.orders()), timeout=5)
        control(sim, action="slow_next", seconds=2.5, count=100000, route="OrderBook")
        assert _target_exit_waits(h, sim, stop) < h.runtime.engine.protect.read_wait_s + 1
    finally:
        control(sim, action="slow_next", seconds=0, count=0, route="OrderBook")
        h.stop()


# ---- from the second review (the stop after a capped exit); each failed on 0358f13 ----

def _on_the_held_read(engine: Any, before: Any) -> list:
    """Run before() on the exit-reads thread just before the first read made for a held exit (protect:...)."""
    real, seen = engine.exit_reads._read, []

    def read():  # type: ignore[no-untyped-def]
        if not seen and any(k.startswith("protect:") for k in engine.exit_reads._reading):
            seen.append(time.monotonic())
            before()
        return real()
    engine.exit_reads._read = read
    return seen


def _trim(h: Any, qty: int, strategy: str = "s1") -> dict:
    r = h.post(alert(execution_type="EXIT", strategy=strategy, direction="SELL", qty=qty, order_type="MKT",
                     price=None))
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def _trim_while_another_strategy_fills(make: Any, sim: Any) -> Any:
    """s1 holds 150 behind a stop at 40; s2's limit entry (75, same contract) rests at 41. The trader trims s1 by 75
    (EXIT alert): the stop is cancelled, the trim held for one read of the books. s2's entry fills at the broker a
    moment before that read, while the engine is busy (its update not yet applied): the host's book is right, a few
    hundred ms behind, and nothing was traded in the broker's app. The host, once the trim filled."""
    h = make(TRAIL_MIN_INTERVAL_S=0, RISK_POLL_S=5)
    engine = h.runtime.engine
    protected(h, qty=150, stop_loss="40", target="46")
    resting(h, qty=150)
    protected(h, strategy="s2", qty=75, price="41")
    wait_for(lambda: any(o["strategy"] == "s2" and o["status"] == "OPEN" for o in h.orders()), timeout=5)

    def s2_fills_while_the_engine_is_busy() -> None:
        engine.submit(lambda: time.sleep(0.5))
        time.sleep(0.05)
        sim.sim.tick("NFO", SYMBOL, D("41"))  # s2's buy at 41 fills at the broker
    seen = _on_the_held_read(engine, s2_fills_while_the_engine_is_busy)
    _trim(h, 75)
    wait_for(lambda: exits(h) and exits(h)[0]["status"] == "FILLED", timeout=8)
    if not seen:  # before the change (83a0345) there is no held read: s2 fills as the trim goes
        s2_fills_while_the_engine_is_busy()
    return h


def test_another_strategys_fill_in_flight_leaves_the_rest_protected(live_factory, sim):
    """s1's remaining 75 is protected again at once, as before the held read (on 0358f13: no stop for 11 s)."""
    h = _trim_while_another_strategy_fills(live_factory, sim)
    sent = time.monotonic()
    wait_for(lambda: h.net("s2") == 75 and h.net("s1") == 75, timeout=5)  # the host's book caught up
    [said] = events(h, "protected_exit")
    try:
        wait_for(lambda: [s for s in stops(h, ("OPEN",)) if s["qty"] == 75], timeout=4)
    except AssertionError:
        raise AssertionError(f"s1's 75 has no stop {time.monotonic() - sent:.1f} s after its trim; "
                             f"protected_exit: {said['message']}")


def test_the_price_through_the_stop_after_a_trim_is_caught(live_factory, sim):
    """Right after that trim the price falls through s1's stop (40) to 39.5 and stays: s1's remaining 75 is sold by
    its stop within a second or two, the account holding s2's 75 only (on 0358f13: 11.3 s)."""
    h = _trim_while_another_strategy_fills(live_factory, sim)
    wait_for(lambda: h.net("s2") == 75, timeout=5)
    t0 = time.monotonic()
    sim.sim.tick("NFO", SYMBOL, D("39.5"))  # through the stop level
    try:
        wait_for(lambda: broker_net(sim, SYMBOL) == 75, timeout=4)
    except AssertionError:
        trail = [(e["kind"], e["message"][:160]) for e in h.runtime.storage.rows(
            "select kind, message from events where kind like 'stop%' or kind like 'protected%' order by id")]
        raise AssertionError((time.monotonic() - t0, broker_net(sim, SYMBOL), trail))
    assert time.monotonic() - t0 < 2.5


def test_after_an_app_sale_what_the_broker_still_holds_gets_its_stop_at_once(live_factory, sim):
    """225 held behind a stop at 40. An EXIT alert trims 75; while its stop's cancel is on the way, the trader sells 75
    in the broker's app (its order book lags). The broker then holds 75, and those 75 are protected at once, not
    after 2 x RISK_POLL_S + 1 s (0358f13: 61 s at RISK_POLL_S 30, whatever the polls found meanwhile)."""
    h = live_factory(TRAIL_MIN_INTERVAL_S=0, RISK_POLL_S=30)
    protected(h, qty=225, stop_loss="40", target="46")
    resting(h, qty=225)
    sold = []

    def app_sale() -> None:  # while the stop's cancel was on its way: the app's order update is lost
        control(sim, action="stall_feed", on=True)
        sold.append(_sold_in_the_app_unbooked(sim, 75))
        control(sim, action="stall_feed", on=False)
    _on_the_held_read(h.runtime.engine, app_sale)
    try:
        _trim(h, 75)
        wait_for(lambda: exits(h) and exits(h)[0]["status"] == "FILLED", timeout=8)
        if not sold:  # before the change (83a0345): no held read; the app sale as the trim fills
            app_sale()
        t0 = time.monotonic()
        assert broker_net(sim, SYMBOL) == 75
        [said] = events(h, "protected_exit")
        adopted = None
        while time.monotonic() - t0 < 8:
            if adopted is None and h.net("s1") == 75:
                adopted = time.monotonic() - t0
            if [s for s in stops(h, ("OPEN",)) if s["qty"] == 75]:
                return
            time.sleep(0.1)
        raise AssertionError(f"no stop for the 75 the broker holds 8 s after the trim (the app sale adopted after "
                             f"{adopted} s): {said['message']}")
    finally:
        for manual in sold:
            control(sim, action="hide_order", norenordno=manual, on=False)


def test_positions_unreadable_after_the_read_no_stop_for_what_the_app_sold(live_factory, sim):
    """150 held behind a stop at 40, target 46; the trader sells 75 in the app (its order book lags). The target's exit
    is cut to 75; right after that read, PositionBook stops answering (a 403), so the app's sale cannot be adopted.
    No stop is placed for the 75 the broker no longer holds: the price falling back through 40 sells nothing.
    (On 0358f13 a stop of 75 came back after its 11 s wait: short 75. On 83a0345 the target sold 150.)"""
    h = live_factory(TRAIL_MIN_INTERVAL_S=0, RISK_POLL_S=5)
    engine = h.runtime.engine
    protected(h, qty=150, stop_loss="40", target="46")
    stop = resting(h, qty=150)
    real, done = engine.exit_reads._read, []

    def read_then_blind():  # type: ignore[no-untyped-def]
        view = real()
        if not done and any(k.startswith("protect:") for k in engine.exit_reads._reading):
            done.append(1)
            control(sim, action="forbid_next", count=100000, route="PositionBook")
        return view
    engine.exit_reads._read = read_then_blind
    control(sim, action="stall_feed", on=True)
    manual = _sold_in_the_app_unbooked(sim, 75)
    control(sim, action="stall_feed", on=False)
    try:
        sim.sim.tick("NFO", SYMBOL, D("46"))
        wait_for(lambda: sim_order(sim, stop["id"]).status.value == "CANCELLED", timeout=5)
        [said] = wait_for(lambda: events(h, "protected_exit"), timeout=8)
        wait_for(lambda: exits(h) and exits(h)[0]["status"] == "FILLED", timeout=5)
        waiting = _lowest_net(sim, 3.0)
        again = [(s["qty"], s["status"]) for s in stops(h, ("NEW", "SUBMITTED", "OPEN", "PARTIAL"))]
        sim.sim.tick("NFO", SYMBOL, D("39.9"))
        lowest = min(waiting, _lowest_net(sim, 2.0))
        assert lowest == 0, (lowest, again, h.net("s1"), said["message"])
    finally:
        control(sim, action="forbid_next", count=0, route="PositionBook")
        control(sim, action="hide_order", norenordno=manual, on=False)
