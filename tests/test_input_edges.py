"""Inputs that opened positions risk could not see, left one open with no word, or got an unclear answer: CNC
outside equity, a strategy name in another case, a stop sent as a limit, numbers past SQLite's, and more."""
from __future__ import annotations

import pytest

from conftest import SYMBOL, alert, wait_for
from host.models import ExecutionType, Intent, OrderType, Product, Side
from host.validation import validate_intent


@pytest.mark.parametrize("execution_type", ["ENTRY", "ADJUST"])
def test_a_futures_or_options_leg_as_cnc_is_refused_naming_the_field(host, execution_type):
    """CNC is delivery, for NSE and BSE equity; a futures position held as CNC would be outside the day's PnL."""
    r = host.post(alert(execution_type=execution_type, product_type="CNC"))
    assert r.status_code == 422, r.get_json()
    [p] = r.get_json()["errors"]
    assert p["field"] == "legs[0].product_type" and p["found"] == "'CNC'" and "NSE and BSE equity" in p["expected"]
    assert host.orders() == []


def test_a_position_target_as_cnc_on_nfo_is_refused(host):
    r = host.post({"secret_key": "test-webhook-secret", "execution_type": "POSITION", "strategy_name": "s1",
                   "exchange": "NFO", "legs": [{"tradingsymbol": SYMBOL, "position": "75", "product_type": "C"}]})
    assert r.status_code == 422 and r.get_json()["errors"][0]["field"] == "legs[0].product_type", r.get_json()


def test_cnc_stays_valid_for_equity_and_an_exit_names_any_product(host):
    r = host.post(alert(exchange="NSE", tradingsymbol="INFY-EQ", qty=1, direction="BUY", price="1500",
                        product_type="C"))
    assert r.status_code == 200, r.get_json()
    r = host.post(alert(execution_type="EXIT", product_type="C"))  # nothing held: accepted, nothing sent
    assert r.status_code == 200 and r.get_json()["orders"] == [], r.get_json()


def test_a_plugin_entry_as_cnc_on_nfo_is_a_problem_but_an_exit_of_one_is_not():
    entry = Intent("NFO", SYMBOL, Side.BUY, 75, OrderType.MKT, Product.CNC, action=ExecutionType.ENTRY)
    [p] = validate_intent(entry, "intent[0]")
    assert p.field == "intent[0].product" and "NSE and BSE equity" in p.expected
    assert validate_intent(Intent("NFO", SYMBOL, Side.SELL, 75, OrderType.MKT, Product.CNC,
                                  action=ExecutionType.EXIT)) == []


def test_an_exit_for_a_strategy_name_in_another_case_says_which_strategy_holds_it(host):
    host.tick("42.5")
    assert host.post(alert(strategy="Trend", direction="BUY", price="43")).status_code == 200
    wait_for(lambda: host.net("Trend") == 75)
    r = host.post(alert(execution_type="EXIT", strategy="trend", direction="SELL", order_type="MKT", price=None))
    body = r.get_json()
    assert r.status_code == 200 and body["orders"] == [], body
    assert "case-sensitive: 'Trend', not 'trend', holds +75" in body["reason"], body
    r = host.post({"secret_key": "test-webhook-secret", "execution_type": "POSITION", "strategy_name": "TREND",
                   "exchange": "NFO", "legs": [{"tradingsymbol": SYMBOL, "position": "0", "product_type": "M"}]})
    assert "case-sensitive: 'Trend', not 'TREND'" in r.get_json()["reason"], r.get_json()
    said = host.runtime.storage.rows("select * from events where kind = 'strategy_name_case'")
    assert len(said) == 2 and all(e["severity"] == "warning" for e in said)
    assert host.net("Trend") == 75  # nothing of Trend's was touched


@pytest.mark.parametrize("query", ["after=99999999999999999999", "after=-1", "offset=99999999999999999999"])
def test_an_event_id_or_offset_past_sqlites_integers_is_a_422_naming_it_not_a_500(host, query):
    r = host.api(f"/api/events?{query}" if query.startswith("after") else f"/api/orders?{query}")
    assert r.status_code == 422, (r.status_code, r.get_data(as_text=True))
    assert query.split("=")[0] in r.get_data(as_text=True)


def test_the_webhook_secret_pasted_into_another_field_is_never_echoed_stored_or_notified(host):
    from conftest import SECRET
    body = alert(strategy=f"x{SECRET}", alert_id="{{" + SECRET + "}}")
    body["legs"][0]["comment"] = SECRET
    r = host.post(body)
    assert r.status_code == 422 and SECRET not in r.get_data(as_text=True), r.get_json()
    assert "[WEBHOOK_SECRET]" in r.get_data(as_text=True)
    for table in ("alerts", "events"):
        dump = str(host.runtime.storage.rows(f"select * from {table}"))
        assert SECRET not in dump, table


