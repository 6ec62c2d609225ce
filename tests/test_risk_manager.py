"""The risk manager alone, driven with an injected clock and price path."""
from __future__ import annotations

from datetime import date, datetime, time, timedelta
from decimal import Decimal as D

import pytest

from host.market import IST, MarketClock
from host.models import ExecutionType, Intent, OrderType, Product, Side, TradingState
from host.risk import DAY_KEY, Limits, RiskGate, RiskManager, trailing_limit, warning_level
from host.storage import Storage

MON = date(2026, 11, 23)  # a Monday


def at(d: date, hh: int = 10, mm: int = 0) -> datetime:
    return datetime.combine(d, time(hh, mm), IST)


@pytest.fixture
def storage(tmp_path):
    return Storage(tmp_path / "risk.sqlite")


def manager(storage, holidays=(), **kw):
    limits = Limits(**{"base": D("-2000"), "step": D("100"), "threshold": D("0.8"), "max_consecutive": 3,
                       "status_every_min": 0, "square_off": None, **kw})
    return RiskManager(storage, limits, MarketClock(frozenset(holidays)))


def kinds(actions):
    return [a.kind for a in actions]


def test_the_trail_example_base_minus_2000_step_100_peak_1250_gives_minus_800():
    assert trailing_limit(D("-2000"), D("100"), D("1250")) == D("-800")
    assert trailing_limit(D("-2000"), D("0"), D("1250")) == D("-2000")      # no trailing
    assert trailing_limit(D("-2000"), D("100"), D("-300")) == D("-2000")    # never below base
    assert trailing_limit(D("-500"), D("100"), D("1250")) == D("700")       # locks in profit


def test_the_limit_only_rises_as_the_peak_moves(storage):
    m = manager(storage)
    for pnl in ("0", "600", "1250", "400"):
        m.check(at(MON), D(pnl))
    day = m.load_day(MON)
    assert (day.peak, day.limit) == (D("1250"), D("-800"))


def test_a_warning_goes_out_once_per_limit_level(storage):
    m = manager(storage)
    assert warning_level(D("-2000"), D("-2000"), D("0.8")) == D("-1600")
    path = ["-1000", "-1650", "-1700", "-1500", "-1620"]
    warnings = [k for p in path for k in kinds(m.check(at(MON), D(p))) if k == "warning"]
    assert warnings == ["warning"]
    # the limit rises to -1900 after a peak of 100: a new level, so one more warning near it
    m.check(at(MON), D("100"))
    assert kinds(m.check(at(MON), D("-1550"))) == ["warning"]


def test_a_breach_is_recorded_once_and_survives_a_restart(storage, tmp_path):
    m = manager(storage)
    assert "breach" in kinds(m.check(at(MON), D("-2000")))
    assert "breach" not in kinds(m.check(at(MON), D("-2500")))
    again = manager(Storage(tmp_path / "risk.sqlite"))
    day = again.load_day(MON)
    assert day.breached and day.breached_at
    assert storage.one("select breached from risk_days where day = ?", (MON.isoformat(),))["breached"] == 1


def test_positions_after_a_breach_are_a_violation(storage):
    m = manager(storage)
    m.check(at(MON), D("-2100"))
    assert kinds(m.check(at(MON), D("-2100"), exposed=True)) == ["violation"]
    assert kinds(m.check(at(MON), D("-2100"), exposed=False)) == []


def test_three_breach_days_give_a_cooldown_that_survives_restart_on_day_four(storage, tmp_path):
    m = manager(storage)
    for i in range(3):
        day = MON + timedelta(days=i)
        m.check(at(day, 9, 30), D("0"))
        actions = m.check(at(day, 11), D("-2500"))
    assert "cooldown" in kinds(actions)
    thursday = MON + timedelta(days=3)
    fresh = manager(Storage(tmp_path / "risk.sqlite"))  # a restart on day four
    assert fresh.streak(thursday) == 3
    assert fresh.cooldown_until(thursday) == MON + timedelta(days=7)  # next week's first trading day
    gate = RiskGate(Storage(tmp_path / "risk.sqlite"), fresh.limits, fresh.clock)
    gate.now = lambda: at(thursday)
    assert "cooldown: entries are refused until 2026-11-30" in gate.refusal(reducing=False)
    assert gate.refusal(reducing=True) is None  # exits still allowed
    gate.now = lambda: at(MON + timedelta(days=7))
    assert gate.refusal(reducing=False) is None


