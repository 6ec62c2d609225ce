"""Risk that nothing can switch off (issue 13): each numbered case of the issue, on the running engine."""
from __future__ import annotations

import contextlib
import json
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from host.brokers.base import BrokerError, Rejected
from host.market import IST, MarketClock
from host.models import Tick
from host.storage import Storage

from conftest import SYMBOL, alert, wait_for
from plugin_files import strategy_source, wait_strategy, write

FUT = "NIFTY28APR26F"


@pytest.fixture
def risky(host_factory):
    h = host_factory(RISK_BASE_MAX_LOSS="-1000", RISK_TRAIL_STEP="0", RISK_STATUS_UPDATE_MIN="0")
    h.runtime.engine.risk_poll_s = 0.05
    return h


def _long(h, strategy="s1", qty=100, price="100", symbol=SYMBOL, product="M", exchange="NFO"):
    h.tick(price, symbol=symbol, exchange=exchange)
    r = h.post(alert(strategy=strategy, direction="BUY", qty=qty, price=price, tradingsymbol=symbol,
                     product_type=product, exchange=exchange))
    assert r.status_code == 200, r.get_json()
    wait_for(lambda: h.net(strategy, symbol) == qty)


def _events(h, kind):
    return [e for e in h.api("/api/events", query_string={"limit": 500}).get_json()["items"] if e["kind"] == kind]


def _risk(h):
    return h.api("/api/risk").get_json()


def test_1_blind_risk_still_breaches_and_flattens_on_an_estimated_pnl(risky):
    _long(risky)
    def unreadable():
        raise BrokerError("PositionBook timed out")
    risky.broker.positions = unreadable
    wait_for(lambda: _risk(risky)["blind"])
    risky.tick("89")  # -1100 against -1000, seen from our own book and the feed
    wait_for(lambda: _risk(risky)["breached"], timeout=5)
    wait_for(lambda: _risk(risky)["state"] == "halted")  # the halt is written just after the day's breach
    assert _risk(risky)["estimated"] is True
    wait_for(lambda: risky.net() == 0)
    assert risky.post(alert("ENTRY", "other", tradingsymbol="OTHER")).status_code == 423


def _halt_write_fails(gate, times: int = 10**6) -> list:
    """Risk's halt write fails (a disk I/O error) `times` times; the reasons it tried with."""
    real_set_state, failed = gate.set_state, []

    def set_state(db, state, reason, by, *more):
        if state.value == "halted" and by == "risk" and len(failed) < times:
            failed.append(reason)
            raise OSError("disk I/O error (test): the halt is not written")
        return real_set_state(db, state, reason, by, *more)
    gate.set_state = set_state
    return failed


def test_1b_an_entry_between_the_days_breach_and_the_halt_is_refused(risky):
    """The day's breach is recorded, then the state is set to halted in a later write: under load a full test of
    /api/risk saw `breached` and `active` together. An entry in that gap (or after a halt write that failed) was
    taken: the gate looked at the state only. Today's breach, not yet overridden, refuses entries itself."""
    _long(risky)
    gate, real_set_state = risky.runtime.gate, risky.runtime.gate.set_state
    halts = _halt_write_fails(gate)
    risky.tick("89")  # -1100 against -1000
    wait_for(lambda: halts and _risk(risky)["breached"], timeout=5)
    assert _risk(risky)["state"] == "active"  # the gap, held open
    r = risky.post(alert("ENTRY", "other", tradingsymbol="OTHER"))
    assert r.status_code == 423, r.get_json()
    assert "daily loss limit was breached" in r.get_json()["reason"]
    gate.set_state = real_set_state
    wait_for(lambda: risky.net() == 0)  # exits are not held up by it


def test_1c_a_halt_write_that_failed_is_written_again_on_a_later_beat(risky):
    """Review 15: the halt write failed once at the breach, and was never tried again: entries were refused, but
    /api/risk, /healthz, the dashboard and Telegram's /status said `active` for the rest of the day."""
    _long(risky)
    failed = _halt_write_fails(risky.runtime.gate, times=1)
    risky.tick("89")  # -1100 against -1000
    wait_for(lambda: failed and _risk(risky)["breached"], timeout=5)
    wait_for(lambda: _risk(risky)["state"] == "halted", timeout=5)
    assert "written again" in risky.runtime.gate.state()["reason"]
    wait_for(lambda: risky.net() == 0)
    assert risky.post(alert("ENTRY", "other", tradingsymbol="OTHER")).status_code == 423


