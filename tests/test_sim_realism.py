"""The Noren simulator behaves like the real broker, warts included, over HTTP with the real NorenRestApiPy.

Timing-sensitive requests go through `requests` with a timeout, as the library has none of its own.
"""
from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest
import requests

from host.models import OrderStatus
from host.sim.matching import MatchingEngine
from host.sim.server import NorenSim

from conftest import SYMBOL, noren_login, wait_for

PUT = "NIFTY28APR26P24500"  # no price set: a contract with no trades today
PUT_TOKEN = "43213"


def control(sim, **body) -> dict:
    r = requests.post(f"http://127.0.0.1:{sim.port}/sim/control", json=body, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def raw(sim, route: str, timeout: float = 5.0, **jdata):
    """One REST call with a timeout and a fresh session; answers the decoded reply."""
    token = sim.sim.new_session("FA1")
    return requests.post(sim.api_url + route, data="jData=" + json.dumps({"uid": "FA1", **jdata}),
                         headers={"Authorization": f"Bearer {token}"}, timeout=timeout).json()


def order(**over) -> dict:
    """A PlaceOrder jData body: BUY 75 SYMBOL LMT 43 NRML."""
    return {"actid": "FA1", "trantype": "B", "prd": "M", "exch": "NFO", "tsym": SYMBOL, "qty": "75",
            "prctyp": "LMT", "prc": "43", "ret": "DAY", "remarks": "ours-1", **over}


def booked(sim, remarks: str) -> list:
    return sim.sim.engine.find_all(remarks)


# ---- 1. remarks are free text ----

def test_a_second_order_with_the_same_remarks_is_booked_as_a_second_order(sim, noren_api):
    first = noren_api.place_order("B", "M", "NFO", SYMBOL, 75, 0, "LMT", price="43", remarks="ours-1")
    second = noren_api.place_order("B", "M", "NFO", SYMBOL, 75, 0, "LMT", price="43", remarks="ours-1")
    assert first["stat"] == second["stat"] == "Ok" and first["norenordno"] != second["norenordno"]
    rows = [r for r in noren_api.get_order_book() if r["remarks"] == "ours-1"]
    assert len(rows) == 2 and {r["status"] for r in rows} == {"COMPLETE"}
    assert sum(int(p["netqty"]) for p in noren_api.get_positions()) == 150  # both filled: the account is long 150



def test_a_stop_on_a_contract_without_a_price_names_the_simulators_own_tick_control(sim, noren_api):
    """Found from outside: the Noren simulator's refusal told a live tester to use the paper mode's /api/paper/ticks."""
    noren_api.place_order("S", "M", "NFO", "NIFTY28APR26P24500", 75, 0, "SL-LMT", price="40", trigger_price="40.5",
                          remarks="stop-1")
    [row] = [r for r in noren_api.get_order_book() if r.get("remarks") == "stop-1"]
    assert row["status"] == "REJECTED" and "/sim/control" in row["rejreason"], row
    assert "/api/paper" not in row["rejreason"], row


# ---- 2. late booking ----

def test_a_late_booking_answers_only_when_booked_and_the_book_is_empty_until_then(sim):
    control(sim, action="book_late", seconds=1.5)
    t0 = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        raw(sim, "PlaceOrder", timeout=0.5, **order())
    assert booked(sim, "ours-1") == []  # the client gave up, and the book has nothing: no proof either way
    o = wait_for(lambda: booked(sim, "ours-1"), timeout=5)
    assert time.monotonic() - t0 >= 1.4 and len(o) == 1
    assert raw(sim, "PlaceOrder", **order(remarks="ours-2"))["stat"] == "Ok"  # the fault is used once


def test_a_late_booking_with_no_reply_drops_the_connection_then_books(sim):
    control(sim, action="book_late", seconds=1.0, reply="none")
    t0 = time.monotonic()
    with pytest.raises(requests.exceptions.ConnectionError) as e:
        raw(sim, "PlaceOrder", timeout=3, **order())
    assert "RemoteDisconnected" in repr(e.value) and time.monotonic() - t0 < 0.9  # dropped, not timed out
    assert booked(sim, "ours-1") == []
    [o] = wait_for(lambda: booked(sim, "ours-1"), timeout=5)
    assert time.monotonic() - t0 >= 0.9 and o.status is OrderStatus.FILLED


# ---- 3. a dropped connection after booking ----

def test_a_dropped_connection_after_booking_leaves_the_order_booked(sim, noren_api):
    assert control(sim, action="drop_next")["ok"]
    with pytest.raises(requests.exceptions.ConnectionError):
        noren_api.place_order("B", "M", "NFO", SYMBOL, 75, 0, "LMT", price="43", remarks="ours-9")
    [row] = noren_api.get_order_book()
    assert (row["remarks"], row["status"]) == ("ours-9", "COMPLETE")
    assert noren_api.get_positions()[0]["netqty"] == "75"


def test_drop_next_can_hit_any_route(sim, noren_api):
    control(sim, action="drop_next", route="OrderBook", count=1)
    noren_api.place_order("B", "M", "NFO", SYMBOL, 75, 0, "LMT", price="43", remarks="a")
    with pytest.raises(requests.exceptions.ConnectionError):
        noren_api.get_order_book()
    assert len(noren_api.get_order_book()) == 1


# ---- 4. orders from the broker's app ----

def test_an_order_from_the_brokers_app_has_no_remarks_and_shows_everywhere(sim, noren_api):
    noren_api.place_order("B", "M", "NFO", SYMBOL, 75, 0, "LMT", price="43", remarks="ours-1")
    oid = control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)["norenordno"]
    rows = {r["norenordno"]: r for r in noren_api.get_order_book()}
    assert (rows[oid]["remarks"], rows[oid]["status"], rows[oid]["trantype"]) == ("", "COMPLETE", "S")
    trades = [t for t in noren_api.get_trade_book() if t["norenordno"] == oid]
    assert len(trades) == 1 and trades[0]["remarks"] == "" and trades[0]["flqty"] == "75"
    [pos] = noren_api.get_positions()
    assert (pos["netqty"], pos["daybuyqty"], pos["daysellqty"]) == ("0", "75", "75")