def test_a_trigger_price_on_a_limit_order_is_refused_not_sent_as_a_limit(host):
    """A trader who meant a stop-limit would get a limit that fills at once."""
    r = host.post(alert(order_type="LMT", price="40", trigger_price="40.5"))
    assert r.status_code == 422, r.get_json()
    [e] = r.get_json()["errors"]
    assert e["field"] == "legs[0].trigger_price" and "SL-LMT" in e["expected"] and e["found"] == "'40.5'"
    assert host.post(alert(order_type="MKT", price="0", trigger_price="0")).status_code == 200  # "no trigger"
    r = host.post(alert(order_type="MKT", price="0", trigger_price="41", alert_id="m"))  # a market one: noted
    assert r.status_code == 200 and any("trigger_price '41' ignored" in n for n in r.get_json()["notes"])


def test_a_leg_without_an_exchange_is_named_when_the_alert_has_none(host):
    body = alert()
    del body["exchange"]
    body["legs"][0]["exchange"] = "NFO"
    body["legs"].append({**body["legs"][0], "tradingsymbol": "NIFTY28APR26P24500"})
    del body["legs"][1]["exchange"]
    r = host.post(body)
    assert r.status_code == 422 and [e["field"] for e in r.get_json()["errors"]] == ["legs[1].exchange"], r.get_json()


def test_two_entry_legs_in_one_symbol_are_blocked_naming_the_alert_not_an_order_that_does_not_exist(host):
    body = alert(product_type="M")
    body["legs"].append({**body["legs"][0], "product_type": "I"})
    r = host.post(body)
    assert r.status_code == 409 and "an earlier leg of the same alert" in r.get_json()["reason"], r.get_json()


@pytest.mark.parametrize("raw,found", [(b"null", "null"), (b'"x"', "a string"), (b"1.5", "a number"),
                                       (b"[1]", "an array"), (b"true", "true (a boolean)")])
def test_a_json_value_that_is_not_an_object_is_named_in_jsons_words(host, raw, found):
    r = host.client.post("/webhook", data=raw, content_type="application/json")
    assert r.status_code == 400 and r.get_json()["error"] == f"expected a JSON object, found {found}"


def test_a_body_behind_a_utf8_byte_order_mark_is_read(host):
    import json as _json
    r = host.client.post("/webhook", data=b"\xef\xbb\xbf" + _json.dumps(alert()).encode(),
                         content_type="application/json")
    assert r.status_code == 200, r.get_json()


def test_a_plugin_intent_in_lower_case_is_a_problem_naming_the_symbol():
    [p] = validate_intent(Intent("NFO", SYMBOL.lower(), Side.BUY, 75, OrderType.MKT, Product.NRML,
                                 action=ExecutionType.ENTRY), "intent[0]")
    assert p.field == "intent[0].symbol" and SYMBOL in p.expected


def test_a_short_at_its_entry_price_shows_no_minus_zero(host):
    host.tick("42.5")
    assert host.post(alert(direction="SELL", price="42.5")).status_code == 200
    wait_for(lambda: host.net() == -75)
    [p] = [p for p in host.api("/api/positions").get_json()["items"] if p["strategy"] == "s1"]
    assert not str(p["unrealized_pnl"]).startswith("-"), p


@pytest.mark.parametrize("path,body,field", [("/api/paper/faults", [1], "body"),
                                             ("/api/halt", {"mode": "halted", "reason": 5}, "reason")])
def test_api_bodies_of_the_wrong_shape_are_refused_not_read_as_something_else(host, path, body, field):
    r = host.api(path, method="POST", json=body)
    assert r.status_code == 422 and r.get_json()["errors"][0]["field"] == field, r.get_json()


def test_known_fields_a_leg_of_that_kind_does_not_read_are_noted_never_dropped_unsaid(host):
    r = host.post(alert(position="-75"))
    assert r.status_code == 200 and any("legs[0].position '-75' ignored" in n for n in r.get_json()["notes"])
    r = host.post({"secret_key": "test-webhook-secret", "execution_type": "POSITION", "strategy_name": "s2",
                   "exchange": "NFO", "legs": [{"tradingsymbol": SYMBOL, "position": "75", "product_type": "M",
                                                "direction": "SELL", "qty": "150"}]})
    notes = r.get_json()["notes"]
    assert any("legs[0].direction 'SELL' ignored" in n for n in notes) and any("legs[0].qty" in n for n in notes)


# ---- review 36 ----

def _hold_long(host, strategy="s1"):
    host.tick("42.5")
    r = host.post(alert(strategy=strategy, direction="BUY", price="43"))
    assert r.status_code == 200, r.get_json()
    wait_for(lambda: host.net(strategy) == 75)