def test_1d_an_override_made_while_a_check_runs_on_another_thread_is_not_undone_by_it(risky):
    """Review 15: the check also runs on the engine thread (at start, after a broker login) while the override
    (halt with override_breach) ran on the risk thread without the check's lock. A check that read the day before
    the override and stored it after dropped the override, and the halt was then written again: the trader's
    resume undone. The override now waits for the check to end."""
    import threading
    _long(risky)
    risky.tick("89")  # -1100 against -1000
    wait_for(lambda: _risk(risky)["state"] == "halted", timeout=5)
    wait_for(lambda: risky.net() == 0)
    risk, manager = risky.runtime.engine.risk, risky.runtime.gate.manager
    real_load, paused, go = manager.load_day, threading.Event(), threading.Event()

    def load_day(today):
        day = real_load(today)
        if threading.current_thread().name == "late-check":
            paused.set()
            go.wait(5)  # the day as read before the override, stored after it
        return day
    manager.load_day = load_day
    late = threading.Thread(target=risk.check, name="late-check")
    late.start()
    assert paused.wait(5)
    resume = threading.Thread(target=risk.halt, args=({"mode": "active", "override_breach": True, "by": "me"},))
    resume.start()
    time.sleep(0.3)
    go.set()
    late.join(5)
    resume.join(5)
    manager.load_day = real_load
    today = risky.runtime.gate.clock.day(datetime.now(timezone.utc))
    assert not manager.load_day(today).halted_by_breach, manager.load_day(today)
    time.sleep(0.6)  # risk beats: the halt is not written again
    assert _risk(risky)["state"] == "active", _risk(risky)
    assert risky.post(alert("ENTRY", "again", tradingsymbol="OTHER")).status_code == 200


@pytest.mark.parametrize("before, action", [("reduce_only", "resume"), ("active", "fail_closed")])
def test_1g_a_trader_halt_landing_between_risks_read_of_the_state_and_its_write_stands(risky, before, action):
    """Risk read the trading state, then wrote its own in a later transaction: a halt the trader sent in between
    (from the API's thread, while the check ran on the engine's after a login) was written over. Risk's
    automatic resume made it `active`; its fail-closed made it `reduce_only`. Risk now decides inside the write."""
    from host.models import TradingState
    from host.risk import Action
    risk, gate, storage = risky.runtime.engine.risk, risky.runtime.gate, risky.runtime.storage
    storage.write(lambda db: gate.set_state(db, TradingState(before), "blind: failing closed", "risk"))
    real_read, landed = gate.manager.trading_state, threading.Event()

    def read(*a, **kw):  # the trader's halt, from another thread, lands right after risk reads the state
        st = real_read(*a, **kw)
        if threading.current_thread().name == "late-risk" and not landed.is_set():
            threading.Thread(target=lambda: (storage.write(lambda db: gate.set_state(
                db, TradingState.HALTED, "by hand", "api")), landed.set())).start()
            landed.wait(0.3)  # it waits for risk's transaction if risk reads inside one
        return st
    gate.manager.trading_state = read
    try:
        late = threading.Thread(target=risk.act, args=(Action(action, "risk sees again" if action == "resume"
                                                              else "risk is blind"),), name="late-risk")
        late.start()
        late.join(5)
    finally:
        gate.manager.trading_state = real_read
    assert landed.wait(5)
    st = gate.state()
    assert (st["state"], st["by"]) == ("halted", "api"), st
    assert risky.post(alert("ENTRY", "after-halt", tradingsymbol="OTHER")).status_code == 423


def test_2a_a_poison_alert_fails_alone_and_the_loop_goes_on(risky):
    storage = risky.runtime.storage
    storage.write(lambda db: db["alerts"].insert({  # a value that slipped past validation (an older host stored it)
        "id": "apoison", "received_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "strategy": "s1", "execution_type": "ENTRY", "status": "received", "orders": "[]",
        "body": json.dumps({"strategy_name": "s1", "execution_type": "ENTRY", "legs": [
            {"exchange": "NFO", "tradingsymbol": SYMBOL, "direction": "SELL", "qty": 75, "order_type": "LMT",
             "product_type": "M", "price": "1e27x", "trigger_price": None}]})}))
    risky.runtime.engine.wake()
    t0 = time.monotonic()
    assert risky.api("/api/halt", "POST", json={"mode": "reduce_only"}).status_code == 200
    assert time.monotonic() - t0 < 1.0
    bad = wait_for(lambda: (a := storage.one("select * from alerts where id = 'apoison'"))["status"] == "failed" and a)
    assert "the host failed on this alert" in bad["reason"]
    risky.api("/api/halt", "POST", json={"mode": "active"})
    assert risky.post(alert(alert_id="after")).status_code == 200


def test_2b_a_strategy_param_that_is_not_a_number_never_stops_risk(risky):
    from pathlib import Path
    write(Path(risky.settings.PLUGINS_DIR) / "strategies", "capped",
          strategy_source("capped", meta_extra=', "params": {"max_loss": "5k"}'))
    wait_strategy(risky, "capped", status="running")
    _long(risky, strategy="capped")
    risky.tick("89")
    wait_for(lambda: _risk(risky)["breached"], timeout=5)
    wait_for(lambda: risky.net("capped") == 0)
    assert any("max_loss '5k' is not a number" in e["message"] for e in _events(risky, "risk_param"))


