"""Issue 12, defect by defect, in live mode.

Every test runs the host with BROKER=shoonya: the real NorenRestApiPy talks over loopback to the Noren
simulator (the `sim` fixture), and the faults are the simulator's own (`POST /sim/control`): late booking,
dropped connections, orders from the broker's app, the broker's square-off, a new day, freeze quantities,
a stalled feed, cover and bracket orders. What is asserted is what matters with money: the orders the
broker holds (found by our id in `remarks`), the positions against the broker's net, statuses, events.

#11 (market protection on a fresh, plausible price) is covered in tests/test_market_protection.py, over
the same wire; it is not repeated here.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from datetime import datetime, time as dtime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional

import pytest
import requests

from conftest import SYMBOL, D, Host, alert, make_settings, noren_login, wait_for
from host.models import ExecutionType, Intent, OrderType, Product, Side
from host.plugins.strategies import Asked

UID = "FA12345"
PUT = "NIFTY28APR26P24500"         # lot 75, freeze 1800
FUT = "NIFTY28APR26F"              # lot 75, freeze 1800, tick 0.10
BNF = "BANKNIFTY28APR26P50000"     # lot 35, freeze 900


# ---- the simulator ----

def control(sim: Any, **body: Any) -> dict:
    """A /sim/control action, over HTTP as any test client would send it."""
    r = requests.post(f"http://127.0.0.1:{sim.port}/sim/control", json=body, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def booked(sim: Any, remarks: str) -> list:
    """Every order the broker holds with these remarks (remarks are free text: there may be several)."""
    return sim.sim.engine.find_all(remarks)


def broker_net(sim: Any, symbol: str, product: str = "M", exchange: str = "NFO") -> int:
    p = sim.sim.engine.positions().get((exchange, symbol, product))
    return p.net_qty if p else 0


def sim_status(sim: Any, remarks: str) -> str:
    [o] = booked(sim, remarks)
    return o.status.value


# ---- the live host ----

def live_settings(sim: Any, data_dir: Path, api_url: Optional[str] = None, auth: str = "token", **env: Any):
    """Live settings with this morning's session: an access token given in the settings (SHOONYA_AUTH=token), or
    (oauth) one saved by this morning's login through the dashboard, which can then "Connect broker" again."""
    token = sim.sim.new_session(UID)
    if auth == "oauth":
        from host.broker_session import save_token
        save_token(data_dir, token, UID, UID)
    defaults = dict(BROKER="shoonya", SHOONYA_AUTH=auth, USER_ID=UID, SHOONYA_ACCESS_TOKEN=token,
                    OAUTH_CLIENT_ID=sim.sim.client_id, OAUTH_SECRET=sim.sim.client_secret,
                    SHOONYA_API_URL=api_url or sim.api_url, SHOONYA_WS_URL=sim.ws_url,
                    SHOONYA_OAUTH_URL=sim.oauth_url, SHOONYA_SYMBOLS_URL=f"http://127.0.0.1:{sim.port}/",
                    RISK_POLL_S=1)
    return make_settings(data_dir, **{**defaults, **env})


@pytest.fixture
def live(sim, tmp_path):
    """Builds logged-in live hosts on the simulator; stops them all at the end."""
    started: list[Host] = []

    def make(timeout_s: float = 1.0, grace_s: float = 5.0, api_url: Optional[str] = None, on: Any = None,
             **env: Any) -> Host:
        server = on or sim
        h = Host(live_settings(server, tmp_path / f"var{len(started)}", api_url, **env), broker_timeout_s=timeout_s,
                 unknown_grace_s=grace_s)
        started.append(h)
        h.start()
        # the instrument master (lots, ticks, freeze quantities) is downloaded in the background
        wait_for(lambda: h.broker.instruments.get("NFO", BNF), timeout=5)
        wait_for(lambda: not h.api("/api/risk").get_json().get("blind"), timeout=5)  # positions read
        return h
    yield make
    for h in started:
        h.stop()


def login(h: Host, sim: Any) -> None:
    """"Connect broker" on the dashboard, as the browser does it: OAuth, then the engine loads the new session."""
    from test_shoonya import login as browser_login
    answer = browser_login(h, sim)
    assert answer["broker_session"] == "valid" and answer["engine"] == "updated", answer


def order(h: Host, oid: str) -> dict:
    return next(o for o in h.orders() if o["id"] == oid)


def status(h: Host, oid: str) -> str:
    return order(h, oid)["status"]


def wait_status(h: Host, oid: str, *wanted: str, timeout: float = 6.0) -> dict:
    return wait_for(lambda: (o := order(h, oid))["status"] in wanted and o, timeout=timeout)


def place(h: Host, expect: int = 200, **kw: Any) -> dict:
    """Post an alert; its JSON answer (asserting the HTTP status)."""
    r = h.post(alert(**kw))
    assert r.status_code == expect, r.get_json()
    return r.get_json()


def entry(h: Host, **kw: Any) -> str:
    """An accepted ENTRY with one order; its id."""
    [o] = place(h, **kw)["orders"]
    return o["id"]


def history(h: Host, oid: str) -> list[str]:
    return [r["status"] for r in h.runtime.storage.rows("select status from order_history where order_id = ? "
                                                        "order by rowid", (oid,))]


def events(h: Host, kind: str, after: int = 0) -> list[dict]:
    return h.runtime.storage.rows("select * from events where kind = ? and id > ? order by id", (kind, after))


def last_event(h: Host) -> int:
    return h.runtime.storage.one("select coalesce(max(id), 0) n from events")["n"]


def net(h: Host, strategy: str, symbol: str, product: str = "M") -> int:
    row = h.runtime.storage.one("select net_qty from positions where strategy = ? and symbol = ? and product = ?",
                                (strategy, symbol, product))
    return row["net_qty"] if row else 0


def host_net(h: Host, symbol: str, product: str = "M") -> int:
    """The host's net over every strategy (manual included) in one instrument."""
    row = h.runtime.storage.one("select coalesce(sum(net_qty), 0) n from positions where symbol = ? and product = ?",
                                (symbol, product))
    return row["n"]


def exit_all(h: Host) -> dict:
    r = h.api("/api/exit-all", "POST")
    assert r.status_code == 200, r.get_json()
    return r.get_json()


# ---- #1: a position closed outside the host ----

def test_1_a_position_closed_in_the_app_or_squared_off_by_the_broker_shrinks_the_strategy_that_held_it(live, sim):
    h = live()
    sim.sim.tick("NFO", PUT, Decimal("60"))
    sim.sim.tick("NFO", FUT, Decimal("24100"))
    held = entry(h, strategy="s1", direction="BUY", qty=75, price="43")                       # NRML +75
    mis = entry(h, strategy="s2", tradingsymbol=PUT, direction="BUY", qty=75, price="61", product_type="I")
    wait_status(h, held, "FILLED")
    wait_status(h, mis, "FILLED")
    wait_for(lambda: net(h, "s1", SYMBOL) == 75 and net(h, "s2", PUT, "I") == 75)

    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)     # the trader, in the app
    squared = control(sim, action="square_off", products=["I"])["orders"]                    # the broker, at 15:20
    control(sim, action="manual_order", exchange="NFO", symbol=FUT, side="B", qty=75)        # nobody's position
    assert len(squared) == 1 and broker_net(sim, SYMBOL) == 0 and broker_net(sim, PUT, "I") == 0

    wait_for(lambda: net(h, "s1", SYMBOL) == 0 and net(h, "s2", PUT, "I") == 0 and net(h, "manual", FUT) == 75,
             timeout=6)
    closed = {e["strategy"] for e in events(h, "closed_outside")}
    assert closed == {"s1", "s2"}
    assert net(h, "manual", SYMBOL) == 0 and net(h, "manual", PUT, "I") == 0  # nothing re-assigned to `manual`

    # the strategies' next EXITs send nothing: the account is flat and must not go short
    for strategy, symbol, product in (("s1", SYMBOL, "M"), ("s2", PUT, "I")):
        answer = place(h, execution_type="EXIT", strategy=strategy, tradingsymbol=symbol, direction="SELL", qty=75,
                       order_type="MKT", price=None, product_type=product)
        assert answer.get("orders", []) == [], answer
    time.sleep(1.2)  # a position poll later: still nothing sent, nothing counted again
    assert broker_net(sim, SYMBOL) == 0 and broker_net(sim, PUT, "I") == 0 and broker_net(sim, FUT) == 75
    assert (host_net(h, SYMBOL), host_net(h, PUT, "I"), host_net(h, FUT)) == (0, 0, 75)
    assert [o.remarks for o in sim.sim.engine.order_book() if o.remarks] == [held, mis]  # no exit went out


# ---- #2: freeze quantity, odd lots, a flatten per position ----

def test_2_positions_above_the_freeze_or_in_odd_lots_are_exited_per_position_in_slices(live, sim):
    h = live()
    sim.sim.tick("NFO", BNF, Decimal("100"))
    sim.sim.tick("NFO", PUT, Decimal("60"))
    big = place(h, tradingsymbol=BNF, direction="BUY", qty=1050, price="101")["orders"]     # 30 lots > freeze 900
    put = entry(h, tradingsymbol=PUT, direction="BUY", qty=75, price="61")
    for oid in [o["id"] for o in big] + [put]:
        wait_status(h, oid, "FILLED")
    control(sim, action="partial", max_fill_qty=50)
    odd = entry(h, direction="BUY", qty=75, price="43")               # fills 50 of a 75 lot (an odd position)...
    wait_status(h, odd, "PARTIAL")
    control(sim, action="partial", max_fill_qty=None)
    [odd_at_broker] = booked(sim, odd)
    app = noren_login(sim, UID)                                        # ...and the trader cancels the rest
    assert app.cancel_order(odd_at_broker.broker_order_id)["stat"] == "Ok"
    wait_status(h, odd, "CANCELLED")
    assert sorted(o["qty"] for o in big) == [175, 875] and broker_net(sim, BNF) == 1050
    assert (net(h, "s1", BNF), net(h, "s1", PUT), net(h, "s1", SYMBOL)) == (1050, 75, 50)

    # an EXIT of the whole position above the freeze: accepted, in slices of whole lots under the freeze
    answer = place(h, execution_type="EXIT", tradingsymbol=BNF, direction="SELL", qty=1050, order_type="MKT", price=None)
    exits = [o["id"] for o in answer["orders"]]
    assert sorted(o["qty"] for o in answer["orders"]) == [175, 875]
    for oid in exits:
        wait_status(h, oid, "FILLED")
    assert broker_net(sim, BNF) == 0 and net(h, "s1", BNF) == 0

    # exit-all: the odd position (50 of a 75 lot) is tried and refused by the broker; the other still exits
    done = exit_all(h)
    assert len(done["orders"]) == 2, done
    by_symbol = {order(h, oid)["symbol"]: order(h, oid) for oid in done["orders"]}
    wait_status(h, by_symbol[PUT]["id"], "FILLED")
    refused = wait_status(h, by_symbol[SYMBOL]["id"], "REJECTED")
    assert by_symbol[SYMBOL]["qty"] == 50 and "lot size" in refused["reason"], refused
    assert broker_net(sim, PUT) == 0 and net(h, "s1", PUT) == 0
    assert broker_net(sim, SYMBOL) == 50 == net(h, "s1", SYMBOL)   # still held, and still the broker's number


# ---- #3: an OPEN order missing from a new day's book ----

def test_3_an_open_day_order_gone_from_the_new_days_book_expires_and_no_longer_blocks_the_exit(live, sim):
    h = live()
    held = entry(h, direction="BUY", qty=75, price="43")
    wait_status(h, held, "FILLED")
    [resting] = [o["id"] for o in place(h, execution_type="EXIT", direction="SELL", qty=75, price="50")["orders"]]
    wait_status(h, resting, "OPEN")
    # while the exit works, a second EXIT has nothing to exit: the working order covers the position
    assert place(h, execution_type="EXIT", direction="SELL", qty=75, price="50", alert_id="covered").get("orders") == []

    # the DAY order vanishes with no update; NRML +75 carries (cfbuyqty). The session is kept: the morning
    # login is not what this defect is about (and test 4 covers "Connect broker" again)
    control(sim, action="new_day", keep_sessions=True)
    assert booked(sim, resting) == [] and broker_net(sim, SYMBOL) == 75
    # the host's clock did not move with the simulator's: the order was placed "yesterday"
    stamp = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat(timespec="milliseconds")
    h.runtime.storage.write(lambda db: db.execute("update orders set created_at = ? where id = ?", (stamp, resting)))

    expired = wait_status(h, resting, "EXPIRED", timeout=6)
    assert expired["filled_qty"] == 0
    assert [e for e in events(h, "order_expired") if resting in e["message"]]
    sim.sim.tick("NFO", SYMBOL, Decimal("44"))
    [exit_id] = [o["id"] for o in place(h, execution_type="EXIT", direction="SELL", qty=75, order_type="MKT",
                                        price=None, alert_id="today")["orders"]]
    wait_status(h, exit_id, "FILLED")
    assert broker_net(sim, SYMBOL) == 0 and net(h, "s1", SYMBOL) == 0
    assert len(booked(sim, exit_id)) == 1


# ---- #4: recovery never resends an order the broker received late ----

def test_4_restart_retried_recovery_and_reconnect_never_resend_an_order_the_slow_broker_books_4s_late(live, sim):
    from test_broker_faults import NorenProxy
    proxy = NorenProxy(sim).start()  # counts every request on the wire
    try:
        h = live(api_url=proxy.api_url, auth="oauth")
        control(sim, action="book_late", seconds=4)  # received now, booked (and answered) 4 s later
        oid = entry(h, direction="BUY", qty=75, price="43")
        wait_for(lambda: sim.sim.faults.book_late_s == 0, timeout=3)
        books_at = time.monotonic() + 4.0
        wait_status(h, oid, "UNKNOWN", timeout=3)  # the host's 1 s timeout ran out first

        def still_not_resent(step: str) -> None:
            assert len(proxy.sent("PlaceOrder")) == 1, f"{step}: PlaceOrder was sent again"
            assert booked(sim, oid) == [], f"{step}: a second order is at the broker"
            assert time.monotonic() < books_at - 0.2, f"{step} finished after the booking: the test proves nothing"

        # a restart whose start-up read of the book fails; recovery is retried once the broker answers
        control(sim, action="forbid_next", count=1, route="OrderBook")
        reads = len(proxy.sent("OrderBook"))
        h.restart()
        assert sim.sim.faults.forbid_next == 0 and len(proxy.sent("OrderBook")) > reads  # the start-up read failed
        wait_for(lambda: len(proxy.sent("OrderBook")) >= reads + 2, timeout=2.5)         # and was retried
        still_not_resent("restart with a failed start-up read, then the retried recovery")
        assert status(h, oid) in ("UNKNOWN", "SUBMITTED")

        login(h, sim)  # "Connect broker" again: the engine reloads the session and reconciles
        still_not_resent("re-connect")

        wait_status(h, oid, "FILLED", timeout=8)  # booked late, found by its remarks
        time.sleep(0.5)
        assert len(proxy.sent("PlaceOrder")) == 1 and len(booked(sim, oid)) == 1
        assert order(h, oid)["broker_order_id"] == booked(sim, oid)[0].broker_order_id
        assert not events(h, "order_doubled")
        assert net(h, "s1", SYMBOL) == 75 == broker_net(sim, SYMBOL)
    finally:
        proxy.stop()


# ---- #5: a connection dropped after PlaceOrder is an unknown outcome ----

