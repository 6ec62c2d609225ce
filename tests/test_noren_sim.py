"""The Noren simulator itself, driven by the real NorenRestApiPy library; adapter pieces that need no host."""
from __future__ import annotations

import time

import pytest
from NorenRestApiPy.NorenApi import NorenApi

from host.brokers.shoonya import RateLimiter, broker_order
from host.brokers.shoonya_feed import ShoonyaFeed
from host.instruments import Instruments

SYMBOL = "NIFTY28APR26C24500"


@pytest.fixture
def api(sim):
    token = sim.sim.new_session("FA1")
    a = NorenApi(host=sim.api_url, websocket=sim.ws_url)
    a.injectOAuthHeader(token, "FA1", "FA1")
    a.set_credentials(token, "FA1", "FA1")
    return a


def test_modify_order_changes_a_working_order(sim, api):
    placed = api.place_order("B", "M", "NFO", SYMBOL, 75, 0, "LMT", price=40.0, remarks="m1")
    oid = placed["norenordno"]
    assert api.get_order_book()[0]["status"] == "OPEN"
    assert api.modify_order(oid, "NFO", SYMBOL, 150, "LMT", newprice=43.0)["stat"] == "Ok"
    row = api.single_order_history(oid)[0]
    assert (row["status"], row["qty"], row["fillshares"]) == ("COMPLETE", "150", "150")


def test_list_routes_answer_no_data_when_empty_and_errors_name_the_problem(sim, api):
    assert api.get_order_book() is None and api.get_positions() is None  # Noren's Not_Ok "no data"
    assert api.get_limits()["stat"] == "Ok"
    assert api.searchscrip("NFO", "NIFTY28APR26C")["values"][0]["ls"] == "75"
    assert api.get_security_info("NFO", "43212")["ti"] == "0.05"


def test_the_rate_limiter_spaces_calls():
    limiter = RateLimiter(10)
    t0 = time.monotonic()
    for _ in range(6):
        limiter.wait()
    assert time.monotonic() - t0 >= 0.45  # 6 calls at 10/s: the 6th waits about 0.5 s


def test_a_sparse_order_update_is_completed_from_single_order_history(sim, api):
    placed = api.place_order("B", "M", "NFO", SYMBOL, 75, 0, "LMT", price=43.0, remarks="ours-7")
    updates = []

    class Broker:
        instruments = Instruments.sample()

        def __init__(self):
            self.api = api
    feed = ShoonyaFeed(Broker(), set, lambda ticks: None, updates.append)
    sparse = {"t": "om", "norenordno": placed["norenordno"], "status": "COMPLETE", "reporttype": "Fill"}
    update = feed._order(sparse)
    assert update.remarks == "ours-7" and update.filled_qty == 75
    assert feed._order(sparse) is None  # the same update twice is handed on once


def test_order_book_rows_map_to_our_statuses():
    assert broker_order({"norenordno": "1", "status": "OPEN", "fillshares": "25", "avgprc": "10"}).status.value == "PARTIAL"
    assert broker_order({"norenordno": "1", "status": "TRIGGER_PENDING"}).status.value == "OPEN"
    rejected = broker_order({"norenordno": "1", "status": "REJECTED", "rejreason": "RMS:Blocked"})
    assert (rejected.status.value, rejected.reason) == ("REJECTED", "RMS:Blocked")
    assert broker_order({"norenordno": "1", "status": "CANCELED"}).reason == "cancelled at the broker"