def test_3_a_carried_position_counts_from_the_previous_close_not_its_entry(risky):
    _long(risky, qty=100, price="100")
    risky.tick("92")  # yesterday's close: -800 by its entry, which is yesterday's business
    wait_for(lambda: Decimal(str(_risk(risky)["day_pnl"])) == Decimal("-800"))
    _next_trading_day(risky)
    wait_for(lambda: _events(risky, "risk_new_day"))
    risky.tick("89")  # today: -300 (by its entry it would be -1100, a breach)
    wait_for(lambda: Decimal(str(_risk(risky)["day_pnl"])) == Decimal("-300"))
    r = _risk(risky)
    assert r["breached"] is False and Decimal(str(r["carried"]["excluded_pnl"])) == Decimal("-800")
    assert risky.net() == 100


def test_4_a_breach_never_sells_cnc_holdings(risky):
    _long(risky, strategy="investor", qty=10, price="1500", symbol="INFY-EQ", product="C", exchange="NSE")
    _long(risky, qty=100, price="100")
    risky.tick("89")
    wait_for(lambda: risky.net() == 0)
    assert risky.net("investor", "INFY-EQ") == 10
    breach = [e for e in _events(risky, "exit_all") if "breached" in e["message"]][0]
    assert "left alone" in breach["message"] and "CNC holdings are outside risk" in breach["message"]


def test_6_rejected_exits_back_off_and_say_it_once(risky):
    _long(risky)
    real_place = risky.broker.place

    def refuse_exits(req):
        if req.side.value == "SELL":
            raise Rejected("RMS: exits blocked for the test")
        return real_place(req)
    risky.broker.place = refuse_exits
    risky.tick("89")
    wait_for(lambda: _risk(risky)["breached"])
    time.sleep(6)
    exits = [o for o in risky.orders() if o["action"] == "EXIT"]
    assert 2 <= len(exits) <= 5, [o["created_at"] for o in exits]  # 1, 2, 4 s apart, not 10 a second
    assert len(_events(risky, "exit_rejected")) == 1
    [breach] = _events(risky, "risk_breach")  # it never claims the exits done: here every one was rejected
    assert "being cancelled and positions exited" in breach["message"], breach["message"]


def test_7_one_bad_tick_is_held_and_moves_nothing(risky):
    _long(risky, qty=100, price="100")
    engine = risky.runtime.engine
    engine.on_ticks([Tick("NFO", SYMBOL, Decimal("200"))])  # a 2x print
    wait_for(lambda: _risk(risky)["ticks_held"] == 1, timeout=3)
    assert Decimal(str(_risk(risky)["peak_pnl"])) == 0
    engine.on_ticks([Tick("NFO", SYMBOL, Decimal("100"))])
    time.sleep(0.5)
    assert _risk(risky)["breached"] is False
    engine.on_ticks([Tick("NFO", SYMBOL, Decimal("130")), Tick("NFO", SYMBOL, Decimal("131"))])  # confirmed
    wait_for(lambda: Decimal(str(_risk(risky)["day_pnl"])) == Decimal("3100"))


def _next_trading_day(h, hour: int = 10, minute: int = 0) -> None:
    """Move the host's clock to the next trading day, at hh:mm Asia/Kolkata."""
    day = MarketClock().next_trading_day(datetime.now(timezone.utc).astimezone(IST).date())
    target = datetime.combine(day, datetime.min.time().replace(hour=hour, minute=minute), IST)
    h.runtime.clock_offset = target - datetime.now(timezone.utc)


def test_8_an_mis_entry_after_the_square_off_time_is_refused(host_factory):
    h = host_factory(SQUARE_OFF_TIME="15:15")
    _next_trading_day(h, 15, 20)
    r = h.post(alert(product_type="I"))
    assert r.status_code == 423 and "after the square-off time 15:15" in r.get_json()["reason"]
    assert h.post(alert(product_type="M", alert_id="nrml")).status_code == 200


def test_9_resume_after_a_breach_needs_an_override_and_then_resumes_for_real(risky):
    _long(risky)
    risky.tick("89")
    wait_for(lambda: risky.net() == 0 and _risk(risky)["state"] == "halted")
    r = risky.api("/api/halt", "POST", json={"mode": "active"})
    assert r.status_code == 409 and "breached" in r.get_json()["error"]
    r = risky.api("/api/halt", "POST", json={"mode": "active", "override_breach": True})
    assert r.status_code == 200, r.get_json()
    assert any("overridden by api" in e["message"] for e in _events(risky, "risk_override"))
    _long(risky, strategy="after", qty=75, price="89")
    time.sleep(1.0)
    assert risky.net("after") == 75  # not sold again as a "violation"
    assert [o for o in risky.orders() if o["strategy"] == "after" and o["action"] == "EXIT"] == []


