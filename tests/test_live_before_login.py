"""Live mode before the daily login is quiet and clear: one event and one log line say "broker session expired —
log in at /broker/login", not a line every 2 s; reconciling waits for the session, and runs once it is back."""
from __future__ import annotations

import logging
import time

import pytest
import requests

import host.engine
from conftest import SYMBOL, D, alert, wait_for
from test_shoonya import live_host, login

SAID = "broker session expired — log in at /broker/login"


def _count_book_reads(h) -> list:
    broker, reads = h.runtime.broker, []
    book = broker.order_book
    broker.order_book = lambda: (reads.append(time.monotonic()), book())[1]
    return reads


def test_before_the_login_one_event_one_log_line_and_no_reconcile(sim, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    h = live_host(sim, tmp_path / "var")
    try:
        reads = _count_book_reads(h)
        assert h.runtime.engine.reconcile_every_s == 2.0
        time.sleep(4.5)  # two reconciles' worth
        lines = [r for r in caplog.records if r.levelno >= logging.INFO and "session expired" in r.getMessage()]
        assert [r.getMessage() for r in lines] == [f"{SAID} (no saved session)"]
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "reconcile" in r.getMessage()]
        events = h.api("/api/events").get_json()["items"]
        said = [e for e in events if SAID in e["message"]]
        assert [e["kind"] for e in said] == ["broker_session_expired"], said
        assert reads == []  # reconciling waits for the session: the book is not read
        r = h.post(alert())
        assert r.status_code == 423 and SAID in r.get_json()["reason"]
        login(h, sim)  # the login reconciles at once, and trading starts
        wait_for(lambda: reads, timeout=3)
        assert h.post(alert(direction="BUY", qty=75, price="43")).status_code == 200
    finally:
        h.stop()


def test_a_session_back_without_a_login_here_is_noticed_by_a_slow_probe(sim, tmp_path, monkeypatch):
    monkeypatch.setattr(host.engine, "SESSION_PROBE_S", 0.5)
    h = live_host(sim, tmp_path / "var")
    try:
        login(h, sim)
        with sim.sim.lock:
            saved = dict(sim.sim.sessions)
        sim.sim.expire_sessions()
        r = h.post(alert(alert_id="during"))  # its PlaceOrder, or a read of risk's before it, finds it expired
        assert r.status_code in (200, 423), r.get_json()
        wait_for(lambda: h.runtime.broker.session_expired, timeout=3)
        with sim.sim.lock:  # the broker takes the same token again (it was ended by mistake)
            sim.sim.sessions.update(saved)
        wait_for(lambda: not h.runtime.broker.session_expired, timeout=4)
        reads = _count_book_reads(h)
        # reading the book again: the feed's reconnect for the session rereads it once the old library thread
        # has ended (up to 3 s) and the new socket is open, 3.9 s after the probe on a quiet machine
        wait_for(lambda: reads, timeout=10)
    finally:
        h.stop()


@pytest.mark.slow
def test_a_session_ended_during_the_day_does_not_flood_feed_warnings(sim, tmp_path):
    """Found from outside: after a mid-day expiry the feed said disconnected/restarted every 2.5-5 s (and to
    Telegram) until the login; the one session event already says it."""
    h = live_host(sim, tmp_path / "var")
    try:
        login(h, sim)
        wait_for(lambda: [e for e in h.api("/api/events").get_json()["items"] if e["kind"] == "feed_connected"],
                 timeout=8)
        sim.sim.expire_sessions()
        assert h.post(alert(alert_id="during")).status_code == 200  # the broker answers: session expired
        wait_for(lambda: h.runtime.broker.session_expired, timeout=3)
        for hook in list(sim.sim.ws_hooks):  # and the broker drops the feed, as it does at session end
            hook("drop")
        time.sleep(12)
        kinds = [e["kind"] for e in h.api("/api/events", query_string={"limit": 200}).get_json()["items"]]
        noisy = [k for k in kinds if k in ("feed_disconnected", "feed_restarted", "feed_stalled")]
        assert len(noisy) <= 1, noisy
        login(h, sim)  # after the login the feed comes back
        wait_for(lambda: len([e for e in h.api("/api/events", query_string={"limit": 200}).get_json()["items"]
                              if e["kind"] == "feed_connected"]) >= 2, timeout=15)
    finally:
        h.stop()


