"""TradingView alerts as traders send them: market legs with price 0, position targets, per-strategy ids, strict input."""
from __future__ import annotations

import json
import time
import logging

import pytest

from conftest import SECRET, SYMBOL, alert, wait_for
from host.instruments import Instruments

FUT = "NIFTY28APR26F"


def target(position, strategy: str = "pos", alert_id=None, **leg):
    body_leg = {"tradingsymbol": FUT, "position": position, "product_type": "M", **leg}
    body = {"secret_key": SECRET, "execution_type": "POSITION", "strategy_name": strategy, "exchange": "NFO",
            "legs": [body_leg]}
    if alert_id is not None:
        body["alert_id"] = alert_id
    return body


def orders_of(host, strategy: str) -> list[dict]:
    return [o for o in host.orders() if o["strategy"] == strategy]


# ---- market legs ----

@pytest.mark.parametrize("price", ["absent", None, "", 0, "0", "0.0", 0.0])
def test_a_market_leg_with_no_price_in_any_spelling_is_accepted(host, price):
    host.tick("42.5")
    body = alert(order_type="MKT", price=price)
    if price == "absent":
        body["legs"][0].pop("price")
    r = host.post(body)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["orders"][0]["price"] is None
    assert "notes" not in r.get_json()


def test_a_price_on_a_market_leg_is_ignored_and_the_answer_says_so(host):
    host.tick("42.5")
    r = host.post(alert(order_type="SL-MKT", price="41", trigger_price="43", direction="BUY"))
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["orders"][0]["price"] is None and body["orders"][0]["trigger_price"] == "43"
    assert body["notes"] == ["legs[0].price '41' ignored: SL-MKT orders carry no price"]


# ---- position targets ----

def test_a_strategy_alert_sequence_sends_only_the_difference(host):
    host.tick("100", symbol=FUT)
    steps = [  # (target, orders this step should send, net after it)
        ("75", 1, 75), ("75.0", 0, 75), ("0", 1, 0), ("-75", 1, -75), ("75", 2, 75), ("flat", 1, 0)]
    sent = 0
    for n, (goal, new_orders, net) in enumerate(steps):
        r = host.post(target(goal, alert_id=f"step-{n}"))
        assert r.status_code == 200, r.get_json()
        wait_for(lambda: host.net("pos", FUT) == net and len(orders_of(host, "pos")) == sent + new_orders
                 and all(o["status"] == "FILLED" for o in orders_of(host, "pos")), timeout=5)
        sent += new_orders
        if new_orders == 0:
            assert "already at target +75" in r.get_json()["reason"]
    qtys = [(o["side"], o["qty"], o["action"]) for o in reversed(orders_of(host, "pos"))]
    assert qtys == [("BUY", 75, "ADJUST"), ("SELL", 75, "EXIT"), ("SELL", 75, "ADJUST"), ("BUY", 75, "EXIT"),
                    ("BUY", 75, "ADJUST"), ("SELL", 75, "EXIT")]


def test_market_position_form_and_a_smaller_target_reduces(host):
    host.tick("100", symbol=FUT)
    body = target(None, strategy="mp")
    body["legs"][0].pop("position")
    body["legs"][0].update(market_position="short", position_size="150")
    assert host.post(body).status_code == 200
    wait_for(lambda: host.net("mp", FUT) == -150)
    body["legs"][0].update(position_size="75")
    r = host.post(body)
    assert r.status_code == 200 and r.get_json()["orders"][0]["action"] == "EXIT", r.get_json()
    wait_for(lambda: host.net("mp", FUT) == -75)