def test_5_an_unfilled_breach_exit_is_moved_towards_the_market_until_it_fills(host_factory):
    h = host_factory(RISK_BASE_MAX_LOSS="-1000", RISK_TRAIL_STEP="0", RISK_STATUS_UPDATE_MIN="0", EXIT_REPRICE_S="0.5")
    _long(h)
    broker = h.broker
    real_place = broker.place

    def stale_protection(req):  # the exit's limit is built on a stale, higher price: it rests above the market
        from dataclasses import replace
        from host.models import OrderType
        if req.order_type is OrderType.MKT and req.side.value == "SELL":
            req = replace(req, order_type=OrderType.LMT, price=Decimal("95"))
        return real_place(req)
    broker.place = stale_protection
    h.tick("89")
    exit_id = wait_for(lambda: next((o["id"] for o in h.orders() if o["action"] == "EXIT"), None))
    wait_for(lambda: h.api(f"/api/orders/{exit_id}").get_json()["status"] == "OPEN")
    o = wait_for(lambda: (o := h.api(f"/api/orders/{exit_id}").get_json())["status"] == "FILLED" and o, timeout=5)
    assert any("moving to" in (x["detail"] or "") for x in o["history"])
    assert Decimal(o["avg_price"]) <= Decimal("89") and h.net() == 0
    assert _events(h, "exit_repriced")


@contextlib.contextmanager
def _engine_check_stuck(h):
    """While inside: the engine thread's check (as after a broker login) is stuck in a slow broker read."""
    import threading
    risk = h.runtime.engine.risk
    real_poll, reading, done = risk.outside.poll, threading.Event(), threading.Event()

    def poll(*a, **kw):
        if threading.current_thread().name == "late-check":
            reading.set()
            done.wait(10)  # a slow broker read
        return real_poll(*a, **kw)
    risk.outside.poll = poll
    late = threading.Thread(target=risk.check, kwargs={"poll": True}, name="late-check", daemon=True)
    late.start()
    try:
        assert reading.wait(5)
        yield
    finally:
        done.set()
        late.join(5)
        risk.outside.poll = real_poll


def test_1e_a_resume_waiting_for_a_slow_check_is_refused_and_a_halt_after_it_acts_at_once(risky):
    """Review 17: the resume took the check's lock and waited for a check stuck in a slow broker read (on the
    engine thread, after a login): both it and the halt queued behind it answered 504 after 5 s, and the halt was
    written only when the read ended. The resume waits a second at most, then is refused saying so."""
    assert risky.api("/api/halt", "POST", json={"mode": "reduce_only"}).status_code == 200
    with _engine_check_stuck(risky):
        t0 = time.monotonic()
        r = risky.api("/api/halt", "POST", json={"mode": "active"})
        assert r.status_code == 409 and "nothing was changed" in r.get_json()["error"], r.get_json()
        assert time.monotonic() - t0 < 3.0
        t1 = time.monotonic()
        r = risky.api("/api/halt", "POST", json={"mode": "halted", "reason": "stop now"})
        assert r.status_code == 200 and time.monotonic() - t1 < 1.0, r.get_json()
        assert _risk(risky)["state"] == "halted"
    assert risky.api("/api/halt", "POST", json={"mode": "active"}).status_code == 200  # once the check has ended


@contextlib.contextmanager
def _exit_all_slow(h, seconds: float = 3.0):
    """While inside: an exit-all runs on risk's thread and takes `seconds` (a slow read of the broker's books)."""
    handlers = h.runtime.engine.commands.handlers
    real, started = handlers["exit_all"], threading.Event()

    def slow(args):
        started.set()
        time.sleep(seconds)
        return real(args)
    handlers["exit_all"] = slow
    sent = threading.Thread(target=lambda: h.api("/api/exit-all", "POST", json={}), daemon=True)
    try:
        sent.start()
        assert started.wait(5)
        yield
    finally:
        sent.join(seconds + 10)
        handlers["exit_all"] = real


def test_1h_a_halt_sent_while_an_exit_all_runs_acts_at_once(risky):
    """Review 18 F4: halts ran on risk's thread one command at a time, behind an exit-all whose read of the broker
    could take seconds: the halt answered 504 after 5 s, and entries were still accepted until the exit-all ended."""
    with _exit_all_slow(risky):
        t0 = time.monotonic()
        r = risky.api("/api/halt", "POST", json={"mode": "halted", "reason": "stop now"})
        assert r.status_code == 200 and time.monotonic() - t0 < 1.0, (r.status_code, r.get_json())
        assert risky.post(alert("ENTRY", "during-exit-all", tradingsymbol="OTHER")).status_code == 423
    assert _risk(risky)["state"] == "halted"


def test_1i_a_resume_sent_before_a_halt_never_undoes_it_whatever_order_they_run_in(risky):
    """Halts now run at once on a thread of their own, and a resume still waits behind an exit-all on risk's
    thread: a resume sent before a halt, run after it, would have made trading active against the trader's last
    word. It is refused instead, and the halt stands."""
    assert risky.api("/api/halt", "POST", json={"mode": "reduce_only"}).status_code == 200
    with _exit_all_slow(risky):
        answers = {}
        resume = threading.Thread(target=lambda: answers.update(
            resume=risky.api("/api/halt", "POST", json={"mode": "active"})))
        resume.start()
        wait_for(lambda: risky.runtime.storage.one("select count(*) n from commands where kind = 'halt' and "
                                                   "status = 'pending'")["n"] == 1, timeout=5)
        assert risky.api("/api/halt", "POST", json={"mode": "halted", "reason": "after"}).status_code == 200
        resume.join(10)
    r = answers["resume"]
    assert r.status_code == 409 and "halt" in r.get_json()["error"], (r.status_code, r.get_json())
    st = _risk(risky)
    assert st["state"] == "halted", st
    assert risky.api("/api/halt", "POST", json={"mode": "active"}).status_code == 200  # a resume sent after: done