def test_a_refused_manual_order_says_why(sim):
    r = requests.post(f"http://127.0.0.1:{sim.port}/sim/control", timeout=5,
                      json={"action": "manual_order", "exchange": "NFO", "symbol": SYMBOL, "side": "B", "qty": 50})
    assert r.status_code == 400 and "lot size 75" in r.json()["error"]


# ---- 5. a new day ----

def test_a_new_day_empties_the_books_carries_nrml_and_squares_off_mis(sim, noren_api):
    eng = sim.sim.engine
    eng.set_ltp("NSE", "RELIANCE-EQ", Decimal("1400"))
    noren_api.place_order("B", "M", "NFO", SYMBOL, 150, 0, "LMT", price="43", remarks="nrml")
    sim.sim.tick("NFO", "NIFTY28APR26F", Decimal("24500"))
    noren_api.place_order("S", "M", "NFO", "NIFTY28APR26F", 75, 0, "LMT", price="24000", remarks="short")
    noren_api.place_order("B", "I", "NFO", SYMBOL, 75, 0, "LMT", price="43", remarks="mis")
    noren_api.place_order("B", "C", "NSE", "RELIANCE-EQ", 10, 0, "LMT", price="1400", remarks="cnc")
    resting = noren_api.place_order("B", "M", "NFO", SYMBOL, 75, 0, "LMT", price="30", remarks="resting")
    sim.sim.tick("NFO", SYMBOL, Decimal("44"))
    today = eng.day

    control(sim, action="new_day")
    assert noren_api.get_order_book() is None  # the session ended with the day
    api = noren_login(sim)
    assert api.get_order_book() is None and api.get_trade_book() is None  # "no data": the open DAY order is gone
    assert eng.get(resting["norenordno"]) is None
    rows = {(p["tsym"], p["prd"]): p for p in api.get_positions()}
    assert set(rows) == {(SYMBOL, "M"), ("NIFTY28APR26F", "M")}  # MIS squared off, CNC moved to holdings
    long = rows[(SYMBOL, "M")]
    assert (long["netqty"], long["cfbuyqty"], long["cfsellqty"], long["daybuyqty"]) == ("150", "150", "0", "0")
    assert (long["cfbuyamt"], long["upldprc"], long["cfbuyavgprc"]) == ("6600.00", "44.00", "44.00")
    short = rows[("NIFTY28APR26F", "M")]
    assert (short["netqty"], short["cfsellqty"], short["cfsellamt"]) == ("-75", "75", "1837500.00")
    [held] = api.get_holdings()
    assert (held["exch_tsym"][0]["tsym"], held["holdqty"]) == ("RELIANCE-EQ", "10")
    quote = api.get_quotes("NFO", "43212")
    assert (quote["lp"], quote["c"]) == ("0.00", "44.00")  # not traded yet today; yesterday's close is known

    sim.sim.tick("NFO", SYMBOL, Decimal("45"))
    placed = api.place_order("S", "M", "NFO", SYMBOL, 150, 0, "LMT", price="45", remarks="exit")
    assert placed["norenordno"].startswith(eng.day.strftime("%y%m%d")) and eng.day > today
    [long] = [p for p in api.get_positions() if p["tsym"] == SYMBOL]
    assert (long["netqty"], long["cfbuyqty"], long["daysellqty"], Decimal(long["rpnl"])) == ("0", "150", "150", 150)