def test_a_reversal_whose_exit_does_not_fill_never_enters(host):
    host.tick("100", symbol=FUT)
    host.post(target("75", strategy="rev", alert_id="long"))
    wait_for(lambda: host.net("rev", FUT) == 75)
    # the exit rests as a limit far above the market; the entry half waits for it
    r = host.post(target("-75", strategy="rev", alert_id="short", order_type="LMT", price="150"))
    assert r.status_code == 200, r.get_json()
    assert "waits" in r.get_json()["reason"] or "once the exit has filled" in r.get_json()["reason"]
    [exit_order] = r.get_json()["orders"]
    assert exit_order["action"] == "EXIT" and exit_order["qty"] == 75
    wait_for(lambda: any(o["id"] == exit_order["id"] and o["status"] == "OPEN" for o in host.orders()))
    # the trader cancels the exit at the broker: the entry must not be sent
    broker_id = next(o for o in host.orders() if o["id"] == exit_order["id"])["broker_order_id"]
    host.broker.cancel(broker_id)
    alerts = wait_for(lambda: [a for a in host.api("/api/alerts").get_json()["items"]
                               if a["id"] == r.get_json()["alert_id"] and "not sent" in (a["reason"] or "")])
    assert "ended CANCELLED" in alerts[0]["reason"]
    assert [o["action"] for o in orders_of(host, "rev")] == ["EXIT", "ADJUST"]  # no entry after the exit
    assert host.net("rev", FUT) == 75


def test_a_reversal_survives_a_restart_while_its_exit_works(host):
    host.tick("100", symbol=FUT)
    host.post(target("75", strategy="rr", alert_id="long"))
    wait_for(lambda: host.net("rr", FUT) == 75)
    r = host.post(target("-75", strategy="rr", alert_id="short", order_type="LMT", price="101"))
    assert r.status_code == 200
    wait_for(lambda: any(o["action"] == "EXIT" and o["status"] == "OPEN" for o in orders_of(host, "rr")))
    host.restart()
    assert host.net("rr", FUT) == 75 and len(orders_of(host, "rr")) == 2
    host.tick("102", symbol=FUT)  # the exit fills after the restart; the entry follows
    wait_for(lambda: host.net("rr", FUT) == -75, timeout=8)
    assert len(orders_of(host, "rr")) == 3


def test_risk_lets_the_reducing_part_through_while_halted_and_refuses_the_adding_part(host):
    host.tick("100", symbol=FUT)
    host.post(target("150", strategy="rk"))
    wait_for(lambda: host.net("rk", FUT) == 150)
    assert host.api("/api/halt", "POST", json={"mode": "halted"}).status_code == 200
    r = host.post(target("75", strategy="rk"))
    assert r.status_code == 200, r.get_json()
    wait_for(lambda: host.net("rk", FUT) == 75)
    r = host.post(target("225", strategy="rk"))
    assert r.status_code == 423, r.get_json()


# ---- idempotency per strategy ----

def test_two_strategies_with_the_same_alert_id_in_the_same_second_both_trade(host):
    host.tick("42.5")
    a = host.post(alert(strategy="one", alert_id="2026-11-27T04:01:00Z"))
    b = host.post(alert(strategy="two", alert_id="2026-11-27T04:01:00Z"))
    assert (a.status_code, a.get_json()["status"]) == (200, "accepted")
    assert (b.status_code, b.get_json()["status"]) == (200, "accepted"), b.get_json()
    assert a.get_json()["client_alert_id"] == "2026-11-27T04:01:00Z" != a.get_json()["alert_id"]
    again = host.post(alert(strategy="two", alert_id="2026-11-27T04:01:00Z"))
    assert again.get_json()["status"] == "duplicate" and again.get_json()["duplicate_of"] == b.get_json()["alert_id"]


def test_an_alert_id_runs_again_after_its_ttl(host_factory):
    import time
    h = host_factory(ALERT_ID_TTL_S=1, DEDUPE_WINDOW_S=0)
    h.tick("42.5")
    first = h.post(alert("ENTRY", alert_id="Close", order_type="MKT"))
    assert first.get_json()["status"] == "accepted"
    wait_for(lambda: h.net() == -75)
    h.post(alert("EXIT", alert_id="Close-x", order_type="MKT"))
    wait_for(lambda: h.net() == 0 and len(h.orders(status="FILLED")) == 2)
    assert h.post(alert("ENTRY", alert_id="Close", order_type="MKT")).get_json()["status"] == "duplicate"
    time.sleep(1.1)
    again = h.post(alert("ENTRY", alert_id="Close", order_type="MKT"))
    assert again.get_json()["status"] == "accepted", again.get_json()