def test_5_a_dropped_placeorder_connection_is_unknown_then_resolved_from_the_book_never_rejected(live, sim):
    h = live()
    sim.sim.tick("NFO", PUT, Decimal("60"))
    control(sim, action="drop_next", count=1, route="PlaceOrder")       # booked, then the connection closes
    after_booking = entry(h, strategy="s1", direction="BUY", qty=75, price="40")
    wait_status(h, after_booking, "OPEN", timeout=5)
    control(sim, action="book_late", seconds=1, reply="none")           # dropped at once, booked 1 s later
    before_booking = entry(h, strategy="s2", tradingsymbol=PUT, direction="BUY", qty=75, price="55")
    wait_status(h, before_booking, "UNKNOWN", timeout=3)
    wait_status(h, before_booking, "OPEN", timeout=5)
    for oid in (after_booking, before_booking):
        [at_broker] = booked(sim, oid)
        assert order(h, oid)["broker_order_id"] == at_broker.broker_order_id
        assert "REJECTED" not in history(h, oid), history(h, oid)
    assert "UNKNOWN" in history(h, before_booking)

    # the rows are live, so exit-all finds and cancels both at the broker
    exit_all(h)
    for oid in (after_booking, before_booking):
        wait_status(h, oid, "CANCELLED", timeout=5)
        assert sim_status(sim, oid) == "CANCELLED"
    assert broker_net(sim, SYMBOL) == 0 and broker_net(sim, PUT) == 0


# ---- #6: the breach cancels entries in every state; a cancelled NEW order is never sent ----

def _quoted(h: Host, symbol: str) -> bool:
    return bool(h.runtime.storage.one("select 1 from quotes where symbol = ?", (symbol,)))


def _breach_by_tick(h: Host, sim: Any, symbol: str, ltp: str, timeout: float = 4.0) -> None:
    """Move the market against a position until the host's risk sees the loss (the feed subscribes new symbols
    every 2 s, so the first tick may come before the subscription)."""
    deadline = time.monotonic() + timeout
    while not h.api("/api/risk").get_json()["breached"]:
        assert time.monotonic() < deadline, h.api("/api/risk").get_json()
        sim.sim.tick("NFO", symbol, Decimal(ltp))
        time.sleep(0.15)


def _strategy_breach_by_tick(h: Host, sim: Any, timeout: float = 6.0) -> None:
    """Move the market against the positions until a strategy's own max loss fires."""
    deadline = time.monotonic() + timeout
    while not events(h, "risk_strategy_breach"):
        assert time.monotonic() < deadline
        sim.sim.tick("NFO", SYMBOL, Decimal("41"))
        time.sleep(0.1)


def test_6_the_breach_cancels_entries_in_every_state_and_a_new_one_is_never_sent(live, sim):
    h = live(timeout_s=2.5, RISK_BASE_MAX_LOSS="-100")
    sim.sim.tick("NFO", PUT, Decimal("60"))
    sim.sim.tick("NFO", BNF, Decimal("100"))
    loser = entry(h, strategy="s1", direction="BUY", qty=75, price="43")
    wait_status(h, loser, "FILLED")
    wait_for(lambda: _quoted(h, SYMBOL), timeout=4)  # the feed sends SYMBOL's price now
    working = entry(h, strategy="s2", tradingsymbol=PUT, direction="BUY", qty=75, price="55")
    wait_status(h, working, "OPEN")
    control(sim, action="partial", max_fill_qty=35)
    part = entry(h, strategy="s3", tradingsymbol=BNF, direction="BUY", qty=70, price="101")
    wait_status(h, part, "PARTIAL")
    control(sim, action="partial", max_fill_qty=None)
    control(sim, action="book_late", seconds=3)  # received now, booked 3 s later, after the host gives up (2.5 s)
    late = entry(h, strategy="s4", tradingsymbol=PUT, direction="BUY", qty=75, price="50")
    wait_for(lambda: sim.sim.faults.book_late_s == 0, timeout=3)
    queued = entry(h, strategy="s5", tradingsymbol=PUT, direction="BUY", qty=75, price="51")  # waits behind it
    assert (status(h, late), status(h, queued)) == ("SUBMITTED", "NEW")

    _breach_by_tick(h, sim, SYMBOL, "41")  # 75 x -1.5 = -112.5 <= -100
    assert status(h, late) in ("SUBMITTED", "UNKNOWN"), order(h, late)  # its broker id is not known yet
    cancelled = wait_status(h, queued, "CANCELLED", timeout=2)
    assert "before sending" in cancelled["reason"]

    for oid in (working, part, late):
        wait_status(h, oid, "CANCELLED", timeout=8)
        assert sim_status(sim, oid) == "CANCELLED", oid
    assert order(h, part)["filled_qty"] == 35
    time.sleep(0.3)
    assert booked(sim, queued) == [], "an order cancelled by the breach reached the broker"
    # the exits: s1's loser and s3's partial fill; nothing else is left at the broker
    wait_for(lambda: (net(h, "s1", SYMBOL), net(h, "s3", BNF)) == (0, 0), timeout=6)
    assert (broker_net(sim, SYMBOL), broker_net(sim, PUT), broker_net(sim, BNF)) == (0, 0, 0)
    assert h.api("/api/risk").get_json()["state"] == "halted"


# ---- #7: our own fill is never counted twice while the order book is unreadable ----

def test_7_our_fill_is_not_adopted_as_manual_while_the_order_book_does_not_answer(live, sim):
    from test_broker_faults import NorenProxy
    proxy = NorenProxy(sim).start()
    try:
        h = live(api_url=proxy.api_url)
        control(sim, action="stall_feed", on=True)                     # the fill's update never arrives
        control(sim, action="drop_next", count=4, route="OrderBook")   # and the book gives no answer for a while
        oid = entry(h, direction="BUY", qty=75, price="43")
        wait_status(h, oid, "OPEN")
        polls = len(proxy.sent("PositionBook"))
        wait_for(lambda: sim.sim.faults.drop_next == 0, timeout=8)
        assert len(proxy.sent("PositionBook")) >= polls + 2  # the broker's +75 was seen on two polls or more
        assert broker_net(sim, SYMBOL) == 75

        wait_for(lambda: net(h, "s1", SYMBOL) == 75, timeout=5)      # the book answers: our own fill
        polls = len(proxy.sent("PositionBook"))
        wait_for(lambda: len(proxy.sent("PositionBook")) >= polls + 2, timeout=4)
        assert net(h, "manual", SYMBOL) == 0 and not events(h, "manual_trade"), events(h, "manual_trade")
        assert host_net(h, SYMBOL) == 75 == broker_net(sim, SYMBOL)
        assert status(h, oid) == "FILLED"

        control(sim, action="stall_feed", on=False)
        done = exit_all(h)
        assert len(done["orders"]) == 1 and order(h, done["orders"][0])["qty"] == 75
        wait_status(h, done["orders"][0], "FILLED")
        assert broker_net(sim, SYMBOL) == 0 == host_net(h, SYMBOL)  # sold 75, not 150
    finally:
        proxy.stop()


# ---- #8: a lost fill is recovered from the broker's totals ----

def test_8_a_lost_fill_message_is_recovered_from_the_cumulative_update_and_from_the_books(live, sim):
    h = live()
    sim.sim.tick("NFO", PUT, Decimal("60"))
    control(sim, action="partial", max_fill_qty=75)
    # a middle fill lost: a later update says COMPLETE with the broker's cumulative quantity
    middle = entry(h, strategy="s1", direction="BUY", qty=225, price="43")
    wait_for(lambda: order(h, middle)["filled_qty"] == 75, timeout=4)
    control(sim, action="stall_feed", on=True)
    sim.sim.tick("NFO", SYMBOL, Decimal("42.4"))   # fill 2: its message is lost
    control(sim, action="stall_feed", on=False)
    sim.sim.tick("NFO", SYMBOL, Decimal("42.3"))   # fill 3: COMPLETE, 225 filled
    o = wait_status(h, middle, "FILLED")
    assert o["filled_qty"] == 225 and D(o["avg_price"]) == D("42.4")
    pos = h.position("s1", SYMBOL)
    assert pos["net_qty"] == 225 == broker_net(sim, SYMBOL)
    assert D(pos["avg_price"]) == sim.sim.engine.positions()[("NFO", SYMBOL, "M")].avg_price

    # the last fill lost, and no message after it: only the order book and the trade book can tell
    last = entry(h, strategy="s2", tradingsymbol=PUT, direction="BUY", qty=150, price="61")
    wait_for(lambda: order(h, last)["filled_qty"] == 75, timeout=4)
    control(sim, action="stall_feed", on=True)
    sim.sim.tick("NFO", PUT, Decimal("59.9"))
    try:
        o = wait_status(h, last, "FILLED", timeout=6)
    finally:
        control(sim, action="stall_feed", on=False)
        control(sim, action="partial", max_fill_qty=None)
    assert o["filled_qty"] == 150 and net(h, "s2", PUT) == 150 == broker_net(sim, PUT)
    fills = h.api(f"/api/orders/{last}").get_json()["fills"]
    assert sorted(f["qty"] for f in fills) == [75, 75]  # both fills, the lost one from the trade book


# ---- #9: EXIT cancels the strategy's own working entry ----

def test_9_an_exit_cancels_the_rest_of_the_strategys_working_entry(live, sim):
    h = live()
    control(sim, action="partial", max_fill_qty=75)
    first = entry(h, direction="BUY", qty=150, price="43")
    wait_status(h, first, "PARTIAL")                       # 75 held, 75 still working at the broker
    answer = place(h, execution_type="EXIT", direction="SELL", qty=75, order_type="MKT", price=None)
    [exit_id] = [o["id"] for o in answer["orders"]]
    wait_status(h, exit_id, "FILLED")
    entry_row = wait_status(h, first, "CANCELLED")
    assert entry_row["filled_qty"] == 75 and sim_status(sim, first) == "CANCELLED"
    control(sim, action="partial", max_fill_qty=None)
    sim.sim.tick("NFO", SYMBOL, Decimal("42"))             # the market crosses the old entry's price
    time.sleep(0.5)
    assert booked(sim, first)[0].filled_qty == 75
    assert broker_net(sim, SYMBOL) == 0 == net(h, "s1", SYMBOL)


# ---- #10: filled_qty never moves backwards ----

def _push_order_message(sim: Any, msg: dict) -> None:
    """Send an `om` message as the broker's feed would (late, or a second time)."""
    for client in list(sim.feed.clients):
        if client.orders:
            client.send(msg)


def test_10_an_older_or_repeated_order_update_never_moves_filled_qty_or_the_position(live, sim):
    from host.sim.server import order_update
    h = live()
    sim.sim.tick("NFO", FUT, Decimal("24100"))
    control(sim, action="partial", max_fill_qty=75)
    oid = entry(h, direction="BUY", qty=150, price="43")
    wait_status(h, oid, "PARTIAL")
    [at_broker] = booked(sim, oid)
    older = order_update(sim.sim, at_broker)                  # the PARTIAL 75 message, kept for later
    control(sim, action="partial", max_fill_qty=None)
    sim.sim.tick("NFO", SYMBOL, Decimal("42.4"))
    wait_status(h, oid, "FILLED")
    newer = order_update(sim.sim, booked(sim, oid)[0])       # the COMPLETE 150 message

    _push_order_message(sim, older)                           # arrives late
    _push_order_message(sim, newer)                           # and the last one again
    marker = control(sim, action="manual_order", exchange="NFO", symbol=FUT, side="B", qty=75, prctyp="LMT",
                     prc="100")["norenordno"]                 # its update comes after both on the same feed
    wait_for(lambda: any(marker in e["message"] for e in events(h, "manual_order")), timeout=4)
    o = order(h, oid)
    assert (o["status"], o["filled_qty"]) == ("FILLED", 150)
    assert net(h, "s1", SYMBOL) == 150 == broker_net(sim, SYMBOL)
    assert "PARTIAL" not in history(h, oid)[history(h, oid).index("FILLED"):]


# ---- #11: market protection: tests/test_market_protection.py ----


# ---- #12: cover and bracket rows never blind risk ----

def test_12_cover_and_bracket_orders_in_the_books_never_blind_risk(live, sim):
    h = live(RISK_BASE_MAX_LOSS="-100")
    sim.sim.tick("NFO", PUT, Decimal("60"))
    mine = entry(h, tradingsymbol=PUT, direction="BUY", qty=75, price="61")
    wait_status(h, mine, "FILLED")
    since = last_event(h)  # (risk was blind before the morning login, as it should be)
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="B", qty=75, prd="B", prctyp="LMT",
            prc="43", blprc="2", bpprc="3")                          # a bracket order: main leg, stop and target
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75, prd="H", prctyp="MKT",
            blprc="2")                                               # a cover order: main leg and stop
    wait_for(lambda: {r["prd"] for r in h.broker.unknown_products["positions"]} == {"B", "H"}, timeout=4)
    time.sleep(1.2)  # another position poll with those rows in every book
    assert {r["prd"] for r in h.broker.unknown_products["orders"]} == {"B", "H"}  # shown, not dropped
    risk = h.api("/api/risk").get_json()
    assert not events(h, "risk_blind", since) and not risk["blind"] and risk["state"] == "active", risk
    other = entry(h, strategy="s2", direction="BUY", qty=75, price="40")  # entries are still accepted
    wait_status(h, other, "OPEN")

    _breach_by_tick(h, sim, PUT, "58")  # and a loss is still seen: 75 x -2 = -150
    wait_for(lambda: net(h, "s1", PUT) == 0 and broker_net(sim, PUT) == 0, timeout=6)
    wait_status(h, other, "CANCELLED")
    assert broker_net(sim, SYMBOL, "B") == 75 and broker_net(sim, SYMBOL, "H") == -75  # the trader's, untouched


# ---- the host killed at each step of an order's life, with late booking on ----

def _proc_orders(s: Any) -> dict[str, dict]:
    return {o["id"]: o for o in s.api("/api/orders", params={"limit": 100}).json()["items"]}


def _proc_status(s: Any, oid: str) -> Optional[str]:
    o = _proc_orders(s).get(oid)
    return o and o["status"]


def _proc_wait(s: Any, oid: str, *wanted: str, timeout: float = 8.0) -> dict:
    return wait_for(lambda: (o := _proc_orders(s).get(oid)) and o["status"] in wanted and o, timeout=timeout,
                    interval=0.05)