@pytest.mark.parametrize("trigger", ["42", "41.5", 40])
def test_a_market_exit_with_a_template_trigger_price_still_closes(host, trigger):
    """A template that sends trigger_price on every order: a market EXIT with it must not leave the position open
    (a price on MKT is merely noted)."""
    _hold_long(host)
    r = host.post(alert(execution_type="EXIT", direction="SELL", order_type="MKT", price="0", trigger_price=trigger))
    assert r.status_code == 200, r.get_json()
    wait_for(lambda: host.net("s1") == 0)


@pytest.mark.parametrize("trigger", ["0.000", " 0 ", "00", "0E-2", "-0"])
def test_spellings_of_zero_on_a_trigger_mean_none(host, trigger):
    """0 means none for trigger_price: every spelling of zero a template renders."""
    host.tick("42.5")
    r = host.post(alert(direction="BUY", price="43", trigger_price=trigger))
    assert r.status_code == 200, (trigger, r.get_json())


def test_position_0_as_cnc_closes_an_nfo_position_held_as_cnc(host):
    """A strategy holding an NFO position as CNC (entered before CNC was refused there): its POSITION 0 alert closes
    it, as its EXIT may name any product."""
    host.tick("42.5")
    host.runtime.storage.write(lambda db: db["positions"].insert(
        {"strategy": "s1", "exchange": "NFO", "symbol": SYMBOL, "product": "C", "net_qty": 75, "avg_price": "42.5",
         "realized_pnl": "0"}, alter=True))
    r = host.post({"secret_key": "test-webhook-secret", "execution_type": "POSITION", "strategy_name": "s1",
                   "exchange": "NFO", "legs": [{"tradingsymbol": SYMBOL, "position": "0", "product_type": "C"}]})
    assert r.status_code == 200, r.get_json()


def test_a_plugin_adjust_as_cnc_on_nfo_from_flat_is_refused_like_an_entry():
    """An ADJUST from flat opens a position: as CNC on NFO, one risk never counts (the webhook refuses the leg)."""
    adjust = Intent("NFO", SYMBOL, Side.BUY, 75, OrderType.MKT, Product.CNC, action=ExecutionType.ADJUST)
    assert validate_intent(adjust, "intent[0]") != []


def test_a_plugin_adjust_as_cnc_on_nfo_opens_no_position(host):
    d = host.runtime.storage.write(lambda db: host.runtime.engine.decider.evaluate(
        db, "s1", [Intent("NFO", SYMBOL, Side.BUY, 75, OrderType.MKT, Product.CNC, action=ExecutionType.ADJUST)],
        alert_id=None))
    assert d.orders == (), d


def test_position_leg_trigger_price_is_noted_not_silently_dropped(host):
    host.tick("42.5")
    r = host.post({"secret_key": "test-webhook-secret", "execution_type": "POSITION", "strategy_name": "s1",
                   "exchange": "NFO", "legs": [{"tradingsymbol": SYMBOL, "position": "75", "product_type": "M",
                                                "order_type": "MKT", "trigger_price": "40"}]})
    body = r.get_json()
    assert r.status_code == 200, body
    assert "trigger_price" in " ".join(body.get("notes") or []), body


def test_a_short_secret_inside_a_strategy_name_is_left_alone(host_factory):
    """WEBHOOK_SECRET "ema_trend" (8+ characters, accepted by the config) and the strategy "ema_trend_pos": a short
    secret is replaced only where it is a whole field, so the alert still reaches its strategy."""
    host = host_factory(WEBHOOK_SECRET="ema_trend")
    host.tick("42.5")
    body = alert(strategy="ema_trend_pos", direction="BUY", price="43")
    body["secret_key"] = "ema_trend"
    r = host.post(body)
    assert r.status_code == 200, r.get_json()
    wait_for(lambda: host.net("ema_trend_pos") == 75)


def test_a_position_target_entering_for_a_name_in_another_case_says_who_holds_it(host):
    host.tick("42.5")
    assert host.post(alert(strategy="Trend", direction="BUY", price="43")).status_code == 200
    wait_for(lambda: host.net("Trend") == 75)
    r = host.post({"secret_key": "test-webhook-secret", "execution_type": "POSITION", "strategy_name": "trend",
                   "exchange": "NFO", "legs": [{"tradingsymbol": SYMBOL, "position": "75", "product_type": "M",
                                                "order_type": "LMT", "price": "43"}]})
    assert r.status_code == 200 and "case-sensitive: 'Trend', not 'trend', holds +75" in r.get_json()["reason"]


@pytest.mark.parametrize("query,field", [("limit=abc", "limit"), ("offset=1e3", "offset"), ("limit=0", "limit")])
def test_a_bad_page_names_the_field_and_the_value_found(host, query, field):
    r = host.api(f"/api/orders?{query}")
    text = r.get_data(as_text=True)
    assert r.status_code == 422 and text.count(f"{field}:") == 1 and query.split("=")[1] in text, text