# ---- strict input ----

HOSTILE = [  # (leg or body field, value, field named in the error)
    ("price", "1e-30", "legs[0].price"), ("price", "1e308", "legs[0].price"), ("price", 1e308, "legs[0].price"),
    ("price", "1e27", "legs[0].price"), ("price", 10 ** 100, "legs[0].price"), ("price", "42.555", "legs[0].price"),
    ("price", "0.001", "legs[0].price"), ("price", "10000000.05", "legs[0].price"), ("price", "٤٢", "legs[0].price"),
    ("qty", "٧٥", "legs[0].qty"), ("qty", "７５", "legs[0].qty"), ("qty", "7_5", "legs[0].qty"),
    ("qty", 10 ** 100, "legs[0].qty"), ("qty", "10000001", "legs[0].qty"), ("qty", "75\n", "legs[0].qty"),
    ("direction", "ſell", "legs[0].direction"), ("product_type", "mıs", "legs[0].product_type"),
    ("tradingsymbol", "NIFTY\n", "legs[0].tradingsymbol"), ("tradingsymbol", "NİFTY", "legs[0].tradingsymbol"),
    ("qty", "{{strategy.order.contracts}}", "legs[0].qty"),
]


@pytest.mark.parametrize("field,value,named", HOSTILE)
def test_hostile_values_get_422_naming_the_field_and_trade_nothing(host, field, value, named):
    r = host.post(alert(**{field: value}))
    assert r.status_code == 422, (field, value, r.get_json())
    assert named in [e["field"] for e in r.get_json()["errors"]]
    assert host.orders() == []


@pytest.mark.parametrize("name", ["s1\n", "ſtrategy", "s\u200b1", "s1 ", ""])
def test_strategy_names_are_ascii_with_nothing_after_them(host, name):
    r = host.post(alert(strategy=name))
    assert r.status_code == 422 and r.get_json()["errors"][0]["field"] == "strategy_name", r.get_json()


def test_cds_prices_may_have_four_places_and_nfo_two(host):
    ok = host.post(alert(exchange="CDS", tradingsymbol="USDINR29DEC26F", price="83.1225"))
    assert ok.status_code == 200, ok.get_json()


def test_unfilled_placeholders_anywhere_are_named(host):
    body = alert()
    body["comment"] = "{{plot_0}}"
    r = host.post(body)
    assert r.status_code == 422 and r.get_json()["errors"][0]["field"] == "comment"
    assert "does not fill the TradingView placeholder {{plot_0}}" in r.get_json()["errors"][0]["expected"]


def test_bodies_and_headers_that_are_not_text_get_4xx_without_a_traceback(host, caplog):
    caplog.set_level(logging.INFO)
    raw = json.dumps(alert())
    cases = [
        (raw.replace(SECRET, "\\ud800"), {}, 401),                       # lone surrogate in the secret
        (raw.replace('"s1"', '"\\udc00"'), {}, 400),                       # ... in a field
        (raw.encode("utf-16"), {}, 400),                                 # not UTF-8
        (b'{"secret_key": "\xff\xfe"}', {}, 400),                        # invalid bytes
        (raw, {"X-Signature": "sha256=\u00e9\u00e9"}, 401),               # non-ASCII signature header
        ("BUY NIFTY29DEC26F 75", {"Content-Type": "text/plain"}, 400),   # TradingView's plain text
    ]
    for data, headers, code in cases:
        r = host.client.post("/webhook", data=data, headers=headers)
        assert r.status_code == code, (data, r.get_json())
        assert r.get_json()["error"]
    assert not [rec for rec in caplog.records if rec.exc_info], "a client's bad input logged a traceback"
    assert host.orders() == []