def test_a_weekend_and_a_holiday_do_not_break_a_streak(storage):
    friday, holiday_tue = MON + timedelta(days=4), MON + timedelta(days=8)
    m = manager(storage, holidays=[holiday_tue])
    for day in (friday, MON + timedelta(days=7), MON + timedelta(days=9)):  # Fri, Mon, (Tue off), Wed
        m.check(at(day, 9, 30), D("0"))
        m.check(at(day, 11), D("-2500"))
    wednesday = MON + timedelta(days=9)
    assert m.streak(wednesday) == 3
    assert m.cooldown_until(wednesday) == MON + timedelta(days=14)


def test_a_clean_day_breaks_the_streak(storage):
    m = manager(storage)
    for i, pnl in enumerate(["-2500", "-2500", "-100", "-2500"]):
        day = MON + timedelta(days=i)
        m.check(at(day, 9, 30), D("0"))
        m.check(at(day, 11), D(pnl))
    m.check(at(MON + timedelta(days=4), 9, 30), D("0"))
    assert m.streak(MON + timedelta(days=4)) == 1
    assert m.cooldown_until(MON + timedelta(days=4)) is None


def test_the_breach_halt_ends_on_the_next_trading_day_not_on_a_weekend(storage):
    m = manager(storage)
    friday = MON + timedelta(days=4)
    gate = RiskGate(storage, m.limits, m.clock)
    m.check(at(friday), D("-2500"))
    storage.write(lambda db: gate.set_state(db, TradingState.HALTED, "breach", "risk"))
    assert "resume" not in kinds(m.check(at(friday + timedelta(days=1)), D("0")))  # Saturday
    actions = m.check(at(friday + timedelta(days=3)), D("0"))  # Monday
    assert kinds(actions) == ["new_day", "resume"]


def test_a_manual_halt_is_not_lifted_by_a_new_day(storage):
    m = manager(storage)
    gate = RiskGate(storage, m.limits, m.clock)
    m.check(at(MON), D("0"))
    storage.write(lambda db: gate.set_state(db, TradingState.HALTED, "my call", "api"))
    assert "resume" not in kinds(m.check(at(MON + timedelta(days=1)), D("0")))


def test_a_blind_broker_refuses_entries_keeps_the_last_pnl_and_says_so_once(storage):
    m = manager(storage)
    m.check(at(MON), D("-300"))
    assert kinds(m.check(at(MON), None, "Unreachable: connection refused")) == ["blind"]
    assert kinds(m.check(at(MON), None, "Unreachable: connection refused")) == []
    assert m.load_day(MON).last_pnl == D("-300")
    gate = RiskGate(storage, m.limits, m.clock)
    gate.now = lambda: at(MON)
    assert "risk is blind" in gate.refusal(reducing=False)
    assert kinds(m.check(at(MON), D("-350"))) == ["sighted"]
    assert gate.refusal(reducing=False) is None


def test_a_corrupt_day_record_fails_closed_and_never_clears_a_breach(storage):
    m = manager(storage)
    m.check(at(MON), D("-2500"))
    storage.write(lambda db: Storage.put_state(db, DAY_KEY, '{"day": "2026-11-23", "limit": "garbage'))
    assert kinds(m.check(at(MON), D("0"))) == ["fail_closed"]
    gate = RiskGate(storage, m.limits, m.clock)
    gate.now = lambda: at(MON)
    assert "unreadable" in gate.refusal(reducing=False)
    m.repair(MON)  # what an explicit resume does
    assert m.load_day(MON).breached  # the breach recorded in risk_days is kept