def test_an_exit_during_an_expired_session_is_held_and_sent_once_after_the_login(sim, tmp_path):
    """Found from outside: an EXIT while the broker session was over was answered 200, then rejected
    ("sessionexpired") and never sent again: the position stayed open after the trader logged in. The broker
    placed nothing, so the order is held (NEW) and sent by the recovery after the login, once."""
    h = live_host(sim, tmp_path / "var", RISK_POLL_S=1)
    try:
        login(h, sim)
        sim.sim.tick("NFO", SYMBOL, D("42.5"))
        entry = h.post(alert(direction="BUY", qty=75, price="43", alert_id="in"))
        assert entry.status_code == 200, entry.get_json()
        wait_for(lambda: h.api("/api/positions").get_json()["items"], timeout=5)
        sim.sim.expire_sessions()
        r = h.post(alert("EXIT", direction="SELL", qty=75, price="42", alert_id="out"))
        assert r.status_code == 200, r.get_json()
        [oid] = [o["id"] for o in r.get_json()["orders"]]
        held = wait_for(lambda: [e for e in h.api("/api/events").get_json()["items"] if e["kind"] == "order_held"],
                        timeout=5)
        assert oid in held[0]["message"] and "NOT placed" in held[0]["message"], held
        assert h.api(f"/api/orders/{oid}").get_json()["status"] == "NEW"
        assert sim.sim.engine.find_all(oid) == []
        login(h, sim)
        wait_for(lambda: h.api(f"/api/orders/{oid}").get_json()["status"] == "FILLED", timeout=8)
        time.sleep(1.0)
        assert len(sim.sim.engine.find_all(oid)) == 1
        assert sim.sim.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0
    finally:
        h.stop()


def _holding(h, sim, qty: int) -> None:
    """Logged in, and the strategy holds qty bought at the market."""
    login(h, sim)
    sim.sim.tick("NFO", SYMBOL, D("42.5"))
    assert h.post(alert(direction="BUY", qty=qty, price="43", alert_id="in")).status_code == 200
    wait_for(lambda: h.api("/api/positions").get_json()["items"], timeout=5)


def _held_exit(h, **kw) -> str:
    """The session is over: an EXIT alert's order is held (NEW) for the login; its id."""
    r = h.post(alert("EXIT", direction="SELL", alert_id="out", **kw))
    [oid] = [o["id"] for o in r.get_json()["orders"]]
    wait_for(lambda: [e for e in h.api("/api/events").get_json()["items"] if e["kind"] == "order_held"], timeout=5)
    return oid


def _sold_in_the_app(sim, qty: int) -> None:
    requests.post(f"http://127.0.0.1:{sim.port}/sim/control", timeout=5, json={
        "action": "manual_order", "exchange": "NFO", "symbol": SYMBOL, "side": "S", "qty": qty}).raise_for_status()


def _rejected_after_login(h, sim, oid: str) -> dict:
    """The login's recovery sends the held exit late, capped: cut to nothing, it is rejected, never sent."""
    login(h, sim)
    order = wait_for(lambda: (o := h.api(f"/api/orders/{oid}").get_json())["status"] == "REJECTED" and o, timeout=8)
    assert "broker's net" in order["reason"] and "+0" in order["reason"], order
    return order


def test_an_exit_held_for_the_login_is_not_sent_if_the_trader_closed_the_position_in_the_app_meanwhile(sim, tmp_path):
    """The held exit goes out late: it is capped at the broker's net then, as an EXIT alert is when it comes, so a
    position the trader closed in the broker's app while the host was logged out is not sold again (short)."""
    h = live_host(sim, tmp_path / "var", RISK_POLL_S=1)
    try:
        _holding(h, sim, 75)
        sim.sim.expire_sessions()
        oid = _held_exit(h, qty=75, price="42")
        _sold_in_the_app(sim, 75)
        assert sim.sim.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0
        _rejected_after_login(h, sim, oid)
        time.sleep(1.0)
        assert sim.sim.engine.find_all(oid) == []
        assert sim.sim.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0
    finally:
        h.stop()


def test_an_exit_held_for_the_login_counts_the_exit_already_resting_before_it_is_sent_late(sim, tmp_path):
    """Found from outside: 150 held, a limit exit of 75 resting, the session over, an EXIT for the other 75 held,
    and the trader sells 75 in the app meanwhile. The late send was capped at the broker's net (75) alone: it sold
    75, and the resting exit's fill then took the account short 75. The resting exit is counted against the net."""
    h = live_host(sim, tmp_path / "var", RISK_POLL_S=1)
    try:
        _holding(h, sim, 150)
        r = h.post(alert("EXIT", direction="SELL", qty=75, order_type="LMT", price="60", alert_id="half"))
        [resting] = [o["id"] for o in r.get_json()["orders"]]
        wait_for(lambda: h.api(f"/api/orders/{resting}").get_json()["status"] == "OPEN", timeout=5)
        sim.sim.expire_sessions()
        oid = _held_exit(h, qty=150, order_type="MKT", price=None)
        assert h.api(f"/api/orders/{oid}").get_json()["qty"] == 75  # the rest: the resting exit covers 75
        _sold_in_the_app(sim, 75)
        order = _rejected_after_login(h, sim, oid)
        assert "exits already working" in order["reason"], order
        sim.sim.tick("NFO", SYMBOL, D("61"))  # the resting exit fills
        wait_for(lambda: h.api(f"/api/orders/{resting}").get_json()["status"] == "FILLED", timeout=8)
        time.sleep(1.0)
        assert sim.sim.engine.find_all(oid) == []
        assert sim.sim.engine.positions()[("NFO", SYMBOL, "M")].net_qty == 0
    finally:
        h.stop()