def test_nse_ticker_without_series_trades_as_eq(host):
    host.tick("1500", symbol="INFY-EQ", exchange="NSE")
    r = host.post(alert(exchange="NSE", tradingsymbol="INFY", qty="1", order_type="MKT", price="0", product_type="C"))
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["orders"][0]["symbol"] == "INFY-EQ"
    assert "INFY traded as INFY-EQ" in r.get_json()["notes"][0]


def test_a_symbol_the_instrument_master_does_not_know_gets_422_with_the_nearest(host):
    host.runtime.engine.instruments = Instruments.sample
    r = host.post(alert(tradingsymbol="NIFTY28APR26C24600"))
    assert r.status_code == 422, r.get_json()
    assert "nearest known: NIFTY28APR26C24500" in r.get_json()["reason"]
    assert host.orders() == []


# ---- found by breaking it from outside ----

def test_a_flat_target_right_after_a_reversal_ends_flat(host):
    host.tick("100", symbol=FUT)
    for n in range(3):
        for goal in ("75", "-75", "0"):  # back to back: the reversal's entry is still on its way
            assert host.post(target(goal, strategy=f"bb{n}")).status_code == 200
        wait_for(lambda: host.net(f"bb{n}", FUT) == 0 and not [o for o in orders_of(host, f"bb{n}")
                                                              if o["status"] not in ("FILLED", "CANCELLED")])
        import time
        time.sleep(0.3)
        assert host.net(f"bb{n}", FUT) == 0


def test_a_new_target_cancels_working_orders_first(host):
    host.tick("100", symbol=FUT)
    host.post(target("75", strategy="wk", order_type="LMT", price="90"))  # rests below the market
    r = host.post(target("0", strategy="wk"))
    assert r.status_code == 200 and "cancelled first" in r.get_json()["reason"], r.get_json()
    wait_for(lambda: all(o["status"] == "CANCELLED" for o in orders_of(host, "wk")))
    host.tick("80", symbol=FUT)  # the old limit would have filled here
    host.settle()
    assert host.net("wk", FUT) == 0


def test_a_target_in_another_product_than_the_position_is_refused(host):
    host.tick("100", symbol=FUT)
    host.post(target("75", strategy="pr"))
    wait_for(lambda: host.net("pr", FUT) == 75)
    r = host.post(target("0", strategy="pr", product_type="I"))
    assert r.status_code == 422 and "product_type M" in r.get_json()["reason"], r.get_json()


def test_keys_given_twice_in_any_case_are_refused(host):
    raw = json.dumps(alert()).replace('"qty": 75', '"qty": 75, "QTY": 7500')
    r = host.client.post("/webhook", data=raw, content_type="application/json")
    assert r.status_code == 400 and "'QTY' is given more than once" in r.get_json()["error"]
    raw = json.dumps(alert()).replace(f'"secret_key": "{SECRET}"', f'"secret_key": "{SECRET}", "SECRET_KEY": "x"')
    assert host.client.post("/webhook", data=raw, content_type="application/json").status_code == 400
    assert host.orders() == []


@pytest.mark.parametrize("where,name", [("leg", "sl"), ("leg", "take_profit"), ("top", "stop_loss"),
                                        ("top", "trailing_stop"), ("leg", "strategy_stoploss")])
def test_stop_and_target_fields_in_any_spelling_are_refused_not_ignored(host, where, name):
    body = alert()
    (body["legs"][0] if where == "leg" else body)[name] = "41"
    r = host.post(body)
    assert r.status_code == 422 and name in r.get_json()["errors"][0]["field"], r.get_json()


def test_unknown_fields_are_noted(host):
    body = alert()
    body["underlying"] = "NIFTY"
    r = host.post(body)
    assert r.status_code == 200 and "underlying ignored: not a field this host reads" in r.get_json()["notes"]