def test_a_corrupt_risk_days_row_fails_closed(storage):
    m = manager(storage)
    storage.write(lambda db: db.execute("insert into risk_days (day, breached) values ('2026-11-20', 7)"))
    gate = RiskGate(storage, m.limits, m.clock)
    gate.now = lambda: at(MON)
    assert "unreadable" in gate.refusal(reducing=False)


def test_a_corrupt_trading_state_fails_closed_to_reduce_only(storage):
    storage.write(lambda db: Storage.put_state(db, "trading_state", "{not json"))
    gate = RiskGate(storage, Limits(), MarketClock())
    assert gate.trading_state is TradingState.REDUCE_ONLY
    assert "reduce_only" in gate.refusal(reducing=False)


def test_square_off_fires_once_on_a_trading_day_after_its_time(storage):
    m = manager(storage, square_off=time(15, 15))
    assert "square_off" not in kinds(m.check(at(MON, 15, 14), D("0")))
    assert "square_off" in kinds(m.check(at(MON, 15, 15), D("0")))
    assert "square_off" not in kinds(m.check(at(MON, 15, 20), D("0")))
    saturday = MON + timedelta(days=5)
    assert "square_off" not in kinds(m.check(at(saturday, 16), D("0")))


def test_a_strategy_over_its_own_max_loss_is_stopped_for_the_day(storage):
    m = manager(storage, strategy_max_loss=D("-500"))
    actions = m.check(at(MON), D("-600"), strategy_pnl={"a": D("-600"), "b": D("0")})
    assert [(a.kind, a.data.get("strategy")) for a in actions] == [("strategy_breach", "a")]
    gate = RiskGate(storage, m.limits, m.clock)
    gate.now = lambda: at(MON)
    assert "hit its max loss" in gate.refusal(False, "a")
    assert gate.refusal(False, "b") is None


def test_per_strategy_order_and_quantity_limits(storage):
    gate = RiskGate(storage, Limits(max_orders_per_day=2, max_qty_per_order=100, max_qty_per_symbol=150), MarketClock())
    intent = Intent("NFO", "X", Side.BUY, 120, OrderType.MKT, Product.NRML, action=ExecutionType.ENTRY)
    refuse = lambda i, params=None: storage.write(lambda db: gate.refusal(False, "s", i, db, params))  # noqa: E731
    assert "over the max of 100 per order" in refuse(intent)
    assert refuse(intent, {"max_qty_per_order": 200}) is None  # the strategy's params win
    from host.orders import insert_order
    small = Intent("NFO", "X", Side.BUY, 80, OrderType.LMT, Product.NRML, D("1"), action=ExecutionType.ENTRY)
    storage.write(lambda db: insert_order(db, small, "s", None))
    assert "would exceed the max of 150 per symbol" in refuse(small)
    storage.write(lambda db: insert_order(db, small, "s", None))
    other = Intent("NFO", "Y", Side.BUY, 1, OrderType.LMT, Product.NRML, D("1"), action=ExecutionType.ENTRY)
    assert "reached its max of 2 orders today" in refuse(other)


def test_sessions_are_in_asia_kolkata_whatever_the_machine_zone():
    clock = MarketClock(frozenset({MON + timedelta(days=1)}))
    from datetime import timezone
    assert clock.is_open("NFO", at(MON, 9, 15)) and not clock.is_open("NFO", at(MON, 15, 30))
    assert clock.is_open("MCX", at(MON, 23, 0)) and not clock.is_open("NSE", at(MON, 23, 0))
    assert not clock.is_open("NSE", at(MON + timedelta(days=1), 10))      # a holiday
    assert not clock.is_open("NSE", at(MON + timedelta(days=5), 10))      # Saturday
    # 20:00 UTC on Monday is already Tuesday 01:30 in Asia/Kolkata
    assert clock.day(datetime(2026, 11, 23, 20, 0, tzinfo=timezone.utc)) == MON + timedelta(days=1)
