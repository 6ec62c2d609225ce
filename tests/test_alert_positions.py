"""alert_positions.plan on its own: where nothing happened outside the alerts (the belief is the strategy's own
position), no ADJUST is ever cut; where something did, the position moves only in the ADJUST's direction, never
past what TradingView now believes. Hypothesis draws the positions and the legs."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from host import alert_positions
from host.models import ExecutionType, Intent, OrderType, Product, Side
from host.storage import Storage

SYMBOL = "NIFTY28APR26C24500"


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """One database for every example: each runs in a transaction that is rolled back."""
    s = Storage(tmp_path_factory.mktemp("plan") / "plan.sqlite")
    yield s
    s.close()


def _leg(signed: int, action: ExecutionType = ExecutionType.ADJUST) -> Intent:
    return Intent("NFO", SYMBOL, Side.BUY if signed > 0 else Side.SELL, abs(signed), OrderType.MKT, Product.NRML,
                  action=action)


def _run(storage: Storage, held: int, believed: int | None, legs: list[int]) -> alert_positions.Plan:
    def run(db):
        db.execute("delete from positions")
        db.execute("delete from alert_positions")
        if held:
            db.execute("insert into positions (strategy, exchange, symbol, product, net_qty, avg_price, realized_pnl, "
                       "updated_at) values ('s1', 'NFO', ?, 'M', ?, '42.5', '0', '')", (SYMBOL, held))
        if believed is not None:
            db.execute("insert into alert_positions values ('s1', 'NFO', ?, ?, '')", (SYMBOL, believed))
        out = alert_positions.plan(db, "s1", [_leg(n) for n in legs])
        raise _Rollback(out)
    try:
        storage.write(run)
    except _Rollback as r:
        return r.plan
    raise AssertionError("unreachable")


class _Rollback(Exception):
    def __init__(self, plan: alert_positions.Plan):
        self.plan = plan


quantities = st.integers(-600, 600).filter(lambda n: n != 0).map(lambda n: n * 25)


@settings(max_examples=150, deadline=None)
@given(held=st.integers(-600, 600).map(lambda n: n * 25), legs=st.lists(quantities, min_size=1, max_size=3),
       known=st.booleans())
def test_nothing_outside_means_no_adjust_is_cut(storage, held, legs, known):
    p = _run(storage, held,
             held if known else None, legs)
    assert [i.side.sign * i.qty for i in p.intents] == legs and p.notes == []
    assert p.believed == {("NFO", SYMBOL): held + sum(legs)}


@settings(max_examples=300, deadline=None)
@given(held=st.integers(-600, 600).map(lambda n: n * 25), believed=st.integers(-600, 600).map(lambda n: n * 25),
       d=quantities)
def test_an_adjust_is_never_turned_around_nor_grown_and_never_passes_the_belief(storage, held, believed, d):
    p = _run(storage, held, believed,
             [d])
    [s] = [i.side.sign * i.qty for i in p.intents] or [0]
    target = believed + d
    assert s == 0 or ((s > 0) == (d > 0) and abs(s) <= abs(d)), (held, believed, d, s)  # never turned nor grown
    if not believed or (believed > 0) == (d > 0):
        assert s == d, (held, believed, d, s)  # an ADJUST that adds is sent whole
    else:  # a reduction: towards the belief's new value, never past it, as far as the ADJUST allows
        assert s == 0 or (target - (held + s)) * d >= 0, (held, believed, d, s)
        assert s == d or held + s == target or (target - held) * d <= 0, (held, believed, d, s)
    assert bool(p.notes) == (s != d)
    assert p.believed == {("NFO", SYMBOL): target}


def test_legs_of_one_alert_count_what_the_legs_before_them_send(storage):
    """Held 0, believed -25 (a short of 25 closed in the app): +25 is the cover TradingView means (nothing to send),
    the second +25 opens a long of 25."""
    p = _run(storage, 0, -25, [25, 25])
    assert [i.side.sign * i.qty for i in p.intents] == [25] and len(p.notes) == 1 and "cut to 0" in p.notes[0]
    p = _run(storage, 75, 75, [75, -75])  # nothing outside: both sent whole, in order
    assert [i.side.sign * i.qty for i in p.intents] == [75, -75] and p.notes == []


def _decide(storage: Storage, intents: list[Intent], key: str, accepted: bool) -> None:
    def run(db):
        alert_positions.store(db, "s1", alert_positions.plan(db, "s1", intents, key), accepted)
    storage.write(run)


def _believed(storage: Storage) -> int:
    return storage.one("select believed from alert_positions where strategy = 's1' and symbol = ?",
                       (SYMBOL,))["believed"]


def test_a_rejected_exit_sent_again_after_tradingview_reversed_keeps_the_reversal(storage):
    """Found from outside: the resend took back the first try's move as a delta, but an EXIT's depends on where it
    started: TradingView's -75 after a reversal became 0, and its next cover would have opened a long."""
    def clear(db):
        db.execute("delete from alert_positions")
        db.execute("delete from alert_moves")
        alert_positions.set_beliefs(db, "s1", {("NFO", SYMBOL): 75})
    storage.write(clear)
    _decide(storage, [_leg(-75, ExecutionType.EXIT)], "x", accepted=False)  # TradingView 0 (rejected)
    _decide(storage, [_leg(-75)], "s", accepted=True)  # TradingView -75
    assert _believed(storage) == -75
    _decide(storage, [_leg(-75, ExecutionType.EXIT)], "x", accepted=True)  # sent again by hand
    assert _believed(storage) == -75


def test_a_database_at_schema_14_gains_the_moves_table(tmp_path):
    """Found from outside: alert_moves was added to migration 14 after databases had been made by it; a database
    at 14 without it was refused as changed outside the host. It is migration 15's now."""
    import sqlite_utils

    from host.storage import MIGRATIONS
    path = tmp_path / "v14.sqlite"
    db = sqlite_utils.Database(path)
    for m in MIGRATIONS[:14]:
        m(db)
    db.execute("drop table if exists alert_moves")  # as those commits' migration 14 left it... before it had it
    db.execute("PRAGMA user_version = 14")
    db.close()
    s = Storage(path)
    try:
        assert "alert_moves" in s.db.table_names() and "alert_positions" in s.db.table_names()
    finally:
        s.close()