def test_the_brokers_square_off_closes_mis_with_orders_of_no_remarks(sim, noren_api):
    noren_api.place_order("B", "I", "NFO", SYMBOL, 75, 0, "LMT", price="43", remarks="mis")
    noren_api.place_order("B", "I", "NFO", SYMBOL, 75, 0, "LMT", price="30", remarks="mis-open")
    noren_api.place_order("B", "M", "NFO", SYMBOL, 75, 0, "LMT", price="43", remarks="nrml")
    [oid] = control(sim, action="square_off")["orders"]
    rows = {r["norenordno"]: r for r in noren_api.get_order_book()}
    assert (rows[oid]["remarks"], rows[oid]["trantype"], rows[oid]["prd"], rows[oid]["status"]) == ("", "S", "I", "COMPLETE")
    assert [r["status"] for r in rows.values() if r["remarks"] == "mis-open"] == ["CANCELED"]
    nets = {p["prd"]: p["netqty"] for p in noren_api.get_positions()}
    assert nets == {"I": "0", "M": "75"}


def test_a_persisted_engine_keeps_the_carried_positions_across_a_restart(tmp_path):
    from host.models import OrderRequest, OrderType, Product, Side
    eng = MatchingEngine(tmp_path / "sim.db")
    eng.set_ltp("NFO", SYMBOL, Decimal("40"))
    eng.place(OrderRequest("NFO", SYMBOL, Side.SELL, 75, OrderType.LMT, Product.NRML, Decimal("40"), remarks="x"))
    eng.new_day()
    again = MatchingEngine(tmp_path / "sim.db")
    assert again.order_book() == [] and again.day == eng.day
    assert {k: (m.net_qty, m.avg_price) for k, m in again.positions().items()} == {("NFO", SYMBOL, "M"): (-75, 40)}


# ---- 6. freeze quantity and lots ----

def test_security_info_answers_freeze_lot_and_tick(sim, noren_api):
    info = noren_api.get_security_info("NFO", "43212")
    assert (info["frzqty"], info["ls"], info["ti"]) == ("1800", "75", "0.05")
    assert "frzqty" not in noren_api.get_security_info("MCX", "254721")  # unknown: absent, never a guess


def test_orders_above_the_freeze_or_not_in_whole_lots_are_refused_and_not_booked(sim, noren_api):
    above = raw(sim, "PlaceOrder", **order(qty="1875"))
    assert above["stat"] == "Not_Ok" and "freeze quantity 1800" in above["emsg"]
    odd = raw(sim, "PlaceOrder", **order(qty="50"))
    assert odd["stat"] == "Not_Ok" and "multiple of lot size 75" in odd["emsg"]
    assert noren_api.place_order("B", "M", "NFO", SYMBOL, 1875, 0, "LMT", price="43", remarks="r") is None
    assert sim.sim.engine.order_book() == []
    assert raw(sim, "PlaceOrder", **order(qty="1800"))["stat"] == "Ok"  # exactly the freeze: accepted
    control(sim, action="freeze_inclusive", on=True)
    assert "freeze" in raw(sim, "PlaceOrder", **order(qty="1800"))["emsg"]
    control(sim, action="instrument", exchange="NFO", symbol=SYMBOL, freeze_qty=900)
    assert noren_api.get_security_info("NFO", "43212")["frzqty"] == "900"
    working = raw(sim, "PlaceOrder", **order(qty="75", prc="30"))["norenordno"]
    assert "freeze quantity 900" in raw(sim, "ModifyOrder", norenordno=working, exch="NFO", tsym=SYMBOL,
                                        qty="975", prctyp="LMT", prc="30")["emsg"]