@pytest.mark.slow
def test_killed_at_each_step_of_an_orders_life_one_order_at_the_broker_and_positions_equal_its_net(live, sim, tmp_path):
    """Before send, SUBMITTED written but nothing sent, received but not yet booked (late booking), booked but no
    reply, acknowledged, partly filled. After the restart: one order at the broker per order (none for the one
    that never left: it is LOST, never resent), and every position equal to the broker's net."""
    from host.orders import mark_submitted
    from host.sim.runner import SimServer
    from serverproc import ServerProcess

    # in this process, on a second simulator, the steps that must be placed precisely: the sender is stopped,
    # so one order stays NEW (never sent) and one is marked SUBMITTED exactly as the sender does before it calls
    # the broker; then the host is restarted on the same data, with the broker booking 4 s late
    other = SimServer().start()
    try:
        other.sim.engine.set_ltp("NFO", SYMBOL, Decimal("42.5"))
        other.sim.engine.set_ltp("NFO", PUT, Decimal("60"))
        h = live(on=other)
        h.runtime.sender.stop(2)
        unsent = entry(h, strategy="k_new", direction="BUY", qty=75, price="43")
        never_left = entry(h, strategy="k_submitted", tradingsymbol=PUT, direction="BUY", qty=75, price="61")
        assert h.runtime.storage.write(lambda db: mark_submitted(db, never_left), durable=True) is not None
        control(other, action="book_late", seconds=4)
        h.restart()  # NEW is sent now (and booked 4 s later); SUBMITTED is looked for, never resent

        # the real `strategy-host run`, killed with SIGKILL twice, on the `sim` simulator
        for symbol, ltp in ((PUT, "60"), (FUT, "24100"), (BNF, "100")):
            sim.sim.tick("NFO", symbol, Decimal(ltp))
        env = {"BROKER": "shoonya", "SHOONYA_AUTH": "token", "USER_ID": UID,
               "SHOONYA_ACCESS_TOKEN": sim.sim.new_session(UID), "SHOONYA_API_URL": sim.api_url,
               "SHOONYA_WS_URL": sim.ws_url, "SHOONYA_SYMBOLS_URL": f"http://127.0.0.1:{sim.port}/",
               "SQUARE_OFF_TIME": "off", "RISK_POLL_S": "1",
               "ALLOW_AMO": "true"}  # any hour: after-market orders when the exchange is closed
        servers: list[ServerProcess] = []

        def start() -> ServerProcess:
            s = ServerProcess(tmp_path / "proc", env=env)
            servers.append(s)
            s.start()
            wait_for(lambda: s.api("/api/risk").json().get("blind") is None, timeout=6, interval=0.1)
            return s

        try:
            s = start()
            secret = s.secrets()["WEBHOOK_SECRET"]

            def post(strategy: str, symbol: str, qty: int, price: str) -> str:
                body = {**alert(strategy=strategy, tradingsymbol=symbol, direction="BUY", qty=qty, price=price),
                        "secret_key": secret}
                r = s.webhook(body)
                assert r.status_code == 200, r.text
                return r.json()["orders"][0]["id"]

            acked = post("k_ack", FUT, 75, "24000")            # rests at the broker
            _proc_wait(s, acked, "OPEN")
            control(sim, action="partial", max_fill_qty=35)
            partly = post("k_partial", BNF, 70, "101")         # 35 of 70 filled
            _proc_wait(s, partly, "PARTIAL")
            control(sim, action="partial", max_fill_qty=None)
            control(sim, action="book_late", seconds=4)
            received = post("k_late", SYMBOL, 75, "43")        # at the broker, booked only 4 s later
            wait_for(lambda: sim.sim.faults.book_late_s == 0, timeout=3)
            queued = post("k_queued", PUT, 75, "61")           # NEW, behind the one in flight
            assert (_proc_status(s, received), _proc_status(s, queued)) == ("SUBMITTED", "NEW")
            s.kill9()
            assert booked(sim, received) == [] and booked(sim, queued) == []

            s = start()  # before the late booking: `received` must not be sent again; `queued` goes now
            assert booked(sim, received) == [], "the restart sent the order the broker had received again"
            _proc_wait(s, queued, "FILLED")
            _proc_wait(s, received, "FILLED")                  # booked late, found by its remarks
            sim.sim.tick("NFO", FUT, Decimal("23990"))         # the acknowledged one fills
            sim.sim.tick("NFO", BNF, Decimal("100"))           # the rest of the partly filled one
            _proc_wait(s, acked, "FILLED")
            _proc_wait(s, partly, "FILLED")

            control(sim, action="stall_feed", on=True)         # no update over the feed either
            control(sim, action="delay_next", seconds=4)       # booked (and filled) at once, answered 4 s late
            no_reply = post("k_noreply", SYMBOL, 75, "43")
            wait_for(lambda: booked(sim, no_reply), timeout=3)
            assert _proc_status(s, no_reply) == "SUBMITTED"
            s.kill9()
            control(sim, action="stall_feed", on=False)

            s = start()
            _proc_wait(s, no_reply, "FILLED")
            time.sleep(1.0)  # time for a wrong resend to happen
            orders = _proc_orders(s)
            for oid in (acked, partly, received, queued, no_reply):
                assert len(booked(sim, oid)) == 1, (oid, orders[oid]["strategy"], booked(sim, oid))
                assert orders[oid]["broker_order_id"] == booked(sim, oid)[0].broker_order_id
            positions = s.api("/api/positions").json()["items"]
            for symbol, expected in ((SYMBOL, 150), (PUT, 75), (FUT, 75), (BNF, 70)):
                mine = sum(p["net_qty"] for p in positions if p["symbol"] == symbol)
                assert mine == broker_net(sim, symbol) == expected, (symbol, positions)
        finally:
            for s in servers:
                s.stop()

        # the in-process host, meanwhile
        first = wait_status(h, unsent, "FILLED", timeout=6)
        assert len(booked(other, unsent)) == 1 and first["broker_order_id"] == booked(other, unsent)[0].broker_order_id
        wait_status(h, never_left, "LOST", timeout=8)
        assert booked(other, never_left) == []               # nothing left the host: nothing is resent either
        assert [e for e in events(h, "order_lost") if never_left in e["message"] and e["severity"] == "error"]
        assert (net(h, "k_new", SYMBOL), net(h, "k_submitted", PUT)) == (75, 0)
        assert (broker_net(other, SYMBOL), broker_net(other, PUT)) == (75, 0)
    finally:
        other.stop()


def test_2b_the_freeze_quantity_comes_from_getsecurityinfo_when_the_symbol_file_has_none(sim):
    """Noren's symbol files carry no freeze column: the adapter learns frzqty, and exits are sliced under it."""
    from dataclasses import replace as _replace
    from host.instruments import Instruments, slices
    from host.models import ExecutionType, Intent, OrderType, Product, Side
    from test_market_protection import adapter
    master = Instruments([_replace(i, freeze_qty=None) for i in Instruments.sample().by_symbol.values()])
    broker = adapter(sim, master)
    exit_intent = Intent("NFO", "NIFTY28APR26C24500", Side.SELL, 3600, OrderType.MKT, Product.NRML,
                         action=ExecutionType.EXIT)
    assert slices(broker.instruments, exit_intent) == [3600]  # unknown: one order the exchange would refuse
    assert broker.learn_freeze("NFO", "NIFTY28APR26C24500") == 1800
    assert slices(broker.instruments, exit_intent) == [1725, 1725, 150]


def test_1b_an_exit_right_after_a_close_in_the_app_never_takes_the_account_short(live, sim):
    """Found from outside: the trader closes in the app and TradingView's EXIT fires at the same moment."""
    h = live()
    held = entry(h, strategy="fast", direction="BUY", qty=75, price="43")
    wait_status(h, held, "FILLED")
    wait_for(lambda: net(h, "fast", SYMBOL) == 75)
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)
    answer = place(h, execution_type="EXIT", strategy="fast", direction="SELL", qty=75, order_type="MKT", price=None)
    assert answer.get("orders", []) == [], answer  # the books were read before deciding
    time.sleep(1.0)
    assert broker_net(sim, SYMBOL) == 0 and host_net(h, SYMBOL) == 0


def test_1c_a_position_target_right_after_a_close_in_the_app_never_takes_the_account_short(live, sim):
    """Found from outside: the trader sells 75 of 150 in the app, the order book does not show it yet, and a
    POSITION alert (target 0) comes: it sold 150 (the EXIT alert is capped at the broker's net; this was not)."""
    h = live()
    held = entry(h, strategy="pos", direction="BUY", qty=150, price="43")
    wait_status(h, held, "FILLED")
    wait_for(lambda: net(h, "pos", SYMBOL) == 150)
    manual = control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)["norenordno"]
    control(sim, action="hide_order", norenordno=manual)  # the book lags; the position book already shows it
    body = alert("POSITION", strategy="pos")
    body["legs"] = [{"tradingsymbol": SYMBOL, "position": "0", "order_type": "MKT", "product_type": "M"}]
    r = h.post(body)
    assert r.status_code == 200, r.get_json()
    assert [o["qty"] for o in r.get_json()["orders"]] == [75], r.get_json()
    assert "capped from 150 to 75" in r.get_json()["reason"], r.get_json()
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=5)
    control(sim, action="hide_order", norenordno=manual, on=False)
    time.sleep(1.0)
    assert broker_net(sim, SYMBOL) == 0


def _held_with_resting(h: Host, strategy: str, qty: int, kind: str = "EXIT") -> str:
    """150 held by `strategy`, with a limit SELL (`kind`) for `qty` resting at the broker well above the market;
    its id."""
    held = entry(h, strategy=strategy, direction="BUY", qty=150, price="43")
    wait_status(h, held, "FILLED")
    wait_for(lambda: net(h, strategy, SYMBOL) == 150)
    [resting] = place(h, execution_type=kind, strategy=strategy, direction="SELL", qty=qty, order_type="LMT",
                      price="60")["orders"]
    wait_status(h, resting["id"], "OPEN")
    return resting["id"]


def _half_resting(h: Host) -> str:
    """150 held by strategy 'half', with a limit exit for 75 resting at the broker well above the market; its id."""
    return _held_with_resting(h, "half", 75)


def _sold_in_the_app_unbooked(sim: Any, qty: int) -> str:
    """The trader sells in the broker's app; the position book shows it, the order book not yet. Its number."""
    manual = control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=qty)["norenordno"]
    control(sim, action="hide_order", norenordno=manual)
    return manual


def _resting_fills(h: Host, sim: Any, resting: str, manual: str) -> None:
    """The app's order shows in the book, the resting exit fills: the account must end flat, not short."""
    control(sim, action="hide_order", norenordno=manual, on=False)
    control(sim, action="tick", exchange="NFO", symbol=SYMBOL, ltp="61")
    wait_status(h, resting, "FILLED")
    time.sleep(1.0)
    assert broker_net(sim, SYMBOL) == 0


def test_1f_an_exit_after_a_close_in_the_app_counts_the_exit_already_working_and_never_goes_short(live, sim):
    """Found from outside: 150 held, a limit exit of 75 rests at the broker, the trader sells the other 75 in the
    app (the order book lags). An EXIT alert was capped at the broker's net (75) alone and sold 75 more: when the
    resting exit filled, the account was short 75. The exits already working are counted against the net."""
    h = live()
    resting = _half_resting(h)
    manual = _sold_in_the_app_unbooked(sim, 75)
    answer = place(h, execution_type="EXIT", strategy="half", direction="SELL", qty=150, order_type="MKT",
                   price=None)
    assert answer.get("orders", []) == [], answer  # the resting exit covers all the broker still holds
    _resting_fills(h, sim, resting, manual)
    wait_for(lambda: host_net(h, SYMBOL) == 0, timeout=8)


def test_1g_exit_all_after_a_close_in_the_app_counts_the_exit_already_working_and_never_goes_short(live, sim):
    """As test_1f, for risk's flatten (exit-all, a breach): it capped its exits at the broker's net alone, so with
    a limit exit resting for half and the other half sold in the app, it sold that half again."""
    h = live()
    resting = _half_resting(h)
    manual = _sold_in_the_app_unbooked(sim, 75)
    done = exit_all(h)
    assert done["orders"] == [], done  # the resting exit covers all the broker still holds
    time.sleep(1.0)
    assert broker_net(sim, SYMBOL) == 75
    _resting_fills(h, sim, resting, manual)


def test_1h_an_exit_whose_resting_half_filled_unheard_still_closes_the_rest(live, sim):
    """The other way round from test_1f: the resting exit has filled at the broker but the host has not heard
    (feed stalled), so its row still says OPEN. The book, read before the positions, says it is done: the EXIT
    closes what the broker still holds, not nothing."""
    h = live()
    resting = _half_resting(h)
    control(sim, action="stall_feed", on=True)
    control(sim, action="tick", exchange="NFO", symbol=SYMBOL, ltp="61")  # the resting exit fills, unheard
    wait_for(lambda: broker_net(sim, SYMBOL) == 75)
    answer = place(h, execution_type="EXIT", strategy="half", direction="SELL", qty=150, order_type="MKT",
                   price=None)
    assert [o["qty"] for o in answer["orders"]] == [75], answer
    control(sim, action="stall_feed", on=False)
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=5)
    wait_for(lambda: host_net(h, SYMBOL) == 0, timeout=8)


def test_1i_the_breach_moves_a_resting_limit_exit_towards_the_market_so_the_position_is_closed(live, sim):
    """Found from outside: the breach exited only what no working exit covered. A trader's limit exit resting far
    above the market counted as covering its half, so after the breach 75 stayed open, losing past the limit,
    for as long as the market stayed below the limit. Risk now moves it towards the market, as it does its own."""
    h = live(RISK_BASE_MAX_LOSS="-100", EXIT_REPRICE_S="0.5")
    resting = _half_resting(h)
    _breach_by_tick(h, sim, SYMBOL, "41")
    wait_status(h, resting, "FILLED", timeout=8)
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=5)
    assert "moving" in " ".join(r["detail"] or "" for r in h.runtime.storage.rows(
        "select detail from order_history where order_id = ?", (resting,)))
    time.sleep(1.0)
    assert broker_net(sim, SYMBOL) == 0 and host_net(h, SYMBOL) == 0


def test_1j_a_resting_exit_whose_mark_was_lost_is_moved_by_the_check_after_the_breach(live, sim):
    """What if the process dies between the breach's exits and the mark that moves the resting exit? The check
    after a breach finds a covered position whose exit is not moving, and marks it (a risk_violation)."""
    h = live(RISK_BASE_MAX_LOSS="-100", EXIT_REPRICE_S="60")
    resting = _half_resting(h)
    _breach_by_tick(h, sim, SYMBOL, "41")
    marked = lambda: h.runtime.storage.one("select escalate from orders where id = ?", (resting,))["escalate"]  # noqa
    wait_for(lambda: marked() == 1, timeout=5)
    h.runtime.storage.write(lambda db: db.execute("update orders set escalate = null where id = ?", (resting,)))
    wait_for(lambda: marked() == 1, timeout=5)
    assert "no exit on its way to the market" in events(h, "risk_violation")[-1]["message"]


def _whole_exit_then_app_sale(h: Host, sim: Any, strategy: str) -> str:
    """150 held by `strategy` with a limit exit for all 150 resting; the trader sells 75 in the broker's app and
    the host takes it off the strategy: the resting exit now works for 75 more than the position holds. Its id."""
    resting = _held_with_resting(h, strategy, 150)
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)
    wait_for(lambda: net(h, strategy, SYMBOL) == 75, timeout=8)  # the outside check took it off the strategy
    return resting


def _never_short_then_flat(h: Host, sim: Any, resting: str, seconds: float = 8.0, product: str = "M") -> None:
    """The account's net never goes below zero while the oversized exit is cancelled and the position exited."""
    lowest, deadline = broker_net(sim, SYMBOL, product), time.monotonic() + seconds
    while broker_net(sim, SYMBOL, product) != 0 and time.monotonic() < deadline:
        lowest = min(lowest, broker_net(sim, SYMBOL, product))
        time.sleep(0.05)
    lowest = min(lowest, _lowest_net(sim, 1.5, product))  # and it stays so
    assert lowest == 0 == broker_net(sim, SYMBOL, product), (lowest, broker_net(sim, SYMBOL, product),
                                                            events(h, "exit_not_moved"))
    assert status(h, resting) == "CANCELLED"
    [said] = events(h, "exit_not_moved")
    assert resting in said["message"] and "cancelled" in said["message"], said


def test_1k_a_breach_cancels_an_exit_working_for_more_than_the_position_holds_then_exits_the_net(live, sim):
    """Found in review: 150 held with a limit exit for all 150 resting; the trader sells 75 in the app and the host
    takes it off the strategy. The breach moved the 150 exit to the market: the account went short 75 for a
    second. Then such an exit was left where it was (said once), and the 75 stayed open past the loss limit.
    Now it is cancelled, and once the cancel is confirmed the check after the breach exits the 75: flat, never
    short."""
    h = live(RISK_BASE_MAX_LOSS="-100", EXIT_REPRICE_S="0.5")
    resting = _whole_exit_then_app_sale(h, sim, "whole")
    _breach_by_tick(h, sim, SYMBOL, "41")
    _never_short_then_flat(h, sim, resting)


def test_1w_a_strategys_max_loss_cancels_an_oversized_exit_then_exits_the_net(live, sim):
    """A strategy's own max loss left an exit working for more than its position holds where it was placed (said
    once, "cancel it and send the EXIT"): the strategy's loss limit was hit and 75 stayed open until the trader
    acted, and had the market come to the exit, it would have filled 150, short 75. As at the day's breach, it is
    now cancelled, and once the cancel is confirmed risk's follow-up exits the 75 at the broker's net, once: flat,
    never short."""
    h = live(RISK_STRATEGY_MAX_LOSS="-100", RISK_BASE_MAX_LOSS="-100000", EXIT_REPRICE_S="0.5")
    resting = _whole_exit_then_app_sale(h, sim, "sw")
    _strategy_breach_by_tick(h, sim)
    _never_short_then_flat(h, sim, resting)
    assert net(h, "sw", SYMBOL) == 0