def test_position_alerts_without_an_id_are_not_body_duplicates(host):
    host.tick("100", symbol=FUT)
    for goal, net in (("75", 75), ("0", 0), ("75", 75)):
        assert host.post(target(goal, strategy="nd")).get_json()["status"] == "accepted"
        wait_for(lambda: host.net("nd", FUT) == net)


def test_exponent_prices_are_stored_as_plain_digits(host):
    r = host.post(alert(price="4.25e1"))
    assert r.status_code == 200 and r.get_json()["orders"][0]["price"] == "42.5"


def test_contradictory_position_forms_are_refused(host):
    for leg in ({"position": "75", "market_position": "short"}, {"market_position": "flat", "position_size": "75"},
                {"market_position": "long", "position_size": "0"}):
        body = target(None, strategy="cf")
        body["legs"][0].pop("position")
        body["legs"][0].update(leg)
        assert host.post(body).status_code == 422, leg


def test_exit_all_drops_a_reversal_waiting_to_enter(host):
    """Found from outside: exit-all during a reversal, then the reversal's entry went out and left a short."""
    host.tick("100", symbol=FUT)
    host.post(target("75", strategy="xa"))
    wait_for(lambda: host.net("xa", FUT) == 75)
    host.post(target("-75", strategy="xa", order_type="LMT", price="101"))  # the exit rests above the market
    wait_for(lambda: any(o["action"] == "EXIT" and o["status"] == "OPEN" for o in orders_of(host, "xa")))
    assert host.api("/api/exit-all", "POST").status_code == 200
    host.tick("102", symbol=FUT)  # the reversal's exit fills now
    wait_for(lambda: host.net("xa", FUT) == 0)
    time.sleep(0.5)
    host.settle()
    assert host.net("xa", FUT) == 0 and not [o for o in orders_of(host, "xa") if o["action"] == "ADJUST"
                                             and o["side"] == "SELL"]


def test_a_market_flat_target_closes_the_position_though_a_resting_exit_covers_it(host):
    """Found by an outside test: POSITION 0 at market answered "already at target flat (+75 filled, -75 working)"
    while the only working order was the strategy's stop far below the market: the position stayed open. A market
    target its resting exits reach moves them towards the market until they fill."""
    host.tick("24000", symbol=FUT)
    r = host.post(target(75, order_type="MKT"))
    assert r.status_code == 200, r.get_json()
    wait_for(lambda: host.net("pos", FUT) == 75)
    stop = host.post(alert("EXIT", strategy="pos", tradingsymbol=FUT, direction="SELL", qty=75, order_type="SL-MKT",
                           price=None, trigger_price="23000"))
    assert stop.status_code == 200 and stop.get_json()["orders"], stop.get_json()
    wait_for(lambda: [o for o in host.orders(status="OPEN") if o["strategy"] == "pos"])
    r = host.post(target(0, order_type="MKT", alert_id="flat"))
    assert r.status_code == 200 and "moved towards the market" in r.get_json()["reason"], r.get_json()
    wait_for(lambda: host.net("pos", FUT) == 0, timeout=8)
    host.tick("22900", symbol=FUT)
    host.settle()
    assert host.net("pos", FUT) == 0


def test_a_market_target_reached_only_by_a_resting_entry_enters_now(host):
    """Review: a market POSITION target counted a resting entry limit far below the market as on its way: "already
    at target +75 (flat filled, +75 working)", and the strategy stayed flat until the market came down to it. It
    is cancelled, and the target planned again at market."""
    host.tick("24000", symbol=FUT)
    assert host.post(target(75, order_type="LMT", price="23000")).status_code == 200
    wait_for(lambda: [o for o in host.orders(status="OPEN") if o["strategy"] == "pos"])
    r = host.post(target(75, order_type="MKT", alert_id="now"))
    assert r.status_code == 200 and "cancelled first" in r.get_json()["reason"], r.get_json()
    wait_for(lambda: host.net("pos", FUT) == 75, timeout=5)