def test_1j_a_resume_sent_after_a_halt_acts_after_it_even_when_the_halt_is_slow(risky):
    """The other order: a halt, then a resume. The resume must not run first on risk's thread while the halt is
    still being written on its own (the halt would then stand against the trader's last word)."""
    handlers = risky.runtime.engine.commands.handlers
    real = handlers["halt"]

    def slow(args):
        if args.get("mode") != "active":
            time.sleep(1.0)  # a halt's write held up (a busy disk)
        return real(args)
    handlers["halt"] = slow
    try:
        halt = threading.Thread(target=lambda: risky.api("/api/halt", "POST", json={"mode": "halted"}))
        halt.start()
        wait_for(lambda: risky.runtime.storage.one("select count(*) n from commands where kind = 'halt'")["n"] == 1)
        r = risky.api("/api/halt", "POST", json={"mode": "active"})
        halt.join(10)
    finally:
        handlers["halt"] = real
    assert r.status_code == 200, r.get_json()
    assert _risk(risky)["state"] == "active", _risk(risky)


def test_1f_while_another_threads_check_is_stuck_healthz_says_risk_is_not_evaluating(risky, monkeypatch):
    """Review 18: with the beat's check skipped while the engine thread's check waited on a slow broker read, the
    skipped beat still wrote risk's heartbeat: /healthz said all was well while nothing checked the loss limit."""
    from host import views
    monkeypatch.setattr(views, "RISK_EVAL_MAX_S", 1.5)
    with _engine_check_stuck(risky):
        health = wait_for(lambda: (r := risky.client.get("/healthz")).status_code != 200 and r, timeout=6)
        assert any("risk has not evaluated" in p for p in health.get_json()["problems"]), health.get_json()
    wait_for(lambda: risky.client.get("/healthz").status_code == 200, timeout=5)


def test_1k_a_trader_halt_followed_by_a_breach_is_not_lifted_by_the_next_trading_day(risky):
    """Review 23 R6: the breach wrote `halted by risk` over the trader's halt, so the next trading day's end of
    the breach halt made trading active: a halt the trader set (a halt does not flatten, so the limit can be hit
    after it) lifted for him the next morning. The trader's state now stays underneath and comes back."""
    gate = risky.runtime.gate
    _long(risky)
    assert risky.api("/api/halt", "POST", json={"mode": "halted", "reason": "done for the week"}).status_code == 200
    risky.tick("89")
    wait_for(lambda: _risk(risky)["breached"], timeout=5)
    wait_for(lambda: risky.net() == 0)
    _next_trading_day(risky)
    wait_for(lambda: _events(risky, "risk_new_day"))
    time.sleep(1.0)
    st = gate.state()
    assert (st["state"], st["by"]) == ("halted", "api") and st["reason"].startswith("done for the week"), st


@pytest.mark.parametrize("mode", ["reduce_only", None])
def test_1l_after_a_breach_the_next_trading_day_brings_back_what_the_trader_had_set(risky, mode):
    """The other halves of R6: a trader's reduce-only under the breach comes back as reduce-only (not active),
    and a breach over `active` ends in `active`, as before."""
    gate = risky.runtime.gate
    _long(risky)
    if mode:
        assert risky.api("/api/halt", "POST", json={"mode": mode}).status_code == 200
    risky.tick("89")
    wait_for(lambda: _risk(risky)["breached"] and gate.state()["state"] == "halted", timeout=5)
    wait_for(lambda: risky.net() == 0)
    _next_trading_day(risky)
    wait_for(lambda: gate.state()["state"] != "halted", timeout=5)
    assert gate.state()["state"] == (mode or "active"), gate.state()


def test_1m_a_resume_sent_before_the_traders_halt_is_still_overtaken_after_a_breach_wrote_the_state(risky):
    """Review 23 R1: risk's breach write dropped the command id the trader's halt had stored, so a resume sent
    before that halt (with override_breach), run after the breach, was no longer seen as overtaken: it overrode
    the new breach and made trading active."""
    from host.commands import Conflict
    gate, risk = risky.runtime.gate, risky.runtime.engine.risk
    _long(risky)
    assert risky.api("/api/halt", "POST", json={"mode": "reduce_only", "reason": "trader"}).status_code == 200
    halt_id = gate.state()["command"]
    risky.tick("89")  # -1100 against -1000: risk's breach rewrites the state
    wait_for(lambda: _risk(risky)["breached"] and gate.state()["by"] == "risk", timeout=5)
    with pytest.raises(Conflict):  # the resume the trader sent before the reduce-only, reaching its turn now
        risk.halt({"mode": "active", "by": "api", "override_breach": True, "command_id": halt_id - 1})
    assert gate.state()["state"] == "halted", gate.state()
    assert _risk(risky)["breach_overridden_by"] is None