def test_a_stop_cannot_be_turned_into_another_order_type_by_a_modification(sim, noren_api):
    """The worse reading of the broker: ModifyOrder keeps a stop a stop (its trigger may move), unless allowed."""
    stop = noren_api.place_order("S", "M", "NFO", SYMBOL, 75, 0, "SL-LMT", price="29.4", trigger_price="30",
                                 remarks="stop")["norenordno"]
    refused = raw(sim, "ModifyOrder", norenordno=stop, exch="NFO", tsym=SYMBOL, qty="75", prctyp="LMT", prc="41")
    assert refused["stat"] == "Not_Ok" and "cannot be changed from SL-LMT to LMT" in refused["emsg"], refused
    assert noren_api.modify_order(stop, "NFO", SYMBOL, 75, "LMT", newprice="41") is None  # the library: None
    assert noren_api.modify_order(stop, "NFO", SYMBOL, 75, "SL-LMT", newprice="30.4",
                                  newtrigger_price="31")["stat"] == "Ok"
    o = sim.sim.engine.get(stop)
    assert (o.status.value, o.req.order_type.value, o.req.trigger_price) == ("OPEN", "SL-LMT", Decimal("31"))
    control(sim, action="stop_type_changes", on=True)
    assert noren_api.modify_order(stop, "NFO", SYMBOL, 75, "LMT", newprice="42.5")["stat"] == "Ok"
    assert sim.sim.engine.get(stop).status.value == "FILLED"



def test_the_api_takes_no_market_order_without_protection_but_the_app_does(sim, noren_api):
    """DESIGN.md: API market orders must carry price protection. The worse reading covers SL-MKT too (a market
    order once triggered): both are refused at PlaceOrder and ModifyOrder, and nothing is booked."""
    for prctyp, extra in (("MKT", {}), ("SL-MKT", {"trgprc": "30"})):
        refused = raw(sim, "PlaceOrder", **order(prctyp=prctyp, prc="0", **extra))
        assert refused["stat"] == "Not_Ok" and f"{prctyp} orders without market protection" in refused["emsg"]
    assert sim.sim.engine.order_book() == []
    working = raw(sim, "PlaceOrder", **order(prc="30"))["norenordno"]
    refused = raw(sim, "ModifyOrder", norenordno=working, exch="NFO", tsym=SYMBOL, qty="75", prctyp="MKT", prc="0")
    assert refused["stat"] == "Not_Ok" and "MKT orders without market protection" in refused["emsg"]
    assert sim.sim.engine.get(working).status.value == "OPEN"
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)  # the app's own: taken
    assert [o.status.value for o in sim.sim.engine.order_book() if o.side.value == "SELL"] == ["FILLED"]


# ---- 7. quotes ----

def test_quotes_answer_lp_zero_for_an_untraded_contract_and_carry_circuit_limits(sim, noren_api):
    q = noren_api.get_quotes("NFO", PUT_TOKEN)
    assert q["lp"] == "0.00" and "lc" not in q
    control(sim, action="quote", exchange="NFO", symbol=PUT, lc="0.05", uc="120.5", c="61.2")
    q = noren_api.get_quotes("NFO", PUT_TOKEN)
    assert (q["lp"], q["lc"], q["uc"], q["c"], q["tsym"]) == ("0.00", "0.05", "120.50", "61.20", PUT)
    assert noren_api.get_quotes("NFO", "43212")["lp"] == "42.50"
    control(sim, action="quote", exchange="NFO", symbol=SYMBOL, no_trades=True)
    assert noren_api.get_quotes("NFO", "43212")["lp"] == "0.00"


def test_a_limit_price_outside_the_circuit_is_booked_rejected(sim, noren_api):
    control(sim, action="quote", exchange="NFO", symbol=SYMBOL, lc="30", uc="55")
    oid = noren_api.place_order("B", "M", "NFO", SYMBOL, 75, 0, "LMT", price="60", remarks="x")["norenordno"]
    row = noren_api.single_order_history(oid)[0]
    assert row["status"] == "REJECTED" and "out of the day's price range" in row["rejreason"]


def test_a_quote_can_answer_with_another_contracts_price(sim, noren_api):
    control(sim, action="wrong_quote_next", lp="24512.35")
    q = noren_api.get_quotes("NFO", "43212")
    assert (q["tsym"], q["lp"]) == (SYMBOL, "24512.35")  # names our contract, with the index's price
    assert noren_api.get_quotes("NFO", "43212")["lp"] == "42.50"


# ---- 8. cover and bracket orders ----