def test_1w2_the_square_off_cancels_an_oversized_mis_exit_then_exits_the_net(live, sim):
    """The same book at the intraday square-off (MIS): the oversized exit was left resting, said once, and 75 MIS
    stayed open past the square-off time. It is cancelled, and the follow-up exits the 75: flat, never short."""
    from host.market import IST, MarketClock
    h = live(SQUARE_OFF_TIME="15:15", RISK_BASE_MAX_LOSS="-100000", EXIT_REPRICE_S="0.5")
    day = MarketClock().next_trading_day(datetime.now(IST).date())  # a trading day, before its square-off
    h.runtime.clock_offset = datetime.combine(day, dtime(10, 0), IST) - datetime.now(timezone.utc)
    held = entry(h, strategy="so", direction="BUY", qty=150, price="43", product_type="I")
    wait_status(h, held, "FILLED")
    wait_for(lambda: net(h, "so", SYMBOL, "I") == 150)
    [resting] = place(h, execution_type="EXIT", strategy="so", direction="SELL", qty=150, order_type="LMT",
                      price="60", product_type="I")["orders"]
    wait_status(h, resting["id"], "OPEN")
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75, prd="I")  # in the app
    wait_for(lambda: net(h, "so", SYMBOL, "I") == 75, timeout=8)
    h.runtime.clock_offset = datetime.combine(day, dtime(15, 16), IST) - datetime.now(timezone.utc)
    _never_short_then_flat(h, sim, resting["id"], product="I")
    assert events(h, "risk_square_off") and net(h, "so", SYMBOL, "I") == 0


@pytest.mark.parametrize("how", ["error", "restart"])
def test_1w3_a_strategys_stop_whose_flatten_did_not_happen_is_done_on_a_later_beat_or_after_the_restart(live, sim,
                                                                                                        how):
    """Review 19: the stop was stored (stopped for the day) before its flatten ran. A flatten that failed on that
    beat, or a process that died during its read of the broker's books (seconds with a slow broker), left the
    strategy stopped and its 150 open all day: no later check acted again. The flatten to do is stored with the
    stop's mark and taken off by the flatten's own transaction: done on the next beat, or after the restart."""
    h = live(RISK_STRATEGY_MAX_LOSS="-100", RISK_BASE_MAX_LOSS="-100000", EXIT_REPRICE_S="0.5")
    held = entry(h, strategy="sk", direction="BUY", qty=150, price="43")
    wait_status(h, held, "FILLED")
    wait_for(lambda: net(h, "sk", SYMBOL) == 150)
    outside = h.runtime.engine.risk.outside
    real, gate, calls = outside.read_for_exits, threading.Event(), []

    def faulty():  # type: ignore[no-untyped-def]  (the stop's read of the books)
        calls.append(1)
        if len(calls) == 1:
            if how == "restart":
                gate.wait(20)  # a slow broker: the process is restarted meanwhile
            raise RuntimeError("the flatten's read failed")
        return real()
    outside.read_for_exits = faulty
    _strategy_breach_by_tick(h, sim)
    wait_for(lambda: calls, timeout=5)
    if how == "restart":
        h.restart()
        gate.set()
    deadline = time.monotonic() + 10
    while broker_net(sim, SYMBOL) != 0:  # the loss goes on
        assert time.monotonic() < deadline, (broker_net(sim, SYMBOL), net(h, "sk", SYMBOL))
        sim.sim.tick("NFO", SYMBOL, Decimal("35"))
        time.sleep(0.2)
    assert _lowest_net(sim, 1.5) == 0 and h.runtime.storage.get_state("risk_flatten_pending") is None


@pytest.mark.parametrize("exit_qty,app_sale", [(150, 75), (75, 0)])
def test_1w4_a_strategys_mtm_stoploss_heals_and_moves_the_exits_already_working(live, sim, exit_qty, app_sale):
    """Review 19: the alert's own strategy_stoploss flattened with no broker room and never sized or moved the exits
    already working: a resting exit for 150 on the 75 left after an app sale was neither cancelled nor said (75
    open past the stop, and the exit could fill 150: short 75); a resting exit for half stayed at 60 and 75 stayed
    open. It is now done by risk as its own strategy stop: flat, never short."""
    h = live(RISK_BASE_MAX_LOSS="-100000", EXIT_REPRICE_S="0.5")
    r = h.post({**alert(strategy="mt", direction="BUY", qty=150, price="43"), "strategy_stoploss": "100"})
    assert r.status_code == 200, r.get_json()
    [held] = r.get_json()["orders"]
    wait_status(h, held["id"], "FILLED")
    wait_for(lambda: net(h, "mt", SYMBOL) == 150)
    [resting] = place(h, execution_type="EXIT", strategy="mt", direction="SELL", qty=exit_qty, order_type="LMT",
                      price="60")["orders"]
    wait_status(h, resting["id"], "OPEN")
    if app_sale:
        control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=app_sale)
        wait_for(lambda: net(h, "mt", SYMBOL) == 150 - app_sale, timeout=8)
    wait_for(lambda: (sim.sim.tick("NFO", SYMBOL, Decimal("41")), events(h, "strategy_stoploss_hit"))[1], timeout=8)
    lowest, deadline = broker_net(sim, SYMBOL), time.monotonic() + 10
    while broker_net(sim, SYMBOL) != 0:
        assert time.monotonic() < deadline, (broker_net(sim, SYMBOL), status(h, resting["id"]))
        lowest = min(lowest, broker_net(sim, SYMBOL))
        time.sleep(0.05)
    assert min(lowest, _lowest_net(sim, 1.5)) == 0


def test_1w5_a_strategys_mtm_stoploss_is_capped_at_the_brokers_net(live, sim):
    """Review 19 (held before, kept): the trader sold 75 in the app and the order book lags (the position book
    shows it): the MTM stop sells the 75 left, never 150 (short 75)."""
    h = live(RISK_BASE_MAX_LOSS="-100000", EXIT_REPRICE_S="0.5")
    r = h.post({**alert(strategy="mu", direction="BUY", qty=150, price="43"), "strategy_stoploss": "100"})
    assert r.status_code == 200, r.get_json()
    wait_for(lambda: net(h, "mu", SYMBOL) == 150)
    manual = _sold_in_the_app_unbooked(sim, 75)
    wait_for(lambda: (sim.sim.tick("NFO", SYMBOL, Decimal("41")), events(h, "strategy_stoploss_hit"))[1], timeout=8)
    lowest = _lowest_net(sim, 3.0)
    control(sim, action="hide_order", norenordno=manual, on=False)
    assert lowest == 0, lowest


def test_1x_a_death_before_the_oversized_exits_cancel_went_out_is_healed_by_the_restart(live, sim):
    """What if the process dies after the breach's transaction marked the oversized exit for cancelling, before
    the cancel reached the broker? The mark is in the database: the restarted host sends the cancel, and the check
    after the breach exits the net once it is confirmed. Never short."""
    h = live(RISK_BASE_MAX_LOSS="-100", EXIT_REPRICE_S="0.5")
    resting = _whole_exit_then_app_sale(h, sim, "died")
    h.runtime.engine.sender.enqueue_cancel = lambda order_id, why: None  # dies before any cancel is sent
    _breach_by_tick(h, sim, SYMBOL, "41")
    wait_for(lambda: events(h, "exit_not_moved"), timeout=5)
    marked = h.runtime.storage.one("select cancel_requested from orders where id = ?", (resting,))["cancel_requested"]
    assert marked and _lowest_net(sim, 1.0) == 75 and status(h, resting) == "OPEN"
    h.restart()
    _never_short_then_flat(h, sim, resting, seconds=12.0)


def _moving_exit_then_app_sale(h: Host, sim: Any, sold: int) -> str:
    """150 held by 'esc' with the trader's limit exit for all 150 resting; the day's breach marks it to move
    towards the market; then the trader sells `sold` in the broker's app. The exit's id."""
    resting = _held_with_resting(h, "esc", 150)
    _breach_by_tick(h, sim, SYMBOL, "41")
    wait_for(lambda: h.runtime.storage.one("select escalate from orders where id = ?", (resting,))["escalate"])
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=sold)  # the trader, in the app
    return resting


def test_1y_an_exit_being_moved_that_an_app_sale_makes_oversized_is_cancelled_never_filled_short(live, sim):
    """Found in review 10: the trader's limit exit for all 150 fit at the breach and was marked to move towards the
    market; then the trader sold 75 in the app. Only unmarked exits were checked for size, so it was moved on,
    filled 150 and the account was short 75 (bought back after). A marked exit is checked before each move: it
    is moved no further, cancelled, and the check after the breach exits the 75 once the cancel is confirmed."""
    h = live(RISK_BASE_MAX_LOSS="-100")  # EXIT_REPRICE_S: the default 3 s, the app sale lands before the move
    _never_short_then_flat(h, sim, _moving_exit_then_app_sale(h, sim, 75), seconds=12.0)


def test_1z_an_exit_being_moved_whose_whole_position_is_sold_in_the_app_is_cancelled(live, sim):
    """Found in review 11: with all 150 sold in the app the position is flat, and the size check looked only at
    open positions: the exit was moved on and filled, short 150. A flat, missing or reversed position holds
    nothing for an exit."""
    h = live(RISK_BASE_MAX_LOSS="-100")
    _never_short_then_flat(h, sim, _moving_exit_then_app_sale(h, sim, 150), seconds=12.0)


def test_1z2_the_days_breach_right_after_a_strategys_stop_does_not_exit_its_position_twice(live, sim):
    """Found in review 11, when a strategy's stop left an oversized exit where it was: the day's breach after it
    skipped every exit already said, and the 75 stayed open past the day's limit. The strategy's stop now cancels
    it, and its follow-up exits the 75; the day's breach right after counts that follow-up's exit as covering
    the position, so the 75 is sold once: flat, never short."""
    h = live(RISK_STRATEGY_MAX_LOSS="-100", RISK_BASE_MAX_LOSS="-300", EXIT_REPRICE_S="0.5")
    resting = _whole_exit_then_app_sale(h, sim, "sw")
    _strategy_breach_by_tick(h, sim)
    _breach_by_tick(h, sim, SYMBOL, "37", timeout=8)
    _never_short_then_flat(h, sim, resting, seconds=10.0)


def test_1z3_a_strategys_stop_cancels_an_exit_it_moved_once_an_app_sale_makes_it_oversized(live, sim):
    """Found in review 11: a strategy's own max loss moved its 150 exit far towards the market (the feed stalled);
    the trader then sold 75 in the app. 'Moved no further', it stayed at the moved price, filled 150 when the
    market came back and the account stayed short 75 (nothing acts again after a strategy's stop). An exit that
    has been moved is cancelled when it becomes oversized, whatever stopped the trading; the strategy's stop's
    follow-up then exits the 75 once the cancel has ended: flat, never short."""
    h = live(RISK_STRATEGY_MAX_LOSS="-100", RISK_BASE_MAX_LOSS="-100000")  # EXIT_REPRICE_S: the default 3 s
    rid = _held_with_resting(h, "sm", 150)
    _strategy_breach_by_tick(h, sim)
    wait_for(lambda: h.runtime.storage.one("select escalate from orders where id = ?", (rid,))["escalate"])
    control(sim, action="stall_feed", on=True)  # the host keeps 41 as the last price
    sim.sim.tick("NFO", SYMBOL, Decimal("30"))  # the market falls away faster than the exit is moved
    wait_for(lambda: (h.runtime.storage.one("select reprices from orders where id = ?", (rid,))["reprices"] or 0) >= 1,
             timeout=8)
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)
    wait_for(lambda: net(h, "sm", SYMBOL) == 75, timeout=8)
    wait_for(lambda: status(h, rid) == "CANCELLED", timeout=8)
    control(sim, action="stall_feed", on=False)
    for price in ("32", "35", "38", "40"):  # the market comes back past where the exit had been moved to
        sim.sim.tick("NFO", SYMBOL, Decimal(price))
        time.sleep(0.3)
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=10)  # the follow-up exits the 75 once the cancel ended
    assert _lowest_net(sim, 1.5) == 0 and status(h, rid) == "CANCELLED"
    said = [e["message"] for e in events(h, "exit_not_moved")]
    assert any(rid in m and "cancelled" in m for m in said), said


def test_1z4_exits_of_positions_the_breach_closes_against_each_other_are_cancelled(live, sim):
    """Found in review 11: sa long 75 with a limit exit SELL 75 at 60, sb short 75; the broker's net is 0. The breach
    (a loss in another symbol) closes sa and sb against each other: sa's exit then works for a position of 0, and
    was left working; at 60 it filled and the account was short 75 until bought back. It is cancelled."""
    h = live(RISK_BASE_MAX_LOSS="-100", EXIT_REPRICE_S="0.5")
    sim.sim.tick("NFO", PUT, Decimal("60"))
    a = entry(h, strategy="sa", direction="BUY", qty=75, price="43")
    wait_status(h, a, "FILLED")
    [xa] = place(h, execution_type="EXIT", strategy="sa", direction="SELL", qty=75, order_type="LMT",
                 price="60")["orders"]
    wait_status(h, xa["id"], "OPEN")
    wait_status(h, entry(h, strategy="sb", direction="SELL", qty=75, price="42"), "FILLED")
    wait_status(h, entry(h, strategy="L", tradingsymbol=PUT, direction="BUY", qty=75, price="61"), "FILLED")
    assert broker_net(sim, SYMBOL) == 0
    deadline = time.monotonic() + 6
    while not h.api("/api/risk").get_json()["breached"]:
        assert time.monotonic() < deadline
        sim.sim.tick("NFO", PUT, Decimal("58"))
        time.sleep(0.15)
    wait_for(lambda: status(h, xa["id"]) == "CANCELLED", timeout=6)
    sim.sim.tick("NFO", SYMBOL, Decimal("60"))
    assert _lowest_net(sim, 2.0) == 0


def _scale_in_then_trim(h: Host, strategy: str) -> tuple[str, str]:
    """150 held, then a scale-in ADJUST BUY 75 at 30 and a trim ADJUST SELL 75 at 60, both resting. Their ids."""
    held = entry(h, strategy=strategy, direction="BUY", qty=150, price="43")
    wait_status(h, held, "FILLED")
    wait_for(lambda: net(h, strategy, SYMBOL) == 150)
    ids = []
    for direction, price in (("BUY", "30"), ("SELL", "60")):
        [o] = place(h, execution_type="ADJUST", strategy=strategy, direction=direction, qty=75, order_type="LMT",
                    price=price)["orders"]
        wait_status(h, o["id"], "OPEN")
        ids.append(o["id"])
    return ids[0], ids[1]


def test_1z5_an_add_working_before_the_exits_does_not_make_them_oversized(live, sim):
    """Found in review 12: the size check's room came from the oldest order of the position, an add (a scale-in
    BUY) gave it 0, and every exit after it, risk's own included, was called oversized and cancelled before it was
    sent: with the add's cancel refused by the broker, 150 stayed open past the limit. Adds neither set nor use
    the room."""
    h = live(RISK_BASE_MAX_LOSS="-100", EXIT_REPRICE_S="0.5")
    _scale_in_then_trim(h, "sc")
    control(sim, action="forbid_next", count=200, route="CancelOrder")
    _breach_by_tick(h, sim, SYMBOL, "41")
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=10)
    assert not events(h, "exit_not_moved")


def test_1z6_a_strategys_stop_moves_a_trim_working_beside_an_add(live, sim):
    """The same book at a strategy's own max loss: the trim was unmarked as oversized and left at 60, with a false
    error, and 75 stayed open (a strategy's stop acts once)."""
    h = live(RISK_STRATEGY_MAX_LOSS="-100", RISK_BASE_MAX_LOSS="-100000", EXIT_REPRICE_S="0.5")
    _scale_in_then_trim(h, "sc")
    _strategy_breach_by_tick(h, sim)
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=10)
    assert not events(h, "exit_not_moved")