def test_1n_a_resume_refused_as_overtaken_has_not_overridden_the_breach(risky):
    """Review 23 R2: the override (the day's record, and its "trading resumes" event) was written before the
    resume's check in the state write: a halt landing in between made the answer 409 "nothing was changed",
    while the breach was overridden and the limit restarted, so a later plain resume was accepted."""
    from host.commands import Conflict
    from host.models import TradingState
    gate, risk, storage = risky.runtime.gate, risky.runtime.engine.risk, risky.runtime.storage
    _long(risky)
    risky.tick("89")
    wait_for(lambda: _risk(risky)["breached"] and _risk(risky)["state"] == "halted", timeout=5)
    real = gate.manager.load_day
    landed = []

    def load_day(today):  # the trader's halt (from the halts thread) lands while the resume is under way
        day = real(today)
        if threading.current_thread().name == "late-resume" and not landed:
            landed.append(storage.write(lambda db: gate.set_state(db, TradingState.HALTED, "by hand", "api", 10**9)))
        return day
    gate.manager.load_day = load_day
    failed = []

    def resume():
        try:
            risk.halt({"mode": "active", "by": "api", "override_breach": True, "command_id": 10**9 - 1})
        except Conflict as e:
            failed.append(str(e))
    try:
        t = threading.Thread(target=resume, name="late-resume")
        t.start()
        t.join(5)
    finally:
        gate.manager.load_day = real
    assert landed and failed and "nothing was changed" in failed[0], failed
    assert _risk(risky)["breach_overridden_by"] is None
    assert not _events(risky, "risk_override")
    assert risky.api("/api/halt", "POST", json={"mode": "active"}).status_code == 409  # the breach still needs it


def test_1o_the_halts_thread_reads_the_commands_only_when_a_command_may_be_waiting(risky):
    """Review 23 R3: every wake of risk (each tick batch, each fill) woke the halts thread too, which then read the
    commands table: under a tick storm, back to back on a 2-core machine."""
    risk = risky.runtime.engine.risk
    real, calls = risk.halts, []

    def counting():
        calls.append(time.monotonic())
        real()
    risk.halts = counting
    stop = time.monotonic() + 1.0
    try:
        while time.monotonic() < stop:
            risk.wake()
            time.sleep(0.005)
    finally:
        risk.halts = real
    assert len(calls) <= 8, f"{len(calls)} reads of the commands in 1 s on risk-halts"


@pytest.mark.parametrize("halted_before", [False, True])
def test_3b_a_death_right_after_the_new_day_is_stored_still_carries_over_and_ends_the_breach_halt(risky, halted_before):
    """Review 24: the new day's record was stored first, and yesterday's carry-over (realised PnL back to 0,
    positions valued from the close) and the end of the breach halt came after it, in writes of their own. A death
    in between, and the restart saw the day already begun: yesterday's profit stayed in today's PnL, hiding today's
    losses from the limit, and the breach halt stayed all day. All three are now one transaction."""
    risk = risky.runtime.engine.risk
    _long(risky, qty=100, price="100")
    risky.tick("92")  # yesterday: -800 on the position...
    if halted_before:
        risky.tick("89")  # ...or a breach: halted by risk, flattened
        wait_for(lambda: _risk(risky)["breached"] and risky.net() == 0, timeout=5)
    real_act = risk.act
    risk.act = lambda action: None if action.kind in ("new_day", "resume") else real_act(action)  # died first
    try:
        _next_trading_day(risky)
        wait_for(lambda: risky.runtime.storage.get_state("risk_day") and
                 json.loads(risky.runtime.storage.get_state("risk_day"))["day"] != datetime.now(IST).date().isoformat())
        time.sleep(0.5)
    finally:
        risk.act = real_act
    if halted_before:
        assert _risk(risky)["state"] == "active", _risk(risky)
    else:
        risky.tick("89")  # today: -300 from the close (by its entry it would be -1100, a breach)
        wait_for(lambda: Decimal(str(_risk(risky)["day_pnl"])) == Decimal("-300"), timeout=5)
        assert _risk(risky)["breached"] is False


def test_3c_an_unreadable_state_under_a_breach_is_not_lifted_by_the_next_trading_day(risky):
    """Review 24: an unreadable stored state reads as reduce-only by risk, "until POST /api/halt active". The breach
    took it for risk's own state and kept nothing under its halt, so the next trading day made trading active,
    though the state that could not be read may have been the trader's halt."""
    storage = risky.runtime.storage
    _long(risky)
    storage.write(lambda db: Storage.put_state(db, "trading_state", "{not json"))
    risky.tick("89")
    wait_for(lambda: _risk(risky)["breached"] and risky.net() == 0, timeout=5)
    _next_trading_day(risky)
    wait_for(lambda: _events(risky, "risk_new_day"))
    time.sleep(0.5)
    st = risky.runtime.gate.state()
    assert st["state"] == "reduce_only" and st["by"] != "risk", st
    assert risky.api("/api/halt", "POST", json={"mode": "active"}).status_code == 200  # the trader lifts it


