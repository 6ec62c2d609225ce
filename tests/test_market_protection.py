"""Market protection (#11 of issue 12): a market order becomes a limit order built on a fresh, plausible
price. The real NorenRestApiPy talks to the Noren simulator on loopback."""
from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

import pytest
import requests

from host.brokers.base import Rejected
from host.instruments import Instruments
from host.models import OrderRequest, OrderType, Product, Side
from host.pricing import protected_limit

from conftest import SYMBOL, alert, wait_for

UID = "FA12345"
PUT = "NIFTY28APR26P24500"  # token 43213 in the sample instrument file; SYMBOL is 43212


def control(sim: Any, **body: Any) -> dict:
    r = requests.post(f"http://127.0.0.1:{sim.port}/sim/control", json=body, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def adapter(sim: Any, instruments: Instruments | None = None, **kw: Any):
    """A logged-in ShoonyaBroker on the real library, pointed at the simulator."""
    from host.brokers.shoonya import ShoonyaBroker
    broker = ShoonyaBroker(sim.api_url, sim.ws_url, Instruments.sample() if instruments is None else instruments,
                           Decimal("2"), timeout_s=2, **kw)
    broker.use_token(sim.sim.new_session(UID), UID)
    return broker


def market(remarks: str, side: Side = Side.BUY, symbol: str = SYMBOL) -> OrderRequest:
    return OrderRequest("NFO", symbol, side, 75, OrderType.MKT, Product.NRML, None, remarks=remarks)


def sent_price(sim: Any, remarks: str) -> Decimal:
    [booked] = [o for o in sim.sim.engine.order_book() if o.remarks == remarks]
    placed = sim.sim.engine.get(booked.broker_order_id)
    assert placed.req.order_type is OrderType.LMT
    return placed.req.price


def test_a_feed_price_older_than_ltp_max_age_is_replaced_by_getquotes(sim):
    broker = adapter(sim)
    broker.ltp_max_age_s = 0.3
    broker.apply_tick("NFO", SYMBOL, Decimal("40"))  # fresh: used as it is, no GetQuotes needed
    broker.place(market("fresh"))
    assert sent_price(sim, "fresh") == Decimal("40.80")
    broker.apply_tick("NFO", SYMBOL, Decimal("30"))
    time.sleep(0.5)  # the feed went quiet; the market is at 42.5
    broker.place(market("stale"))
    assert sent_price(sim, "stale") == Decimal("43.35")  # 42.5 + 2 % from GetQuotes, not 30 + 2 %


def test_a_quote_without_trades_today_is_refused_never_sent_at_the_minimum_tick(sim):
    broker = adapter(sim)
    control(sim, action="quote", exchange="NFO", symbol=SYMBOL, lc="0.05", uc="120.5", c="61.2", no_trades=True)
    with pytest.raises(Rejected) as refused:
        broker.place(market("untraded", Side.SELL))
    assert "lp 0" in str(refused.value) and f"NFO:{SYMBOL}" in str(refused.value)
    assert sim.sim.engine.order_book() == []  # never LMT 0.05


def test_a_quote_outside_the_circuit_limits_is_refused(sim):
    broker = adapter(sim)
    control(sim, action="quote", exchange="NFO", symbol=SYMBOL, lc="20", uc="65", c="42")
    control(sim, action="wrong_quote_next", count=1, lp="24512.35")  # another contract's price
    with pytest.raises(Rejected) as refused:
        broker.place(market("wrong"))
    assert "24512.35" in str(refused.value) and "circuit" in str(refused.value)
    assert sim.sim.engine.order_book() == []
    broker.place(market("right"))  # the next quote is this contract's own
    assert sent_price(sim, "right") == Decimal("43.35")


def test_a_feed_price_outside_the_circuit_limits_is_not_used(sim):
    broker = adapter(sim)
    control(sim, action="quote", exchange="NFO", symbol=SYMBOL, lc="20", uc="65", c="42")
    broker.place(market("learn"))  # GetQuotes: the day's limits are now known
    broker.apply_tick("NFO", SYMBOL, Decimal("24512.35"))
    broker.place(market("after"))
    assert sent_price(sim, "after") == Decimal("43.35")


def test_the_protected_price_stays_inside_the_circuit_limits_on_the_tick(sim):
    assert protected_limit(Side.BUY, Decimal("42.5"), Decimal("2"), Decimal("0.05"), Decimal("20"), Decimal("43.03")) \
        == Decimal("43.00")
    assert protected_limit(Side.SELL, Decimal("42.5"), Decimal("2"), Decimal("0.05"), Decimal("41.92"), Decimal("65")) \
        == Decimal("41.95")
    broker = adapter(sim)
    control(sim, action="quote", exchange="NFO", symbol=SYMBOL, lc="41.92", uc="43.03", c="42")
    broker.place(market("buy"))
    broker.place(market("sell", Side.SELL))
    assert sent_price(sim, "buy") == Decimal("43.00")
    assert sent_price(sim, "sell") == Decimal("41.95")
    assert all(o.status.value != "REJECTED" for o in sim.sim.engine.order_book())


def test_with_no_instrument_file_the_token_is_found_by_search_and_the_order_placed(sim):
    broker = adapter(sim, Instruments())  # no symbol file downloaded, no feed price
    broker.place(market("searched"))
    assert sent_price(sim, "searched") == Decimal("43.35")


def test_an_unknown_contract_is_refused_with_a_reason(sim):
    broker = adapter(sim, Instruments())
    with pytest.raises(Rejected) as refused:
        broker.place(market("nothing", symbol="NIFTY28APR26C99999"))
    assert "NFO:NIFTY28APR26C99999" in str(refused.value)
    assert sim.sim.engine.order_book() == []


def test_after_a_reconnect_every_symbol_held_or_worked_is_resubscribed(sim, tmp_path):
    from test_shoonya import _order, live_host, login
    h = live_host(sim, tmp_path / "var")
    try:
        login(h, sim)
        wait_for(lambda: h.runtime.broker.instruments.get("NFO", PUT))  # the symbol file, downloaded in the background
        sim.sim.engine.set_ltp("NFO", PUT, Decimal("60"))
        held = h.post(alert(direction="BUY", qty=75, price="43")).get_json()["orders"][0]["id"]
        working = h.post(alert(strategy="s2", tradingsymbol=PUT, direction="BUY", qty=75,
                               price="50")).get_json()["orders"][0]["id"]  # below the market: it rests
        wait_for(lambda: _order(h, held)["status"] == "FILLED" and _order(h, working)["status"] == "OPEN")
        feed = h.runtime.feed
        wait_for(lambda: feed.opens >= 1)
        opens = feed.opens
        control(sim, action="drop_ws")
        wait_for(lambda: feed.opens > opens, timeout=8)
        wanted = {("NFO", "43212"), ("NFO", "43213")}
        wait_for(lambda: sim.feed.clients and wanted <= sim.feed.clients[-1].touch, timeout=5)
    finally:
        h.stop()


def test_an_exit_moved_towards_the_market_stops_at_the_circuit_limit(sim):
    """Review 33: risk's move of an exit is priced from the last price, one step further each time, without the
    day's limits; at a circuit every move was refused (the exchange takes no price outside its band, ModifyOrder
    included) and the exit stayed where it was placed, above a market trading at the lower limit. The adapter keeps
    a modified price inside the day's limits when it knows them: the exit rests at the band's edge."""
    from dataclasses import replace
    broker = adapter(sim)
    control(sim, action="quote", exchange="NFO", symbol=SYMBOL, lc="40", uc="50", c="45")
    broker.place(market("learn"))  # GetQuotes: the day's limits are now known
    sell = OrderRequest("NFO", SYMBOL, Side.SELL, 75, OrderType.LMT, Product.NRML, Decimal("44"), remarks="exit")
    oid = broker.place(sell)
    refused = raw_modify(sim, oid, "38.35")
    assert refused["stat"] == "Not_Ok" and "out of the day's price range" in refused["emsg"], refused
    broker.modify(oid, replace(sell, price=Decimal("38.35")))  # a move priced below the lower limit
    assert sim.sim.engine.get(oid).req.price == Decimal("40.00")
    buy = OrderRequest("NFO", SYMBOL, Side.BUY, 75, OrderType.LMT, Product.NRML, Decimal("41"), remarks="cover")
    oid = broker.place(buy)
    broker.modify(oid, replace(buy, price=Decimal("52.10")))
    assert sim.sim.engine.get(oid).req.price == Decimal("50.00")


def raw_modify(sim: Any, norenordno: str, price: str) -> dict:
    """ModifyOrder to a LMT at `price`, straight to the simulator (the library returns None on a refusal)."""
    token = sim.sim.new_session(UID)
    body = {"uid": UID, "norenordno": norenordno, "exch": "NFO", "tsym": SYMBOL, "qty": "75", "prctyp": "LMT",
            "prc": price}
    return requests.post(sim.api_url + "ModifyOrder", data="jData=" + json.dumps(body),
                         headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