def test_1z7_a_trim_adjust_moving_towards_the_market_covers_its_position_after_the_breach(live, sim):
    """Found in review 12: the check after the breach counted only EXIT orders as covering a position, so a trim
    ADJUST for all 150, marked to move, left it 'exposed': a risk_violation and a read of the broker's books at
    every check (about 4 a second) until it filled. Orders other than entries that close the position count."""
    h = live(RISK_BASE_MAX_LOSS="-100", EXIT_REPRICE_S="60")
    trim = _held_with_resting(h, "tr", 150, kind="ADJUST")
    risk = h.runtime.engine.risk
    reads, real = [], risk.outside.read_for_exits
    risk.outside.read_for_exits = lambda *a, **k: (reads.append(1), real(*a, **k))[1]
    _breach_by_tick(h, sim, SYMBOL, "41")
    control(sim, action="stall_feed", on=True)  # it stays unfilled: the feed holds 41, the exit waits 60 s
    wait_for(lambda: h.runtime.storage.one("select escalate from orders where id = ?", (trim,))["escalate"])
    before = len(reads)
    time.sleep(3)
    control(sim, action="stall_feed", on=False)
    assert len(reads) - before <= 1 and not events(h, "risk_violation"), (len(reads) - before,
                                                                           events(h, "risk_violation"))


def test_1l_a_strategys_max_loss_moves_its_exit_still_on_its_way_to_the_broker(live, sim):
    """Found in review: a strategy's limit exit was still SUBMITTED (the broker books it late) when the strategy's
    own max loss fired; only OPEN exits were marked, and a strategy's breach is not checked again, so its half
    stayed open past the limit. Exits on their way are marked too, in the flatten's own transaction."""
    h = live(RISK_STRATEGY_MAX_LOSS="-100", RISK_BASE_MAX_LOSS="-100000", EXIT_REPRICE_S="0.5")
    held = entry(h, strategy="sx", direction="BUY", qty=150, price="43")
    wait_status(h, held, "FILLED")
    wait_for(lambda: net(h, "sx", SYMBOL) == 150)
    control(sim, action="book_late", seconds=2.5, reply="late")
    [resting] = place(h, execution_type="EXIT", strategy="sx", direction="SELL", qty=75, order_type="LMT",
                      price="60")["orders"]
    wait_status(h, resting["id"], "SUBMITTED", "UNKNOWN")
    _strategy_breach_by_tick(h, sim)
    wait_status(h, resting["id"], "FILLED", timeout=10)
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=5)


def test_1m_a_fill_between_the_reads_of_the_book_is_read_again_not_taken_as_working(live, sim):
    """Found in review: the resting exit fills (unheard: feed stalled) after the order book is read and before
    the positions are. Counted as still working, it cut the EXIT to 0 and 75 stayed open. The book is read again
    after the positions: the two reads disagree, so the books are read again, and the EXIT sends the 75."""
    h = live()
    resting = _half_resting(h)
    control(sim, action="stall_feed", on=True)
    out = h.runtime.engine.outside
    real_book = out.broker_book

    def book_then_fill() -> list:
        book = real_book()
        sim.sim.tick("NFO", SYMBOL, Decimal("61"))  # the fill lands between the book and the positions
        out.broker_book = real_book
        return book
    out.broker_book = book_then_fill
    answer = place(h, execution_type="EXIT", strategy="half", direction="SELL", qty=150, order_type="MKT",
                   price=None)
    assert [o["qty"] for o in answer["orders"]] == [75], answer
    control(sim, action="stall_feed", on=False)
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=5)
    time.sleep(1.0)
    assert broker_net(sim, SYMBOL) == 0


def test_1n_an_exit_cut_while_the_book_cannot_be_read_says_so_loudly(live, sim):
    """Found in review: with the order book unreadable, an exit of ours that had filled unheard counts as working,
    and the EXIT was cut to 0 silently: 75 stayed open. It is still cut (never short), but the answer and an
    exit_unsure warning say which exit the books could not settle, and to send the EXIT again if it filled."""
    h = live()
    resting = _half_resting(h)
    control(sim, action="stall_feed", on=True)
    control(sim, action="tick", exchange="NFO", symbol=SYMBOL, ltp="61")
    wait_for(lambda: broker_net(sim, SYMBOL) == 75)
    control(sim, action="forbid_next", count=50, route="OrderBook")
    answer = place(h, execution_type="EXIT", strategy="half", direction="SELL", qty=150, order_type="MKT",
                   price=None)
    control(sim, action="forbid_next", count=0, route="OrderBook")
    control(sim, action="stall_feed", on=False)
    assert answer.get("orders", []) == [] and resting in answer["reason"], answer
    assert "send the EXIT again" in answer["reason"], answer
    [said] = events(h, "exit_unsure")
    assert resting in said["message"] and said["severity"] == "warning"
    wait_status(h, resting, "FILLED", timeout=12)
    assert broker_net(sim, SYMBOL) == 75  # the trader's second EXIT closes it
    again = place(h, execution_type="EXIT", strategy="half", direction="SELL", qty=75, order_type="MKT", price=None)
    assert [o["qty"] for o in again["orders"]] == [75], again
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=5)


def _lowest_net(sim: Any, seconds: float, product: str = "M") -> int:
    """The broker's lowest net in SYMBOL over the next `seconds`."""
    lowest, deadline = broker_net(sim, SYMBOL, product), time.monotonic() + seconds
    while time.monotonic() < deadline:
        lowest = min(lowest, broker_net(sim, SYMBOL, product))
        time.sleep(0.05)
    return lowest


def test_1o_exit_all_counts_an_exit_that_fills_between_its_reads_and_its_flatten(live, sim):
    """Found in review: exit-all read the books (net 75, the resting exit of 75 counted), then the resting exit
    filled and the engine marked it FILLED before the flatten's transaction: it was no longer counted, and
    exit-all sold 75 more, short 75. An exit the first read showed working counts even if its row ended since."""
    h = live()
    resting = _half_resting(h)
    manual = _sold_in_the_app_unbooked(sim, 75)
    wait_for(lambda: broker_net(sim, SYMBOL) == 75)
    out = h.runtime.engine.risk.outside
    real = out.read_for_exits

    def read_then_fill():  # type: ignore[no-untyped-def]
        view = real()
        sim.sim.tick("NFO", SYMBOL, Decimal("61"))
        wait_for(lambda: status(h, resting) == "FILLED", timeout=5)
        return view
    out.read_for_exits = read_then_fill
    answer = exit_all(h)
    out.read_for_exits = real
    assert answer["orders"] == [], answer
    lowest = _lowest_net(sim, 2.0)
    control(sim, action="hide_order", norenordno=manual, on=False)
    assert lowest == 0 and broker_net(sim, SYMBOL) == 0


def test_1p_a_slow_order_book_holds_only_the_exit_waiting_for_it_never_another_strategys_entry(live, sim):
    """Found in review: an EXIT read the broker's books on the engine thread. With an order book answering in
    seconds, the EXIT waited (as it must: it is capped at the net read after it arrived), and so did every other
    strategy's alert, fill and tick: an ENTRY sent meanwhile waited 8.9 s. The books are read on a thread of their
    own: the ENTRY is decided and sent at once; the EXIT once its read has ended, capped as before."""
    h = live()
    held = entry(h, strategy="slowx", direction="BUY", qty=75, price="43")
    wait_status(h, held, "FILLED")
    control(sim, action="slow_next", seconds=1.5, count=8, route="OrderBook")
    answers: dict = {}
    client = h.app.test_client()
    sent = threading.Thread(target=lambda: answers.update(exit=client.post("/webhook", json=alert(
        execution_type="EXIT", strategy="slowx", direction="SELL", qty=75, order_type="MKT", price=None))))
    sent.start()
    try:
        time.sleep(0.3)  # the EXIT's read of the books is under way
        t0 = time.monotonic()
        other = place(h, strategy="fast", direction="BUY", qty=75, price="43")
        took = time.monotonic() - t0
        assert other["status"] == "accepted" and took < 1.0, (took, other)
        wait_status(h, other["orders"][0]["id"], "FILLED")
    finally:
        sent.join(20)
    exit_alert = answers["exit"].get_json()["alert_id"]
    decided = wait_for(lambda: (a := h.runtime.storage.one("select * from alerts where id = ?", (exit_alert,)))
                       ["status"] != "received" and a, timeout=20)
    assert decided["status"] == "accepted", decided
    [oid] = __import__("json").loads(decided["orders"])
    wait_status(h, oid, "FILLED", timeout=10)
    assert order(h, oid)["qty"] == 75 and broker_net(sim, SYMBOL) == 75  # slowx out, fast in


def test_1q_an_exit_made_and_filled_while_the_books_are_read_counts_against_the_net_read(live, sim):
    """With the books read off the engine thread, the engine goes on while they are read: here an exit of strategy
    sb's 75 (standing for a protection's or a target's, which need no read of their own) is made and filled before
    strategy sa's EXIT is decided on a read from before that sale. The trader had sold 75 in the app (unbooked), so the read said 75 and our exit was not in it: counted
    as ended, sa sold 75 more, short 75. An exit made after the read began counts in full against it."""
    h = live(RISK_POLL_S=60)
    for name in ("sa", "sb"):
        wait_status(h, entry(h, strategy=name, direction="BUY", qty=75, price="43"), "FILLED")
    wait_for(lambda: net(h, "sa", SYMBOL) == 75 and net(h, "sb", SYMBOL) == 75)
    manual = _sold_in_the_app_unbooked(sim, 75)
    wait_for(lambda: broker_net(sim, SYMBOL) == 75)
    eng = h.runtime.engine
    real = eng.exit_reads._read
    hook_exit: list = []

    def read_then_exit_sb():  # type: ignore[no-untyped-def]
        view = real()
        sell = Intent("NFO", SYMBOL, Side.SELL, 75, OrderType.MKT, Product.NRML, action=ExecutionType.EXIT)
        eng.submit(lambda: eng._dispatch(eng.storage.write(lambda db: eng.decider.evaluate(db, "sb", [sell], None))))
        hook_exit.append(wait_for(lambda: h.runtime.storage.one(
            "select * from orders where strategy = 'sb' and action = 'EXIT' and status = 'FILLED'"), timeout=5))
        return view
    eng.exit_reads._read = read_then_exit_sb
    answer = place(h, execution_type="EXIT", strategy="sa", direction="SELL", qty=75, order_type="MKT", price=None)
    eng.exit_reads._read = real
    assert hook_exit and answer.get("orders", []) == [], answer
    lowest = _lowest_net(sim, 1.5)
    control(sim, action="hide_order", norenordno=manual, on=False)
    assert lowest == 0 and broker_net(sim, SYMBOL) == 0


def test_1r_an_error_while_reading_the_books_fails_the_exit_never_sends_it_uncapped(live, sim):
    """Found in review 6: a read of the books that raised (here a locked database while adopting) gave no view,
    and no view means no cap, as when blind: with the position sold in the app, the EXIT sold 75 again. It fails,
    saying why, as it did when the engine read the books itself."""
    h = live(RISK_POLL_S=60)
    wait_status(h, entry(h, strategy="s1", direction="BUY", qty=75, price="43"), "FILLED")
    wait_for(lambda: net(h, "s1", SYMBOL) == 75)
    manual = _sold_in_the_app_unbooked(sim, 75)
    wait_for(lambda: broker_net(sim, SYMBOL) == 0)
    out = h.runtime.engine.outside
    real = out.adopt
    raised: list = []

    def failing(*a: Any, **k: Any) -> Any:
        if not raised and threading.current_thread().name == "exit-reads":
            raised.append(1)
            raise sqlite3.OperationalError("database is locked")
        return real(*a, **k)
    out.adopt = failing
    answer = place(h, 503, execution_type="EXIT", strategy="s1", direction="SELL", qty=75, order_type="MKT",
                   price=None)
    out.adopt = real
    assert raised and answer["status"] == "failed" and answer["orders"] == [], answer
    assert "reading the broker's books for the exit failed (OperationalError: database is locked)" in answer["reason"]
    assert _lowest_net(sim, 1.0) == 0
    control(sim, action="hide_order", norenordno=manual, on=False)


def test_1s_an_exit_the_books_show_working_counts_though_a_cancel_was_heard_first(live, sim):
    """Found in review 6: the host heard the resting exit's cancel first (a fill the broker reports after the
    cancel, README `order_late_fill`), but both reads of the book showed it working. Counting an ended exit only
    by what its row filled (0), the EXIT sold 75, and when the resting exit filled: short 75. The books decide."""
    h = live(RISK_POLL_S=60)
    resting = _half_resting(h)
    manual = _sold_in_the_app_unbooked(sim, 75)
    wait_for(lambda: broker_net(sim, SYMBOL) == 75)
    [at_broker] = booked(sim, resting)
    from host.sim.server import order_update
    msg = order_update(sim.sim, at_broker)
    msg.update(status="CANCELED", reporttype="Canceled")
    _push_order_message(sim, msg)
    wait_status(h, resting, "CANCELLED")
    answer = place(h, execution_type="EXIT", strategy="half", direction="SELL", qty=150, order_type="MKT",
                   price=None)
    assert answer.get("orders", []) == [], answer
    control(sim, action="tick", exchange="NFO", symbol=SYMBOL, ltp="61")  # the resting exit fills at the broker
    lowest = _lowest_net(sim, 1.5)
    control(sim, action="hide_order", norenordno=manual, on=False)
    assert lowest == 0 and broker_net(sim, SYMBOL) == 0


def test_exit_reads_keep_no_view_for_an_alert_forgotten_while_its_read_ran():
    """Found in review 6: an alert gone stale while its read ran left the read's view (two order books) behind."""
    from host.exit_reads import ExitReads
    go, views = threading.Event(), []

    def read() -> Any:
        go.wait(5)
        go.clear()
        views.append(object())
        return views[-1]
    reads = ExitReads(read, lambda: None)
    for i in range(5):
        assert reads.take(f"a{i}") == (False, None)
        wait_for(lambda: reads._reading)
        reads.forget(f"a{i}")
        go.set()
        wait_for(lambda: not reads._running)
    assert len(views) == 5 and reads._views == {}
    assert reads.take("b") == (False, None)  # still served: asked, read, taken
    go.set()
    assert wait_for(lambda: reads.take("b")[0] and reads) and reads._views == {}


def test_1t_a_hook_of_a_strategy_whose_exit_waits_for_the_books_acts_after_that_exit(live, sim):
    """What a strategy's hook asks for while its EXIT alert waits for a slow read of the books is acted on after
    that EXIT is decided, not before it (each strategy's actions in the order they came); another strategy's
    hook acts at once."""
    h = live(RISK_POLL_S=60)
    for name in ("slowy", "other"):
        wait_status(h, entry(h, strategy=name, direction="BUY", qty=75, price="43"), "FILLED")
    control(sim, action="slow_next", seconds=1.5, count=4, route="OrderBook")
    eng = h.runtime.engine
    client = h.app.test_client()
    answers: dict = {}
    sent = threading.Thread(target=lambda: answers.update(exit=client.post("/webhook", json=alert(
        execution_type="EXIT", strategy="slowy", direction="SELL", qty=75, order_type="MKT", price=None))))
    sent.start()
    try:
        time.sleep(0.3)  # the EXIT's read of the books is under way
        again = Intent("NFO", SYMBOL, Side.BUY, 75, OrderType.LMT, Product.NRML, Decimal("43"),
                       action=ExecutionType.ENTRY)
        for name in ("slowy", "other"):
            eng.submit(lambda name=name: eng._act(name, Asked(intents=(again,), version="1"), "on_tick"))
        wait_for(lambda: events(h, "strategy_on_tick"), timeout=3)
        time.sleep(0.2)
        acted = [e["strategy"] for e in events(h, "strategy_on_tick")]
        assert acted == ["other"], acted  # the other strategy's hook did not wait; slowy's does
        exit_row = h.runtime.storage.one("select * from alerts where strategy = 'slowy' and execution_type = 'EXIT'")
        assert exit_row["status"] == "received"  # the EXIT still waits for its read: so does slowy's hook
    finally:
        sent.join(20)
    decided = wait_for(lambda: (a := h.runtime.storage.one("select * from alerts where strategy = 'slowy' and "
                                                           "execution_type = 'EXIT'"))["status"] != "received" and a,
                       timeout=20)
    hooked = wait_for(lambda: [e for e in events(h, "strategy_on_tick") if e["strategy"] == "slowy"], timeout=5)
    assert decided["status"] == "accepted" and hooked[0]["at"] >= decided["decided_at"], (decided, hooked)