def test_3d_a_breach_halt_whose_kept_state_is_corrupt_stays_halted_and_the_day_goes_on(risky):
    """Review 24 R5: an `under` that is not an object made the end of the breach halt raise: that day's end of
    the halt, and the new day's carry-over in the same transaction, were lost."""
    gate, storage = risky.runtime.gate, risky.runtime.storage
    for under in ("garbage", {}, {"state": "paused", "by": "risk"}):  # review 25 R7: the last two too
        storage.write(lambda db: Storage.put_state(db, "trading_state", json.dumps(
            {"state": "halted", "reason": "breach", "by": "risk", "under": under})))
        assert storage.write(lambda db: gate.end_breach_halt(db, "new trading day")) is True
        st = gate.state()
        assert st["state"] == "halted" and st["by"] != "risk", (under, st)  # kept halted; no new day lifts it


def test_3e_a_command_naming_itself_risk_is_not_taken_for_risks_own_halt(risky):
    """Review 24 R6: risk's own halt is known by `by: risk`; a command (a notifier plugin's) could send that, and
    the next trading day would lift its halt as risk's."""
    risky.runtime.engine.risk.halt({"mode": "halted", "by": "risk", "command_id": 1})
    st = risky.runtime.gate.state()
    assert st["state"] == "halted" and st["by"] != "risk", st


def test_3f_a_carry_over_that_fails_is_said_and_risk_goes_on_checking_the_new_day(risky, monkeypatch):
    """The carry-over now shares the new day's transaction (3b). One that fails on something in the book (a bug, an
    odd row) must not keep the new day from being stored: risk would then fail every check of the day, and no loss
    limit would be watched. It is rolled back alone and said; the day goes on."""
    from host import risk_actions

    def broken(db):
        raise ValueError("an odd row (test)")
    monkeypatch.setattr(risk_actions, "carry_over", broken)
    _long(risky)
    _next_trading_day(risky)
    event = wait_for(lambda: next(iter(_events(risky, "risk_carry_over_failed")), None), timeout=5)
    assert "an odd row (test)" in event["message"]
    wait_for(lambda: _events(risky, "risk_new_day"))
    risky.tick("88")  # -1200 from yesterday's entry: the day's limit is still watched
    wait_for(lambda: _risk(risky)["breached"], timeout=5)


def _yesterday_up_1000_then_today_down_1100(h):
    _long(h)  # 100 @ 100
    h.tick("110")  # yesterday closes +1000 (open)
    wait_for(lambda: Decimal(str(_risk(h)["day_pnl"])) == Decimal("1000"), timeout=5)
    _next_trading_day(h)
    wait_for(lambda: _events(h, "risk_new_day"), timeout=5)
    h.tick("99")  # today: -1100 from yesterday's close, against a limit of -1000


def _raises(error):
    def fn(db):
        raise error
    return fn


def test_3g_with_the_carry_over_done_today_is_judged_from_yesterdays_close(risky):
    _yesterday_up_1000_then_today_down_1100(risky)
    wait_for(lambda: _risk(risky)["breached"], timeout=3)


@pytest.mark.parametrize("broken", ["carry_over", "rebase_limits"])
def test_3h_a_failed_carry_over_starts_todays_limit_from_the_pnl_at_the_start_of_the_day(risky, monkeypatch, broken):
    """Review 25 R1, R2: after a carry-over that failed (3f), today's limit was still judged on a PnL holding
    yesterday's +1000: a -1100 day showed -100 and entries went on. The day's limit now starts from the PnL the day
    began with, as an override does. And a failure in one strategy's limit rebase undid every position's carry-over:
    it now has a savepoint of its own."""
    from host import risk_actions
    if broken == "carry_over":
        monkeypatch.setattr(risk_actions, "carry_over", _raises(ValueError("an odd row (test)")))
    else:
        monkeypatch.setattr(risk_actions.protect, "rebase_limits", _raises(ArithmeticError("a bad limits row")))
    _yesterday_up_1000_then_today_down_1100(risky)
    assert _events(risky, "risk_carry_over_failed")
    wait_for(lambda: _risk(risky)["breached"], timeout=3)


def test_3i_a_lasting_database_error_in_the_carry_over_does_not_keep_the_day_from_beginning(risky, monkeypatch):
    """Review 25 R3: an error that looks passing (disk I/O) retried the whole new day on every beat, for ever: until
    the day was stored no check judged the PnL, and a -2000 day was never breached. The day now begins after a few
    tries, without the carry-over (said), its limit from the PnL it began with."""
    import sqlite3
    from host import risk_actions
    monkeypatch.setattr(risk_actions, "carry_over", _raises(sqlite3.OperationalError("disk I/O error")))
    _long(risky)
    _next_trading_day(risky)
    wait_for(lambda: _events(risky, "risk_carry_over_failed"), timeout=5)
    risky.tick("80")  # -2000 against -1000
    wait_for(lambda: _risk(risky)["breached"], timeout=5)


