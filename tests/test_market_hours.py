"""Market hours for entries: in live mode an ENTRY outside its exchange's session is refused with 423 and the
session times, unless ALLOW_AMO=true, which sends it as an after-market order; exits are never refused for the
hour (they go to the broker as they are, or as AMOs with ALLOW_AMO)."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest

from conftest import SYMBOL, alert, wait_for
from host.market import IST, MarketClock
from host.models import ExecutionType, Intent, OrderType, Product, Side
from host.risk import Limits, RiskGate
from host.storage import Storage
from test_issue12_live import live_settings

MONDAY_10 = datetime(2026, 11, 30, 10, 0, tzinfo=IST)    # NFO open
MONDAY_8 = datetime(2026, 11, 30, 8, 0, tzinfo=IST)      # before the open
SUNDAY_12 = datetime(2026, 11, 29, 12, 0, tzinfo=IST)    # no session
MONDAY_20 = datetime(2026, 11, 30, 20, 0, tzinfo=IST)    # NFO closed, MCX open


def _gate(tmp_path, now, **limits):
    gate = RiskGate(Storage(tmp_path / "h.sqlite"), Limits(market_hours=True, **limits),
                    MarketClock(frozenset({datetime(2026, 12, 1).date()})))
    gate.now = lambda: now.astimezone(timezone.utc)
    return gate


def _entry(exchange="NFO"):
    return Intent(exchange, SYMBOL, Side.BUY, 75, OrderType.LMT, Product.NRML, price=42, action=ExecutionType.ENTRY)


@pytest.mark.parametrize("now", [MONDAY_8, SUNDAY_12, MONDAY_20, datetime(2026, 12, 1, 10, 0, tzinfo=IST)])
def test_an_entry_outside_the_session_is_refused_with_the_session_times(tmp_path, now):
    why = _gate(tmp_path, now).refusal(False, "s1", _entry())
    assert why and "NFO is closed" in why and "09:15-15:30" in why and "ALLOW_AMO=true" in why
    assert _gate(tmp_path, now).refusal(True, "s1", _entry()) is None  # an exit or reduction: never for the hour


def test_inside_the_session_and_other_exchanges_sessions(tmp_path):
    assert _gate(tmp_path, MONDAY_10).refusal(False, "s1", _entry()) is None
    assert _gate(tmp_path, MONDAY_20).refusal(False, "s1", _entry("MCX")) is None   # MCX trades till 23:30
    assert _gate(tmp_path, MONDAY_8).after_market(_entry(), False) is None


def test_allow_amo_marks_the_entry_instead(tmp_path):
    gate = _gate(tmp_path, MONDAY_8, allow_amo=True)
    assert gate.refusal(False, "s1", _entry()) is None
    assert "after-market order" in gate.after_market(_entry(), False)
    assert gate.after_market(_entry(), True) is None


def test_paper_mode_has_no_market_hours(tmp_path):
    from conftest import make_settings
    assert Limits.from_settings(make_settings(tmp_path)).market_hours is False
    assert Limits.from_settings(live_settings_like(tmp_path)).market_hours is True


def live_settings_like(tmp_path):
    from conftest import make_settings
    return make_settings(tmp_path, BROKER="shoonya", SHOONYA_AUTH="token", USER_ID="U", SHOONYA_ACCESS_TOKEN="t")


@pytest.fixture
def live_at(sim, tmp_path):
    """A logged-in live host on the simulator whose clock reads `when` (Asia/Kolkata)."""
    from conftest import Host
    hosts = []

    def make(when, **env):
        h = Host(live_settings(sim, tmp_path / f"var{len(hosts)}", **env), broker_timeout_s=1.0, market_hours=True)
        hosts.append(h)
        h.runtime.clock_offset = when.astimezone(timezone.utc) - datetime.now(timezone.utc)
        h.start()
        sim.sim.engine.set_ltp("NFO", SYMBOL, Decimal("42.5"))
        wait_for(lambda: not h.api("/api/risk").get_json().get("blind"), timeout=5)  # positions read: not blind
        return h
    yield make
    for h in hosts:
        h.stop()


def test_live_entry_when_closed_is_a_423_and_the_exit_still_goes(live_at, sim):
    h = live_at(MONDAY_10)
    assert h.post(alert(direction="BUY", qty=75, price="43", alert_id="in")).status_code == 200
    wait_for(lambda: h.net() == 75, timeout=5)
    h.runtime.clock_offset = SUNDAY_12.astimezone(timezone.utc) - datetime.now(timezone.utc)
    r = h.post(alert(strategy="s2", direction="BUY", qty=75, price="43", alert_id="late"))
    assert r.status_code == 423 and "NFO is closed" in r.get_json()["reason"] and "09:15-15:30" in r.get_json()["reason"]
    r = h.post(alert("EXIT", direction="SELL", qty=75, order_type="LMT", price="42", alert_id="out"))
    assert r.status_code == 200, r.get_json()  # the exit is sent (the simulator, like a broker in session, fills it)
    wait_for(lambda: h.net() == 0, timeout=5)
    assert sim.sim.amo_orders == set()


def test_live_allow_amo_sends_the_entry_as_an_after_market_order(live_at, sim):
    h = live_at(MONDAY_8, ALLOW_AMO="true")
    r = h.post(alert(direction="BUY", qty=75, price="43", alert_id="amo"))
    assert r.status_code == 200, r.get_json()
    assert "after-market order" in h.api("/api/alerts").get_json()["items"][0]["reason"]
    oid = r.get_json()["orders"][0]["id"]
    placed = wait_for(lambda: [o for o in sim.sim.engine.order_book() if o.remarks == oid], timeout=5)
    # the simulator books the order, then notes it as AMO: the book can show it a moment before the note
    wait_for(lambda: placed[0].broker_order_id in sim.sim.amo_orders, timeout=5)