def test_1u_a_hooks_exit_after_a_close_in_the_app_never_takes_the_account_short(live, sim):
    """Found this session: an EXIT a strategy's hook returned (on_tick, on_order, on_clock) was not capped at the
    broker's net at all, as EXIT alerts are: with the position sold in the broker's app a moment before (not yet
    adopted), the hook's exit sold 75 again, short 75. It is capped at the net read after the hook returned."""
    h = live(RISK_POLL_S=60)
    wait_status(h, entry(h, strategy="hk", direction="BUY", qty=75, price="43"), "FILLED")
    wait_for(lambda: net(h, "hk", SYMBOL) == 75)
    manual = _sold_in_the_app_unbooked(sim, 75)
    wait_for(lambda: broker_net(sim, SYMBOL) == 0)
    eng = h.runtime.engine
    sell = Intent("NFO", SYMBOL, Side.SELL, 75, OrderType.MKT, Product.NRML, action=ExecutionType.EXIT)
    eng.submit(lambda: eng._act("hk", Asked(intents=(sell,), version="1"), "on_tick"))
    [said] = wait_for(lambda: events(h, "strategy_on_tick"), timeout=5)
    assert "0 order(s)" in said["message"] and "exit capped from 75 to 0" in said["message"], said
    assert _lowest_net(sim, 1.0) == 0
    control(sim, action="hide_order", norenordno=manual, on=False)


def _target(h: Host, strategy: str, position: int, price: Optional[str] = None) -> dict:
    """A POSITION alert for SYMBOL (product M); its JSON answer."""
    body = alert("POSITION", strategy=strategy)
    body["legs"] = [{"tradingsymbol": SYMBOL, "position": str(position), "product_type": "M",
                     **({"order_type": "LMT", "price": price} if price else {"order_type": "MKT"})}]
    r = h.post(body)
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def test_1v_a_target_planned_again_after_its_cancels_is_capped_at_the_brokers_net(live, sim):
    """Found this session: a POSITION target that first cancels the strategy's working order is planned again once
    the cancel is done, from the strategy's own position, and that second plan's exit was not capped at the
    broker's net. With 75 sold in the app meanwhile (not yet adopted), target 0 sold 75 again: short 75."""
    h = live(RISK_POLL_S=60)
    wait_status(h, entry(h, strategy="tg", direction="BUY", qty=75, price="43"), "FILLED")
    [resting] = _target(h, "tg", 150, price="30")["orders"]  # 75 more, resting well below the market
    wait_status(h, resting["id"], "OPEN")
    manual = _sold_in_the_app_unbooked(sim, 75)
    wait_for(lambda: broker_net(sim, SYMBOL) == 0)
    first = _target(h, "tg", 0)  # cancels the resting 75 first, then plans again from the 75 it holds
    assert first["orders"] == [], first
    [said] = wait_for(lambda: events(h, "position_target"), timeout=8)
    lowest = _lowest_net(sim, 1.5)
    control(sim, action="hide_order", norenordno=manual, on=False)
    # capped at the read's net, or the read's second look at the positions counted the app's sale as tg's already
    assert lowest == 0 and ("exit capped from 75 to 0" in said["message"] or "already at target flat" in
                            said["message"]), (lowest, said["message"])


def test_exit_reads_drop_a_view_nobody_took_when_a_later_read_ends():
    """A view asked for by what was then decided otherwise (a target superseded in between) is not kept for ever."""
    from host import exit_reads
    reads = exit_reads.ExitReads(lambda: object(), lambda: None)
    reads.ask("gone")
    wait_for(lambda: not reads._running and "gone" in reads._views)
    reads._views["gone"] = (reads._views["gone"][0] - exit_reads.KEPT_S, reads._views["gone"][1])  # a minute ago
    reads.ask("next")
    wait_for(lambda: not reads._running and "next" in reads._views)
    assert set(reads._views) == {"next"}


def test_exit_reads_read_again_a_view_left_untaken_too_long():
    """A view its alert could not take at once (its strategy busy in a call) is read again, not used stale."""
    from host import exit_reads
    n: list = []
    reads = exit_reads.ExitReads(lambda: n.append(len(n)) or len(n), lambda: None)
    assert reads.take("a") == (False, None)
    wait_for(lambda: not reads._running and reads._views)
    time.sleep(getattr(exit_reads, "FRESH_S", 1.0) + 0.1)
    assert reads.take("a") == (False, None)  # too old: read again
    assert wait_for(lambda: (got := reads.take("a"))[0] and got) == (True, 2)


def test_a_rejected_exit_says_it_is_not_retried(live, sim):
    h = live()
    held = entry(h, strategy="rej", direction="BUY", qty=75, price="43")
    wait_status(h, held, "FILLED")
    control(sim, action="reject_next", reason="RMS: blocked for the test")
    oid = place(h, execution_type="EXIT", strategy="rej", direction="SELL", qty=75, order_type="MKT", price=None)
    wait_for(lambda: events(h, "exit_rejected"))
    assert "NOT retried: send it again" in events(h, "exit_rejected")[0]["message"]


def _marked_and_acked(h: Host, oid: str) -> tuple[datetime, datetime, datetime]:
    """When the order was made (NEW), marked sent (SUBMITTED) and first heard of from the broker, from its history."""
    rows = h.runtime.storage.rows("select status, at from order_history where order_id = ? order by rowid", (oid,))
    at = {}
    for r in rows:
        at.setdefault("BROKER" if r["status"] in ("OPEN", "PARTIAL", "FILLED") else r["status"],
                      datetime.fromisoformat(r["at"]))
    return at["NEW"], at["SUBMITTED"], at["BROKER"]


def test_2c_a_market_order_is_marked_sent_only_once_its_price_is_in_hand(live, sim):
    """Found from outside: the SUBMITTED mark came before GetQuotes, so a kill -9 while the quote was slow left an
    order marked sent that never left, LOST a minute later. It stays NEW until PlaceOrder can go at once."""
    h = live()
    control(sim, action="stall_feed", on=True)  # the broker has a price; the host's feed has none
    control(sim, action="tick", exchange="NFO", symbol=PUT, ltp="43")
    control(sim, action="slow_next", seconds=0.4, route="GetQuotes")
    oid = entry(h, strategy="slowquote", direction="BUY", qty=75, order_type="MKT", price=None, tradingsymbol=PUT)
    wait_status(h, oid, "OPEN", "FILLED")
    made, marked, acked = _marked_and_acked(h, oid)
    assert marked - made >= timedelta(seconds=0.35), (made, marked)  # the slow quote came before the mark
    assert acked - marked < timedelta(seconds=0.25), (marked, acked)  # and PlaceOrder right after it
    assert len(booked(sim, oid)) == 1


def test_2d_each_order_of_a_batch_is_marked_sent_right_before_its_own_placeorder(live, sim):
    """Found from outside: the orders of one alert (legs, freeze slices) were all marked SUBMITTED in one commit,
    then sent 8 a second; a kill -9 meanwhile left the unsent ones marked sent, never sent, LOST. Each is now
    marked when its rate-limit slot has come, so a death leaves the rest NEW, and a restart sends them."""
    h = live()
    legs = [{"tradingsymbol": s, "direction": "BUY", "qty": q, "order_type": "LMT", "price": p, "product_type": "M"}
            for s, q, p in ((SYMBOL, 75, "42.5"), (PUT, 75, "40"), (FUT, 75, "24500"), (BNF, 35, "300"))]
    body = alert(strategy="legs")
    body["legs"] = legs
    r = h.post(body)
    assert r.status_code == 200, r.get_json()
    oids = [o["id"] for o in r.get_json()["orders"]]
    assert len(oids) == 4
    for oid in oids:
        wait_status(h, oid, "OPEN", "FILLED", "PARTIAL")
    times = [_marked_and_acked(h, oid) for oid in oids]
    assert max(t[2] for t in times) - min(t[2] for t in times) >= timedelta(seconds=0.3)  # the rate limit spaced them
    in_turn = sorted(times, key=lambda t: t[1])  # each marked only once the one before it was placed and answered
    for (_, _, acked_before), (_, marked, _) in zip(in_turn, in_turn[1:]):
        assert marked >= acked_before, in_turn  # (a fixed bound on marked-to-ack failed under load: order, not time)
    for oid in oids:
        assert len(booked(sim, oid)) == 1


def test_1d_an_app_trade_the_order_book_shows_late_is_counted_once(live, sim):
    """Found from outside: the position book showed a trade made in the broker's app before the order book did.
    The difference was counted (as 'manual') after two polls, and the order's fill again when the book showed
    it: the host held +150 where the broker held +75, and the loss limit counted a position nobody had."""
    h = live()
    control(sim, action="tick", exchange="NFO", symbol=PUT, ltp="40")
    manual = control(sim, action="manual_order", exchange="NFO", symbol=PUT, side="B", qty=75)["norenordno"]
    assert broker_net(sim, PUT) == 75
    control(sim, action="hide_order", norenordno=manual)  # the order book lags; the position book shows it
    wait_for(lambda: host_net(h, PUT) == 75, timeout=6)  # found in the positions: counted once, as 'manual'
    control(sim, action="hide_order", norenordno=manual, on=False)
    wait_for(lambda: h.runtime.storage.one("select 1 from outside_fills where broker_order_id = ?", (manual,)),
             timeout=6)  # the order's fill has been read from the books
    time.sleep(1.5)  # two more polls
    assert (host_net(h, PUT), broker_net(sim, PUT)) == (75, 75)
    assert net(h, "manual", PUT) == 75


def test_1e_a_trade_after_an_unexplained_difference_is_counted_in_full(live, sim):
    """The other side of 1d: a position no order in the books explains (bought before the host knew the account,
    the books never show it), then a new trade in the app of the same side. The new one moved the broker's net
    too: it is counted in full, never taken for the earlier difference."""
    h = live()
    control(sim, action="tick", exchange="NFO", symbol=PUT, ltp="40")
    old = control(sim, action="manual_order", exchange="NFO", symbol=PUT, side="B", qty=75)["norenordno"]
    control(sim, action="hide_order", norenordno=old)  # never in the books the host reads
    wait_for(lambda: host_net(h, PUT) == 75, timeout=6)
    control(sim, action="manual_order", exchange="NFO", symbol=PUT, side="B", qty=75)
    wait_for(lambda: host_net(h, PUT) == 150, timeout=6)
    time.sleep(1.5)  # two more polls
    assert (host_net(h, PUT), broker_net(sim, PUT)) == (150, 150)


def test_2e_an_order_never_waits_marked_sent_behind_another_segments_slow_placeorder(live, sim):
    """Found in review: legs in two segments (each with a free rate-limit turn) shared one SUBMITTED mark, so the
    NSE leg waited, marked sent, behind the NFO leg's slow PlaceOrder: a kill -9 then left it LOST, never sent."""
    h = live(timeout_s=5.0)
    control(sim, action="delay_next", seconds=1.0)  # the NFO leg is booked at once, answered a second late
    control(sim, action="stall_feed", on=True)      # and no update over the feed says so meanwhile
    body = alert(strategy="xseg", direction="BUY", qty=75, price="42.5")
    body["legs"].append({"exchange": "NSE", "tradingsymbol": "RELIANCE-EQ", "direction": "BUY", "qty": 1,
                         "order_type": "LMT", "price": "2900", "product_type": "M"})
    r = h.post(body)
    assert r.status_code == 200, r.get_json()
    nfo, nse = [o["id"] for o in r.get_json()["orders"]]
    wait_for(lambda: booked(sim, nfo), timeout=3)
    time.sleep(0.3)  # the NFO answer is still 0.7 s away
    assert (order(h, nfo)["status"], order(h, nse)["status"]) == ("SUBMITTED", "NEW")
    wait_status(h, nse, "OPEN", "FILLED", "PARTIAL")
    assert len(booked(sim, nse)) == 1 and len(booked(sim, nfo)) == 1


def test_2f_a_failed_mark_reports_every_order_of_the_alert_left_unsent(live, sim):
    """Found in review: with one mark per order, a failed mark (a disk error) stopped the batch, and the legs after
    it stayed NEW with no word. Each unsent order is reported (order_not_sent), and nothing reaches the broker."""
    import sqlite3
    import threading
    h = live(timeout_s=5.0)
    storage, armed = h.runtime.storage, [1]
    real = storage.write

    def failing(fn, durable=False, on_commit=None):
        if durable and armed[0] and threading.current_thread().name == "order-sender":
            armed[0] = 0
            raise sqlite3.OperationalError("disk I/O error")
        return real(fn, durable, on_commit)
    body = alert(strategy="legs3")
    body["legs"] = [{"tradingsymbol": s, "direction": "BUY", "qty": 75, "order_type": "LMT", "price": p,
                     "product_type": "M"} for s, p in ((SYMBOL, "42.5"), (PUT, "40"), (FUT, "24500"))]
    storage.write = failing
    try:
        r = h.post(body)
        assert r.status_code == 200, r.get_json()
        oids = [o["id"] for o in r.get_json()["orders"]]
        told = wait_for(lambda: len(e := events(h, "order_not_sent")) == 3 and e, timeout=5)
    finally:
        storage.write = real
    assert sorted(e["data"] and __import__("json").loads(e["data"])["order_id"] for e in told) == sorted(oids)
    assert all(order(h, oid)["status"] == "NEW" and booked(sim, oid) == [] for oid in oids)


# ---- #3: exit-all ends flat ----

def test_3a_exit_all_cancels_an_exit_working_for_more_than_the_position_holds_then_exits_the_net(live, sim):
    """Found in review 10: 150 held with a limit exit for all 150 resting far above the market; the trader sells
    75 in the app and the host takes it off the strategy. exit-all counted the resting 150 as covering the 75 left:
    "nothing left to close", the 75 stayed open, and the resting exit could still fill 150 (short 75). Now
    exit-all cancels it, as a breach does, and once the cancel is confirmed exits the 75 at the market."""
    h = live(EXIT_REPRICE_S="0.5")
    resting = _whole_exit_then_app_sale(h, sim, "xa")
    exit_all(h)
    _never_short_then_flat(h, sim, resting, seconds=12.0)
    wait_for(lambda: net(h, "xa", SYMBOL) == 0, timeout=8)


def test_3b_exit_all_moves_a_resting_limit_exit_towards_the_market_until_the_position_is_closed(live, sim):
    """exit-all counted a limit exit resting far above the market as closing its position and left it there: the
    trader asked for flat, and the position stayed open for as long as the market stayed below the limit. Its
    exits, and those already working for what it exits, now move towards the market until they fill (as a
    breach's do)."""
    h = live(EXIT_REPRICE_S="0.5")
    resting = _held_with_resting(h, "xb", 150)
    done = exit_all(h)
    assert done["orders"] == [], done  # the resting exit covers the position: nothing sent twice
    wait_status(h, resting, "FILLED", timeout=10)
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=5)
    assert _lowest_net(sim, 1.0) == 0


def test_3c_a_death_after_exit_all_marked_the_oversized_exit_is_healed_by_the_restart(live, sim):
    """What if the process dies after exit-all's transaction marked the oversized exit for cancelling and stored
    its follow-up, before the cancel reached the broker? Both are in the database: the restarted host sends the
    cancel, and the follow-up exits the 75 once it is confirmed. Never short, never sold twice."""
    h = live(EXIT_REPRICE_S="0.5")
    resting = _whole_exit_then_app_sale(h, sim, "xc")
    h.runtime.engine.sender.enqueue_cancel = lambda order_id, why: None  # dies before any cancel is sent
    exit_all(h)
    marked = h.runtime.storage.one("select cancel_requested from orders where id = ?", (resting,))["cancel_requested"]
    assert marked and h.runtime.storage.get_state("exit_all_after")
    assert _lowest_net(sim, 1.0) == 75 and status(h, resting) == "OPEN"
    h.restart()
    _never_short_then_flat(h, sim, resting, seconds=12.0)
    assert h.runtime.storage.get_state("exit_all_after") is None
    exits = [o for o in h.orders() if o["strategy"] == "xc" and o["side"] == "SELL" and o["id"] != resting]
    assert [o["qty"] for o in exits] == [75], exits  # the follow-up, once