def test_a_cover_order_from_the_app_shows_its_legs_and_an_h_position(sim, noren_api):
    oid = control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="B", qty=75, prd="H",
                  blprc="2")["norenordno"]
    rows = noren_api.get_order_book()
    assert {r["prd"] for r in rows} == {"H"} and len(rows) == 2
    [stop] = [r for r in rows if r["norenordno"] != oid]
    assert (stop["snonum"], stop["status"], stop["trantype"], stop["trgprc"]) == (oid, "TRIGGER_PENDING", "S", "40.5")
    [pos] = noren_api.get_positions()
    assert (pos["prd"], pos["s_prdt_ali"], pos["netqty"]) == ("H", "CO", "75")
    sim.sim.tick("NFO", SYMBOL, Decimal("40"))
    assert wait_for(lambda: noren_api.get_positions()[0]["netqty"] == "0")


def test_a_bracket_order_fills_one_leg_and_cancels_the_other(sim, noren_api):
    placed = noren_api.place_order("B", "B", "NFO", SYMBOL, 75, 0, "LMT", price="43", remarks="ours-b",
                                   bookloss_price="2", bookprofit_price="3")
    oid = placed["norenordno"]
    legs = {r["snoordt"]: r for r in noren_api.get_order_book()}
    assert set(legs) == {"0", "1", "2"} and {r["remarks"] for r in legs.values()} == {"ours-b"}  # legs share remarks
    assert (legs["1"]["prc"], legs["1"]["prctyp"], legs["2"]["trgprc"]) == ("45.5", "LMT", "40.5")
    sim.sim.tick("NFO", SYMBOL, Decimal("46"))
    legs = {r["snoordt"]: r for r in noren_api.get_order_book()}
    assert (legs["1"]["status"], legs["2"]["status"]) == ("COMPLETE", "CANCELED")
    [pos] = noren_api.get_positions()
    assert (pos["prd"], pos["netqty"], Decimal(pos["rpnl"])) == ("B", "0", Decimal("3.5") * 75)
    assert noren_api.exit_order(oid, "B") is None  # nothing left to exit


def test_exiting_a_cover_order_cancels_its_stop_and_closes_at_market(sim, noren_api):
    oid = noren_api.place_order("S", "H", "NFO", SYMBOL, 75, 0, "LMT", price="40", remarks="co",
                                bookloss_price="5")["norenordno"]
    assert noren_api.exit_order(oid, "H")["stat"] == "Ok"
    [pos] = noren_api.get_positions()
    assert (pos["prd"], pos["netqty"]) == ("H", "0")


def test_a_cover_order_needs_its_stop_loss(sim):
    assert "blprc" in raw(sim, "PlaceOrder", **order(prd="H"))["emsg"]


# ---- controls ----

def test_an_unknown_control_is_refused(sim):
    r = requests.post(f"http://127.0.0.1:{sim.port}/sim/control", json={"action": "nope"}, timeout=5)
    assert r.status_code == 400 and "unknown action" in r.json()["error"]


def test_every_control_is_documented():
    from pathlib import Path
    from host.sim import server
    doc = (Path(__file__).parent.parent / "docs" / "simulator.md").read_text()
    for name in server.CONTROLS:
        assert f'"action":"{name}"' in doc.replace(" ", ""), name
        assert name in server.__doc__, name
    assert NorenSim().faults.book_late_s == 0 and NorenSim().faults.drop_next == 0  # faults start off


def _start_of_a_second() -> None:
    """Wait until a calendar second has just begun (a burst then falls within one)."""
    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def test_more_than_ten_order_messages_a_second_to_a_segment_are_refused_cancels_included(sim, noren_api):
    """SEBI's retail-algo rule, read the worse way: places, modifies and cancels all count, per exchange segment
    and calendar second. The simulator had no limit at all, so nothing showed a host that sends too fast."""
    _start_of_a_second()
    answers = [noren_api.place_order("B", "M", "NFO", SYMBOL, 75, 0, "LMT", price="30", remarks=f"r{i}")
               for i in range(8)]
    assert all(a and a["stat"] == "Ok" for a in answers), answers
    oids = [a["norenordno"] for a in answers]
    assert noren_api.cancel_order(oids[0])["stat"] == "Ok"
    assert noren_api.modify_order(oids[1], "NFO", SYMBOL, 75, "LMT", "31")["stat"] == "Ok"  # the tenth
    assert noren_api.cancel_order(oids[2]) is None  # the eleventh: refused (the library returns None for Not_Ok)
    assert sim.sim.engine.get(oids[2]).status.value == "OPEN"  # still working: a refused cancel cancels nothing
    other = noren_api.place_order("B", "M", "NSE", "RELIANCE-EQ", 1, 0, "LMT", price="1000", remarks="nse")
    assert other and other["stat"] == "Ok", other  # another segment has its own ten
    _start_of_a_second()
    assert noren_api.cancel_order(oids[2])["stat"] == "Ok"  # a new second