def test_3j_a_full_disk_in_the_carry_over_is_reported_as_a_full_disk(tmp_path, monkeypatch):
    """Review 25 R4: SQLite rolls the whole transaction back on a full disk; the savepoint's rollback then raised
    "no such savepoint", hiding the full disk from the storage (no reserve given up, no retry, /healthz unaware)."""
    from types import SimpleNamespace
    from host import risk_actions
    from host.risk_actions import RiskLoop
    from host.storage import StorageFull
    storage = Storage(tmp_path / "db.sqlite")
    storage.reserve.unlink(missing_ok=True)

    def fills_the_disk(db):
        pages = db.execute("pragma page_count").fetchone()[0]
        db.execute(f"pragma max_page_count = {pages + 1}")
        for _ in range(20):
            db.execute("insert into events (at, kind, severity, message) values ('x', 'x', 'info', "
                       "hex(randomblob(8000)))")
    monkeypatch.setattr(risk_actions, "carry_over", fills_the_disk)
    loop = SimpleNamespace(gate=None, _carry_failures=0)
    try:
        with pytest.raises(StorageFull):
            storage.write(lambda db: RiskLoop._begin_day(loop, db, None))
    finally:
        storage.close()



def test_1p_a_resume_override_the_restart_finds_undone_is_not_done_again_over_a_later_breach(risky):
    """Review 24 R4: a command was marked done in a write of its own, after its handler's. A death in between left
    the resume with override_breach pending, and the restart ran it again: by then a second breach had halted
    trading, and the old resume overrode it too, restarting the limit and making trading active. The state keeps
    the id of the command that set it; a command it already carries is not done again."""
    storage = risky.runtime.storage
    _long(risky)
    risky.tick("89")
    wait_for(lambda: risky.net() == 0 and _risk(risky)["state"] == "halted")
    r = risky.api("/api/halt", "POST", json={"mode": "active", "override_breach": True})
    assert r.status_code == 200, r.get_json()
    resume = risky.runtime.gate.state()["command"]
    _long(risky, strategy="after", qty=100, price="89")
    risky.tick("78")  # a second breach: -1100 from where the override started the limit again
    wait_for(lambda: risky.net("after") == 0 and _risk(risky)["state"] == "halted", timeout=5)
    overrides = len(_events(risky, "risk_override"))
    # as the restart finds it after a death between the resume's write and its done mark
    storage.write(lambda db: db.execute("update commands set status = 'pending', result = null, done_at = null "
                                        "where id = ?", (resume,)))
    risky.runtime.engine.wake()
    done = wait_for(lambda: (row := storage.one("select * from commands where id = ?", (resume,)))["status"] == "done"
                    and row, timeout=5)
    assert json.loads(done["result"])["ok"] is True, done
    assert _risk(risky)["state"] == "halted" and _risk(risky)["breach_overridden_by"] is None, _risk(risky)
    assert len(_events(risky, "risk_override")) == overrides
    assert risky.post(alert("ENTRY", "later", tradingsymbol="OTHER")).status_code == 423


def test_3k_a_clock_stepped_back_over_midnight_begins_no_day_again(risky):
    """Review 25 R5: any change of date began a new day, an earlier one too. A host restarted on a machine whose
    clock was a day behind until NTP set it (a VM restored, a bad RTC) carried over twice: today's realised loss was
    wiped from the day's PnL each time, and the limit no longer saw it. Only a later date begins a day."""
    _long(risky, qty=100, price="100")
    _next_trading_day(risky)
    wait_for(lambda: len(_events(risky, "risk_new_day")) == 1, timeout=5)
    risky.tick("95")
    r = risky.post(alert("EXIT", "s1", direction="SELL", qty=50, price="95"))
    assert r.status_code == 200, r.get_json()
    wait_for(lambda: risky.net() == 50)
    wait_for(lambda: Decimal(str(_risk(risky)["day_pnl"])) == Decimal("-500"), timeout=5)  # -250 realised, -250 open
    risky.runtime.clock_offset = timedelta(0)  # the clock steps back a day...
    time.sleep(0.6)  # (risk checks every 0.05 s)
    [said] = _events(risky, "risk_clock_behind")  # once, loudly: the trader checks the machine's clock
    assert "behind" in said["message"] and said["severity"] == "error", said
    _next_trading_day(risky, 10, 5)  # ...and NTP sets it right
    time.sleep(0.6)
    assert len(_events(risky, "risk_new_day")) == 1
    assert Decimal(str(_risk(risky)["day_pnl"])) == Decimal("-500")


def test_3l_a_new_day_that_could_not_begin_at_start_up_is_said(host_factory, monkeypatch):
    """Review of 1aa (tests/test_issue12_live.py): if the day cannot begin before the start-up read of the books (a
    full disk for a moment), risk's first check begins it after that read, and the day's trades made while the host
    was stopped are carried over with yesterday's. That was only logged; the trader is told."""
    from host.risk_actions import RiskLoop

    def fails(self):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(RiskLoop, "begin_day", fails)
    h = host_factory()
    [said] = [e for e in h.runtime.storage.rows("select * from events where kind = 'risk_day_not_begun'")]
    assert "No space left on device" in said["message"] and said["severity"] == "error", said