def test_3d_an_oversized_exit_that_fills_before_its_cancel_is_bought_back_by_the_follow_up(live, sim):
    """The broker does the opposite of what exit-all asked: the oversized exit fills before its cancel lands (the
    account is short 75). The follow-up waits for the exit to end, whatever it did, and then brings the strategy's
    position, now -75, to flat at the broker's net: the account ends flat, not short."""
    h = live(EXIT_REPRICE_S="0.5")
    resting = _whole_exit_then_app_sale(h, sim, "xd")
    h.runtime.engine.sender.enqueue_cancel = lambda order_id, why: None  # the cancel never arrives in time
    exit_all(h)
    control(sim, action="tick", exchange="NFO", symbol=SYMBOL, ltp="61")  # the resting 150 fills: short 75
    wait_status(h, resting, "FILLED", timeout=8)
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=10)
    assert _lowest_net(sim, 1.5) == 0 and h.runtime.storage.get_state("exit_all_after") is None
    wait_for(lambda: net(h, "xd", SYMBOL) == 0, timeout=8)


def _marks(h: Host, oid: str) -> dict:
    return h.runtime.storage.one("select escalate, reprices, cancel_requested from orders where id = ?", (oid,))


def test_3e_an_exit_exit_all_moves_that_an_app_sale_makes_oversized_is_cancelled_and_the_rest_exited(live, sim):
    """Review 16: exit-all marked the trader's exit for all 150 (it fit) to move; before its first move the trader
    sold 75 in the app. Unmarked and left resting (no breach stands, never moved), it filled 150 when the market
    reached it: short 75. As an exit found oversized at the exit-all itself (test_3a), it is cancelled and the 75
    exited once the cancel ends."""
    h = live()  # EXIT_REPRICE_S: the default 3 s, the app sale lands before the first move
    resting = _held_with_resting(h, "xe", 150)
    exit_all(h)
    wait_for(lambda: _marks(h, resting)["escalate"], timeout=5)
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)  # the trader, in the app
    wait_for(lambda: net(h, "xe", SYMBOL) == 75, timeout=8)
    _never_short_then_flat(h, sim, resting, seconds=12.0)
    control(sim, action="tick", exchange="NFO", symbol=SYMBOL, ltp="61")  # nothing rests there any more
    assert _lowest_net(sim, 1.5) == 0


def test_3f_an_exit_exit_all_moved_that_an_app_sale_makes_oversized_is_cancelled_and_the_rest_exited(live, sim):
    """Review 16: as test_3e, after the exit had been moved (an illiquid market: each move still rests above it).
    It was cancelled with "send the EXIT for the position", and nothing exited the 75."""
    h = live(EXIT_REPRICE_S="0.5")
    resting = _held_with_resting(h, "xf", 150)
    risk = h.runtime.engine.risk
    moved = risk.reprice
    risk.reprice = lambda oid, price: moved(oid, Decimal("55"))  # illiquid: each move still rests above the market
    exit_all(h)
    wait_for(lambda: (_marks(h, resting)["reprices"] or 0) >= 1, timeout=5)
    assert status(h, resting) == "OPEN" and broker_net(sim, SYMBOL) == 150
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)  # the trader, in the app
    wait_for(lambda: net(h, "xf", SYMBOL) == 75, timeout=8)
    _never_short_then_flat(h, sim, resting, seconds=12.0)


def test_3g_the_follow_up_exits_no_more_than_was_held_at_the_exit_all(live, sim):
    """Review 16: while the oversized exit's cancel was slow, the strategy bought 75 more (filled); the follow-up
    sold the strategy's whole position, the new 75 too. It exits what was held when the trader asked."""
    h = live(EXIT_REPRICE_S="0.5")
    resting = _whole_exit_then_app_sale(h, sim, "x5")
    sender = h.runtime.engine.sender
    real = sender.enqueue_cancel
    sender.enqueue_cancel = lambda order_id, why: None
    exit_all(h)
    [add] = place(h, execution_type="ADJUST", strategy="x5", direction="BUY", qty=75, price="43")["orders"]
    wait_status(h, add["id"], "FILLED")
    wait_for(lambda: net(h, "x5", SYMBOL) == 150 and broker_net(sim, SYMBOL) == 150, timeout=8)
    sender.enqueue_cancel = real  # the engine sends the cancel again within 5 s
    wait_for(lambda: status(h, resting) == "CANCELLED", timeout=10)
    wait_for(lambda: h.runtime.storage.get_state("exit_all_after") is None, timeout=5)
    wait_for(lambda: broker_net(sim, SYMBOL) == 75, timeout=8)
    assert _lowest_net(sim, 1.5) == 75


def test_3h_exit_all_twice_while_the_cancel_works_exits_the_rest_once(live, sim):
    h = live(EXIT_REPRICE_S="0.5")
    resting = _whole_exit_then_app_sale(h, sim, "x2")
    sender = h.runtime.engine.sender
    real = sender.enqueue_cancel
    sender.enqueue_cancel = lambda order_id, why: None  # the cancel is slow to land
    exit_all(h)
    assert exit_all(h)["orders"] == []
    sender.enqueue_cancel = real
    wait_for(lambda: status(h, resting) == "CANCELLED", timeout=10)
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=8)
    assert _lowest_net(sim, 2.0) == 0
    exits = [o for o in h.orders() if o["strategy"] == "x2" and o["side"] == "SELL" and o["id"] != resting]
    assert [o["qty"] for o in exits] == [75], exits


def test_3i_a_follow_up_whose_cancel_never_ends_is_dropped_and_said_not_sent_later(live, sim, monkeypatch):
    """Review 16: a follow-up waited for ever; the cancelled exit ending days later (at its expiry) would have sold
    the strategy's position then, at the market. One waiting past FOLLOW_UP_MAX_S is dropped with an error."""
    import host.risk_actions as ra
    monkeypatch.setattr(ra, "FOLLOW_UP_MAX_S", 1.0)
    h = live(EXIT_REPRICE_S="0.5")
    resting = _whole_exit_then_app_sale(h, sim, "x6")
    h.runtime.engine.sender.enqueue_cancel = lambda order_id, why: None  # the cancel never lands
    exit_all(h)
    [said] = wait_for(lambda: events(h, "exit_all_dropped"), timeout=8)
    assert resting in said["message"] and "x6" in said["message"], said
    assert h.runtime.storage.get_state("exit_all_after") is None and status(h, resting) == "OPEN"
    assert broker_net(sim, SYMBOL) == 75


def test_3j_an_override_while_the_breachs_cancel_of_an_oversized_exit_works_still_exits_the_rest(live, sim):
    """Noticed in review 13: the breach cancels an oversized exit and says "once the cancel is confirmed, risk exits
    the position at its net" (the check after the breach does). The trader overrides the breach while the cancel
    works: the breach no longer stands, and nothing exited the 75. The breach's cancels are followed up as
    exit-all's are."""
    h = live(RISK_BASE_MAX_LOSS="-100", EXIT_REPRICE_S="0.5")
    resting = _whole_exit_then_app_sale(h, sim, "ov")
    sender = h.runtime.engine.sender
    real = sender.enqueue_cancel
    sender.enqueue_cancel = lambda order_id, why: None  # the cancel is slow to land
    _breach_by_tick(h, sim, SYMBOL, "41")
    wait_for(lambda: events(h, "exit_not_moved"), timeout=5)
    r = h.api("/api/halt", "POST", json={"mode": "active", "override_breach": True})
    assert r.status_code == 200, r.get_json()
    sender.enqueue_cancel = real  # the engine sends it again within 5 s
    _never_short_then_flat(h, sim, resting, seconds=12.0)


def _held_resting_then_app_sale(h: Host, sim: Any, strategy: str, held: int, sold: int) -> str:
    """`held` bought by `strategy`, the trader's limit exit for all of it resting far above the market; the trader
    then sells `sold` in the broker's app and the host takes it off the strategy. The resting exit's id."""
    oid = entry(h, strategy=strategy, direction="BUY", qty=held, price="43")
    wait_status(h, oid, "FILLED")
    wait_for(lambda: net(h, strategy, SYMBOL) == held)
    [resting] = place(h, execution_type="EXIT", strategy=strategy, direction="SELL", qty=held, order_type="LMT",
                      price="60")["orders"]
    wait_status(h, resting["id"], "OPEN")
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=sold)  # the trader, in the app
    wait_for(lambda: net(h, strategy, SYMBOL) == held - sold, timeout=8)
    return resting["id"]


@pytest.mark.parametrize("held,sold", [(225, 150), (150, 150)])
def test_3k_an_oversized_exit_that_fills_before_its_cancel_is_bought_back_in_full(live, sim, held, sold):
    """Review 18: the follow-up's bound was what the position held when the cancel was asked (75, or 0 after the
    whole position was sold in the app), whatever happened next. The 225 exit on 75 filled before its cancel (short
    150): the follow-up bought 75 back and stopped, short 75 (short 150 in the second case). After a fill past
    zero, the bound is what the exit could overfill: the account ends flat."""
    h = live(EXIT_REPRICE_S="0.5")
    resting = _held_resting_then_app_sale(h, sim, f"xk{held}", held, sold)
    sender = h.runtime.engine.sender
    real = sender.enqueue_cancel
    sender.enqueue_cancel = lambda order_id, why: None  # the cancel is slow to land
    exit_all(h)
    control(sim, action="tick", exchange="NFO", symbol=SYMBOL, ltp="61")  # the resting exit fills: short
    wait_status(h, resting, "FILLED", timeout=8)
    sender.enqueue_cancel = real
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=10)
    assert _lowest_net(sim, 1.5) == 0 and h.runtime.storage.get_state("exit_all_after") is None


def _exits_then_app_sale_then_stop(live: Any, sim: Any, how: str, strategy: str, held: int,
                                   exits: tuple[tuple[int, str], ...], sold: int) -> tuple[Host, list[str], Any]:
    """`held` bought by `strategy`, the trader's limit SELL exits (qty, price) resting, `sold` sold in the broker's
    app; then, with cancels slow to land, a strategy's max loss or exit-all (`how`) cancels the oversized exit. The
    host, the exits' ids, and what lets the cancels land."""
    env = dict(RISK_STRATEGY_MAX_LOSS="-100", RISK_BASE_MAX_LOSS="-100000") if how == "strategy_stop" else {}
    h = live(EXIT_REPRICE_S="60", **env)
    wait_status(h, entry(h, strategy=strategy, direction="BUY", qty=held, price="43"), "FILLED")
    wait_for(lambda: net(h, strategy, SYMBOL) == held)
    ids = []
    for qty, price in exits:
        [o] = place(h, execution_type="EXIT", strategy=strategy, direction="SELL", qty=qty, order_type="LMT",
                    price=price)["orders"]
        wait_status(h, o["id"], "OPEN")
        ids.append(o["id"])
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=sold)  # the trader, in the app
    wait_for(lambda: net(h, strategy, SYMBOL) == held - sold, timeout=8)
    sender = h.runtime.engine.sender
    real = sender.enqueue_cancel
    sender.enqueue_cancel = lambda order_id, why: None  # the cancel is slow to land
    if how == "strategy_stop":
        _strategy_breach_by_tick(h, sim)
    else:
        exit_all(h)
    wait_for(lambda: h.runtime.storage.get_state("exit_all_after"), timeout=5)
    return h, ids, lambda: setattr(sender, "enqueue_cancel", real)


def _followed_up_to_flat(h: Host, sim: Any) -> None:
    """The follow-up brings the account back to flat (its protected BUY rests until the host sees the market at
    61), and stays so."""
    deadline = time.monotonic() + 10
    while broker_net(sim, SYMBOL) != 0:
        assert time.monotonic() < deadline, (broker_net(sim, SYMBOL), h.runtime.storage.get_state("exit_all_after"))
        sim.sim.tick("NFO", SYMBOL, Decimal("61"))
        time.sleep(0.2)
    assert _lowest_net(sim, 1.5) == 0 and h.runtime.storage.get_state("exit_all_after") is None


@pytest.mark.parametrize("how", ["strategy_stop", "exit_all"])
def test_3k2_a_second_exit_oversized_by_the_first_that_fills_before_its_cancel_is_bought_back(live, sim, how):
    """Review 19: 150 held with the trader's exits SELL 75 @ 55 and SELL 75 @ 60; 75 sold in the app. The first
    still fits, the second has room 0 and is cancelled. What the second could overfill was taken as its remaining
    less the whole position (75 - 75 = 0), not less the room the first left it (0): both filled before the slow
    cancel landed, the account was short 75, and the follow-up bought nothing ("nothing left to close")."""
    h, exits, cancels_land = _exits_then_app_sale_then_stop(live, sim, how, "t2", 150, ((75, "55"), (75, "60")), 75)
    control(sim, action="tick", exchange="NFO", symbol=SYMBOL, ltp="61")  # the market reaches both exits
    for oid in exits:
        wait_status(h, oid, "FILLED", timeout=8)
    assert broker_net(sim, SYMBOL) == -75  # short: the second exit overfilled by 75
    cancels_land()
    _followed_up_to_flat(h, sim)


@pytest.mark.parametrize("how", ["strategy_stop", "exit_all"])
def test_3k3_an_exit_that_fits_only_because_the_oversized_one_is_cancelled_is_counted_in_its_overfill(live, sim, how):
    """Review 20: 300 held with the trader's exits SELL 225 @ 60 (older) and SELL 75 @ 55; 150 sold in the app. The
    225 is oversized (150 of room at its turn) and cancelled; the 75 fits the room the 225 does not take. The 75
    filled, then the 225 before its slow cancel: short 150. Its overfill was taken as 225 - 150 = 75, so the
    follow-up bought 75 and left the account short 75. The room an oversized exit has is what the exits that fit
    leave (75): it overfills by 150, and the follow-up brings the account back to flat."""
    h, (big, small), cancels_land = _exits_then_app_sale_then_stop(live, sim, how, "t4", 300,
                                                                   ((225, "60"), (75, "55")), 150)
    control(sim, action="tick", exchange="NFO", symbol=SYMBOL, ltp="56")  # the 75 @ 55 fills first
    wait_status(h, small, "FILLED", timeout=8)
    control(sim, action="tick", exchange="NFO", symbol=SYMBOL, ltp="61")  # then the 225 @ 60, before its cancel
    wait_status(h, big, "FILLED", timeout=8)
    assert broker_net(sim, SYMBOL) == -150
    cancels_land()
    _followed_up_to_flat(h, sim)


def test_3l_after_an_override_the_breachs_follow_up_brings_an_overfilled_position_back_to_flat(live, sim):
    """Review 18: test_3j with the oversized exit filling before its cancel (225 on 75 held: short 150) after the
    trader's override; the follow-up bought 75 and left the account short 75."""
    h = live(RISK_BASE_MAX_LOSS="-100", EXIT_REPRICE_S="0.5")
    resting = _held_resting_then_app_sale(h, sim, "ovr", 225, 150)
    sender = h.runtime.engine.sender
    real = sender.enqueue_cancel
    sender.enqueue_cancel = lambda order_id, why: None
    _breach_by_tick(h, sim, SYMBOL, "41")
    wait_for(lambda: events(h, "exit_not_moved"), timeout=5)
    r = h.api("/api/halt", "POST", json={"mode": "active", "override_breach": True})
    assert r.status_code == 200, r.get_json()
    control(sim, action="tick", exchange="NFO", symbol=SYMBOL, ltp="61")
    wait_status(h, resting, "FILLED", timeout=8)
    sender.enqueue_cancel = real
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=15)
    assert _lowest_net(sim, 1.5) == 0


def test_exits_all_day_leave_the_hosts_open_files_flat(live, sim):
    """Each EXIT's read of the broker's books ran on a new thread, and each such thread's database connection
    stayed open: two files per exit, for as long as the host ran (402 in the 2,000-alert soak)."""
    from test_storage import _open_files
    h = live()
    sim.sim.tick("NFO", SYMBOL, Decimal("43"))

    def round_trip(i: int) -> None:
        wait_status(h, entry(h, direction="BUY", qty=75, price="43", alert_id=f"in{i}"), "FILLED")
        [_] = place(h, execution_type="EXIT", direction="SELL", qty=75, order_type="MKT", price=None,
                    alert_id=f"out{i}")["orders"]
        wait_for(lambda: net(h, "s1", SYMBOL) == 0 and broker_net(sim, SYMBOL) == 0, timeout=6)

    round_trip(0)
    before = _open_files()
    for i in range(1, 21):
        round_trip(i)
    assert len(h.orders()) == 42
    assert _open_files() - before <= 6


def test_exit_all_cancelling_a_dozen_working_orders_stays_within_the_brokers_order_rate(live, sim):
    """The host spaced PlaceOrder and ModifyOrder under SEBI's 10 orders a second per segment, but not CancelOrder.
    An exit-all cancelling a dozen working entries sent all the cancels at once; a broker that counts cancels
    refused the ones past ten, and those entries went on working (and could fill) after the exit-all."""
    h = live()
    oids = [entry(h, strategy=f"r{i}", direction="BUY", qty=75, price="30") for i in range(12)]
    for oid in oids:
        wait_status(h, oid, "OPEN")
    before = last_event(h)
    exit_all(h)
    for oid in oids:
        wait_status(h, oid, "CANCELLED", timeout=8)
    assert events(h, "cancel_failed", before) == []


def test_an_exit_in_one_segment_never_waits_behind_another_segments_cancels(live, sim):
    """Review 24 R3: one queue took every order message in turn, each waiting for its own segment's rate-limit turn.
    An exit-all cancelling 16 working NSE entries made the NFO position's exit wait about 2 s behind their cancels
    (16 turns at 8 a second), though NFO's turns were free: in a falling market, 2 s of loss the limit did not
    mean. Within a segment the order is kept; another segment's message goes at its own free turn."""
    h = live()
    held = entry(h, strategy="nfo", direction="BUY", qty=75, price="43")
    wait_status(h, held, "FILLED")
    sim.sim.tick("NSE", "RELIANCE-EQ", Decimal("2900"))   # the entries below rest, far from the market
    entries = []
    for i in range(16):
        body = alert(strategy=f"nse{i}", direction="BUY", price="2000")
        body["exchange"] = "NSE"
        body["legs"][0].update(tradingsymbol="RELIANCE-EQ", qty=1)
        entries.append(place_body(h, body))
    for oid in entries:
        assert wait_status(h, oid, "OPEN", "FILLED", "REJECTED")["status"] == "OPEN", order(h, oid)
    started = time.monotonic()
    exit_all(h)
    [exit_order] = wait_for(lambda: [o for o in sim.sim.engine.order_book() if o.symbol == SYMBOL
                                                 and o.side is Side.SELL],
                            timeout=5)
    waited = time.monotonic() - started
    for oid in entries:
        wait_status(h, oid, "CANCELLED", timeout=8)
    assert waited < 0.8, f"the NFO exit reached the broker {waited:.2f} s after the exit-all"
    wait_for(lambda: broker_net(sim, SYMBOL) == 0 and net(h, "nfo", SYMBOL) == 0, timeout=5)
    assert all(sim_status(sim, oid) == "CANCELLED" for oid in entries)
    assert events(h, "cancel_failed") == []


def place_body(h: Host, body: dict) -> str:
    r = h.post(body)
    assert r.status_code == 200, r.get_json()
    [o] = r.get_json()["orders"]
    return o["id"]


def test_an_exit_in_one_segment_goes_between_the_orders_of_another_segments_batch(live, sim):
    """The same, inside one batch: 8 NSE entries queued together take a second to place at 8 a second; an NFO exit
    sent right after them goes at NFO's next free turn, between them, and the NSE entries still go in their order."""
    from conftest import hold_sender
    h = live()
    held = entry(h, strategy="nfo", direction="BUY", qty=75, price="43")
    wait_status(h, held, "FILLED")
    sim.sim.tick("NSE", "RELIANCE-EQ", Decimal("2900"))
    gate, legs = hold_sender(h.runtime.sender), []
    for n in range(8):
        body = alert(strategy=f"nse{n}", direction="BUY", price="2000")
        body["exchange"] = "NSE"
        body["legs"][0].update(tradingsymbol="RELIANCE-EQ", qty=1)
        legs.append(place_body(h, body))
    gate.set()  # the 8 go as one batch
    wait_for(lambda: booked(sim, legs[0]), timeout=3)
    started = time.monotonic()
    [exit_order] = place(h, strategy="nfo", execution_type="EXIT", direction="SELL", qty=75, order_type="MKT",
                         price=None)["orders"]
    wait_for(lambda: booked(sim, exit_order["id"]), timeout=5)
    waited = time.monotonic() - started
    assert waited < 0.6, f"the NFO exit reached the broker {waited:.2f} s after it was sent"
    assert len([oid for oid in legs if booked(sim, oid)]) < len(legs)  # it went between the NSE legs
    for oid in legs:
        wait_status(h, oid, "OPEN")
    at = {o.remarks: int(o.broker_order_id) for o in sim.sim.engine.order_book()}
    assert [at[oid] for oid in legs] == sorted(at[oid] for oid in legs)  # the NSE legs went in their order
    wait_for(lambda: broker_net(sim, SYMBOL) == 0 and net(h, "nfo", SYMBOL) == 0, timeout=5)


def test_1aa_a_restart_on_a_new_day_counts_the_days_trades_made_before_it_from_yesterdays_close(live, sim):
    """Review 25 R6: after a night's stop the new day began at the first risk check, after the start-up read of the
    books had taken in the day's trades: a position sold in the broker's app this morning at a loss was carried
    over with its realised PnL set back to 0, so today's loss left the day's limit. The day now begins before
    anything is read from the broker, valued at the prices stored before the stop."""
    from host.market import IST, MarketClock
    h = live(RISK_BASE_MAX_LOSS="-100000")
    held = entry(h, strategy="s1", direction="BUY", qty=75, price="43")
    bought_at = Decimal(wait_status(h, held, "FILLED")["avg_price"])
    quote = h.runtime.storage.one("select ltp from quotes where exchange = 'NFO' and symbol = ?", (SYMBOL,))
    close = Decimal(quote["ltp"]) if quote else bought_at  # the last price the host stored
    h.stop()
    h.runtime.storage.close()
    control(sim, action="new_day", keep_sessions=True)                                  # overnight
    sim.sim.tick("NFO", SYMBOL, Decimal("30"))
    control(sim, action="manual_order", exchange="NFO", symbol=SYMBOL, side="S", qty=75)  # sold in the app at 30
    h.__init__(h.settings, **h.runtime_kw)  # the restart, at 10:00 on the next trading day
    day = MarketClock().next_trading_day(datetime.now(timezone.utc).astimezone(IST).date())
    h.runtime.clock_offset = datetime.combine(day, dtime(10, 0), IST) - datetime.now(timezone.utc)
    h.start()
    wait_for(lambda: net(h, "s1", SYMBOL) == 0, timeout=6)
    expected = (Decimal("30") - close) * 75
    wait_for(lambda: Decimal(str(h.api("/api/risk").get_json()["day_pnl"])) == expected, timeout=5)


def test_1ab_a_market_exit_moves_the_resting_exit_to_the_market_and_closes_the_whole_position(live, sim):
    """Live, the same as tests/test_guard_and_risk.py's: 150 held with a limit exit of 75 resting above the market;
    a market EXIT of 150 sells the uncovered 75 at once and moves the resting exit towards the market (ModifyOrder)
    until it fills: flat, never short, one exit of each 75."""
    h = live(EXIT_REPRICE_S="0.5")
    resting = _half_resting(h)
    answer = place(h, execution_type="EXIT", strategy="half", direction="SELL", qty=150, order_type="MKT", price=None)
    assert [o["qty"] for o in answer["orders"]] == [75], answer
    assert "moved towards the market" in answer["reason"], answer
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=8)
    assert sim_status(sim, resting) == "FILLED"
    assert _lowest_net(sim, 1.0) == 0 and net(h, "half", SYMBOL) == 0
    sells = [o for o in sim.sim.engine.order_book() if o.side is Side.SELL and o.status.value == "FILLED"]
    assert sum(o.filled_qty for o in sells) == 150


def _stop_resting(h: Host, strategy: str) -> str:
    """150 held by `strategy`, with its own SL-MKT stop for all of it resting at the broker far below; its id."""
    held = entry(h, strategy=strategy, direction="BUY", qty=150, price="43")
    wait_status(h, held, "FILLED")
    wait_for(lambda: net(h, strategy, SYMBOL) == 150)
    [stop] = place(h, execution_type="EXIT", strategy=strategy, direction="SELL", qty=150, order_type="SL-MKT",
                   price=None, trigger_price="30")["orders"]
    wait_status(h, stop["id"], "OPEN")
    return stop["id"]


@pytest.mark.parametrize("how", ["market EXIT", "exit-all"])
def test_1ac_a_resting_stop_the_broker_will_not_turn_into_a_limit_is_cancelled_and_the_position_exited(live, sim,
                                                                                                        how):
    """The simulator refuses ModifyOrder from SL-MKT to LMT (nothing says Noren allows it). The host moved an "out
    now" exit's resting stop with that modify, was refused, and tried again every EXIT_REPRICE_S for ever: the
    position stayed open, the stop 12 points away. Now a refused move cancels the stop and, once the cancel is
    confirmed, exits the position at the broker's net: flat, never short, sold once."""
    h = live(EXIT_REPRICE_S="0.5")
    stop = _stop_resting(h, "stopped")
    if how == "market EXIT":
        answer = place(h, execution_type="EXIT", strategy="stopped", direction="SELL", qty=150, order_type="MKT",
                       price=None)
        assert "moved towards the market" in answer["reason"], answer
    else:
        assert h.api("/api/exit-all", "POST").status_code == 200
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=10)
    assert sim_status(sim, stop) == "CANCELLED"
    assert _lowest_net(sim, 1.5) == 0 and net(h, "stopped", SYMBOL) == 0
    sells = [o for o in sim.sim.engine.order_book() if o.side is Side.SELL and o.filled_qty]
    assert sum(o.filled_qty for o in sells) == 150
    [told] = events(h, "exit_not_moved")
    assert "refused" in told["message"] and "order type cannot be changed" in told["message"], told
    assert len(events(h, "reprice_failed")) == 1  # refused once, never asked again
    control(sim, action="tick", exchange="NFO", symbol=SYMBOL, ltp="29")  # the old stop's trigger: nothing sold
    assert _lowest_net(sim, 1.0) == 0


def test_1ad_a_strategys_sl_mkt_stop_rests_protected_and_a_gap_past_its_limit_still_exits_the_position(live, sim):
    """The API takes no market order without price protection (DESIGN.md), SL-MKT included in the simulator's
    worse reading: a strategy's SL-MKT stop alert, the original platform's way of placing one, was refused by the
    broker, leaving the position unprotected. It now rests as an SL-LMT, its limit one MARKET_PROTECTION_PCT
    through the trigger. Once the price reaches the trigger and the stop has not filled (a gap past its limit),
    it is moved towards the market as the market order would have filled: here the broker refuses to turn it into
    a limit, so it is cancelled and the position exited at the broker's net. Flat, never short, sold once."""
    h = live(EXIT_REPRICE_S="0.5")
    stop = _stop_resting(h, "gapped")
    booked_stop = sim.sim.engine.get(booked(sim, stop)[0].broker_order_id)
    assert (booked_stop.req.order_type.value, booked_stop.req.trigger_price, booked_stop.req.price) == \
        ("SL-LMT", Decimal("30"), Decimal("29.40"))
    assert order(h, stop)["order_type"] == "SL-MKT"  # what the strategy asked for, in our books
    control(sim, action="tick", exchange="NFO", symbol=SYMBOL, ltp="29")  # past the trigger and the limit at once
    wait_for(lambda: broker_net(sim, SYMBOL) == 0, timeout=10)
    assert sim_status(sim, stop) == "CANCELLED" and _lowest_net(sim, 1.5) == 0 and net(h, "gapped", SYMBOL) == 0
    assert sum(o.filled_qty for o in sim.sim.engine.order_book() if o.side is Side.SELL) == 150
    assert len(events(h, "stop_triggered")) == 1 and len(events(h, "exit_not_moved")) == 1


def test_1ae_an_sl_mkt_entry_rests_protected_and_is_never_chased(live, sim):
    """A breakout ENTRY as SL-MKT rests as a protected SL-LMT too; past its limit it is left where it is (only
    exits are moved towards the market)."""
    h = live(EXIT_REPRICE_S="0.5")
    [o] = place(h, strategy="breakout", direction="BUY", qty=75, order_type="SL-MKT", price=None,
                trigger_price="45")["orders"]
    wait_status(h, o["id"], "OPEN")
    assert sim.sim.engine.get(booked(sim, o["id"])[0].broker_order_id).req.price == Decimal("45.90")
    control(sim, action="tick", exchange="NFO", symbol=SYMBOL, ltp="47")
    time.sleep(1.5)
    assert order(h, o["id"])["status"] == "OPEN" and not events(h, "stop_triggered")
    assert broker_net(sim, SYMBOL) == 0


def test_1af_a_price_from_before_the_stop_was_taken_is_never_its_trigger(live, sim):
    """Review 34: the last stored price was compared with the trigger, whenever it was printed. An illiquid contract
    printed 29, then once 36 (held by the tick check until a second print); a stop at 30 placed then was taken for
    triggered at 29, cancelled, and all 150 sold at market (36), though the broker never saw a price at 30."""
    h = live(EXIT_REPRICE_S="0.5")
    held = entry(h, strategy="s1", direction="BUY", qty=150, price="43")
    wait_status(h, held, "FILLED")
    for _ in range(2):
        control(sim, action="tick", exchange="NFO", symbol=SYMBOL, ltp="29")
        time.sleep(0.3)
    wait_for(lambda: (h.runtime.storage.one("select ltp from quotes where symbol = ?", (SYMBOL,)) or {}).get("ltp")
             == "29", timeout=8)
    control(sim, action="tick", exchange="NFO", symbol=SYMBOL, ltp="36")  # one print, held back by the tick check
    [stop] = place(h, execution_type="EXIT", strategy="s1", direction="SELL", qty=150, order_type="SL-MKT",
                   price=None, trigger_price="30")["orders"]
    wait_status(h, stop["id"], "OPEN")
    time.sleep(2.5)
    assert order(h, stop["id"])["status"] == "OPEN" and not events(h, "stop_triggered")
    assert broker_net(sim, SYMBOL) == 150


def test_1ag_an_sl_mkt_add_on_is_never_taken_for_a_stop_loss_exit(live, sim):
    """Review 34: an ADJUST adding to the position as SL-MKT (a breakout add-on) was taken for a stop-loss exit:
    moved, found adding, cancelled, and the follow-up sold 75 of the position."""
    h = live(EXIT_REPRICE_S="0.5")
    held = entry(h, strategy="s1", direction="BUY", qty=150, price="43")
    wait_status(h, held, "FILLED")
    [add] = place(h, execution_type="ADJUST", strategy="s1", direction="BUY", qty=75, order_type="SL-MKT",
                  price=None, trigger_price="45")["orders"]
    wait_status(h, add["id"], "OPEN")
    time.sleep(1.1)
    control(sim, action="tick", exchange="NFO", symbol=SYMBOL, ltp="47")  # past 45 and its limit 45.90
    time.sleep(2.5)
    assert order(h, add["id"])["status"] == "OPEN" and not events(h, "stop_triggered")
    assert broker_net(sim, SYMBOL) == 150
