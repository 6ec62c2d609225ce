"""Reads made for every alert whose cost must not grow with what piles up: the loss-streak cooldown the risk gate
checks on every entry (the same answer as ever, at a cost that does not grow with the trading days recorded, one
risk_days row a day for as long as the host runs), and a strategy's book (its open positions, not every
instrument it closed today)."""
from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal as D
from typing import Optional

import pytest
from hypothesis import given, settings, strategies as st

from host.market import MarketClock
from host.risk import Limits, RiskManager
from host.storage import Storage

MON = date(2026, 11, 23)  # a Monday


def reference_cooldown(days: dict[date, bool], today: date, n: int, cooldown_days: int,
                       clock: MarketClock) -> Optional[date]:
    """The cooldown as it was computed before (every trading day walked from the first breach to today)."""
    if n <= 0:
        return None
    breached = sorted(d for d, b in days.items() if b and d <= today)
    if not breached:
        return None
    until, run, d = None, 0, breached[0]
    while d <= today:
        run = run + 1 if days.get(d) else 0
        if run >= n:
            end = clock.first_trading_day_of_next_week(d)
            if cooldown_days:
                end = d
                for _ in range(cooldown_days + 1):
                    end = clock.next_trading_day(end)
            until = max(until or end, end)
        d = clock.next_trading_day(d)
    return until if until and today < until else None


def record(storage: Storage, days: dict[date, bool]) -> None:
    storage.write(lambda db: db.conn.executemany(
        "insert into risk_days (day, breached, final_pnl, peak_pnl, limit_at_end, updated_at) values "
        "(?, ?, '0', '0', '-2000', '')", [(d.isoformat(), int(b)) for d, b in days.items()]))


SPAN = 45
day_marks = st.lists(st.sampled_from((None, False, True, True, True)), min_size=SPAN, max_size=SPAN)  # absent, clean
# or breached: mostly breached, so that streaks (across weekends and holidays, broken by a clean day) are common
holidays = st.sets(st.integers(0, SPAN + 15), max_size=6)


@settings(max_examples=300, deadline=None)
@given(marks=day_marks, off=holidays, n=st.integers(1, 4), cooldown_days=st.integers(0, 3),
       today_at=st.integers(0, SPAN + 15))
def test_the_cooldown_is_what_walking_every_day_gave(tmp_path_factory, marks, off, n, cooldown_days, today_at):
    """Any history (weekends, holidays, breaches recorded on a closed day, clean days between): the same day."""
    start = MON - timedelta(days=SPAN // 2)
    days = {start + timedelta(days=k): b for k, b in enumerate(marks) if b is not None}
    clock = MarketClock(frozenset(start + timedelta(days=k) for k in off))
    storage = Storage(tmp_path_factory.mktemp("cooldown") / "risk.sqlite")
    record(storage, days)
    m = RiskManager(storage, Limits(base=D("-2000"), max_consecutive=n, cooldown_days=cooldown_days), clock)
    today = start + timedelta(days=today_at)
    assert m.cooldown_until(today) == reference_cooldown(days, today, n, cooldown_days, clock)
    assert storage.write(lambda db: m.cooldown_until(today, db)) == m.cooldown_until(today)
    assert m.streak(today) == reference_streak(days, today, clock)


def reference_streak(days: dict[date, bool], upto: date, clock: MarketClock) -> int:
    """The streak as it was counted before (on every day recorded)."""
    d = upto if days.get(upto) else clock.previous_trading_day(upto)
    n = 0
    while days.get(d):
        n += 1
        d = clock.previous_trading_day(d)
    return n


def steps_of(storage: Storage, fn) -> int:
    """SQLite's virtual machine steps while fn runs on the write connection: a count of the work, not a time."""
    counted = [0]

    def count() -> int:
        counted[0] += 1
        return 0
    storage.conn.set_progress_handler(count, 1)
    try:
        storage.write(fn)
    finally:
        storage.conn.set_progress_handler(None, 1)
    return counted[0]


def test_two_years_of_clean_days_cost_the_gate_no_more_than_one_week(tmp_path):
    """A breach streak long ago, then two years of trading: every entry's check reads the breached days only.
    (It read and walked every day recorded since the first breach: 50 times the work after two years.)"""
    clock = MarketClock()
    limits = Limits(base=D("-2000"), max_consecutive=3)
    long_ago = [MON - timedelta(days=800 + k) for k in range(3)]

    def history(clean_days: int) -> Storage:
        storage = Storage(tmp_path / f"risk{clean_days}.sqlite")
        days = {d: True for d in long_ago}
        d = MON
        while len(days) < clean_days + len(long_ago):
            d -= timedelta(days=1)
            if clock.is_trading_day(d):
                days[d] = False
        record(storage, days)
        return storage
    week, two_years = history(5), history(500)
    cost = [steps_of(s, lambda db, s=s: RiskManager(s, limits, clock).cooldown_until(MON, db))
            for s in (week, two_years)]
    assert RiskManager(two_years, limits, clock).cooldown_until(MON) is None  # the old streak's cooldown is over
    assert cost[1] <= cost[0] + 10, cost


def test_a_database_at_schema_15_gains_the_index_and_keeps_its_days(tmp_path):
    """An existing database (migration 15) upgrades: its breach days are found through the new index."""
    import sqlite_utils

    from host.storage import MIGRATIONS
    path = tmp_path / "v15.sqlite"
    db = sqlite_utils.Database(path)
    for m in MIGRATIONS[:15]:
        m(db)
    db.execute("PRAGMA user_version = 15")
    db.conn.executemany("insert into risk_days (day, breached) values (?, ?)",
                        [((MON + timedelta(days=k)).isoformat(), 1) for k in range(3)])
    db.conn.commit()
    db.close()
    storage = Storage(path)
    try:
        plan = storage.conn.execute("explain query plan select day, breached from risk_days where breached is not 0")
        assert "idx_risk_days_breached" in " ".join(str(r) for r in plan.fetchall())
        m = RiskManager(storage, Limits(base=D("-2000"), max_consecutive=3), MarketClock())
        assert m.cooldown_until(MON + timedelta(days=3)) == MON + timedelta(days=7)
    finally:
        storage.close()


def test_a_strategys_book_reads_its_open_positions_not_the_hundreds_it_closed_today(tmp_path):
    """A strategy rotating strikes closes hundreds of instruments in a day (their rows stay, at 0, until the next
    day begins). Its book, read for every alert it sends, costs what it did with none closed."""
    from host.decide import load_book
    from host.models import Product

    def day_with(closed: int) -> Storage:
        storage = Storage(tmp_path / f"closed{closed}.sqlite")
        rows = [("s1", "NFO", f"NIFTY{k:05d}CE", "M", 0 if k else 75, "42.5", "0", "") for k in range(closed + 1)]
        storage.write(lambda db: db.conn.executemany(
            "insert into positions (strategy, exchange, symbol, product, net_qty, avg_price, realized_pnl, "
            "updated_at) values (?, ?, ?, ?, ?, ?, ?, ?)", rows))
        return storage
    few, many = day_with(3), day_with(800)
    for storage in (few, many):
        assert dict(load_book(storage.db, "s1").positions) == {("NFO", "NIFTY00000CE", Product.NRML): 75}
    cost = [steps_of(s, lambda db: load_book(db, "s1")) for s in (few, many)]
    assert cost[1] <= cost[0] + 10, cost


# ---- found from outside: what the partial indexes must not change ----

def test_an_unreadable_clean_day_still_fails_closed(tmp_path):
    """A clean day's row is not read for the cooldown, but one whose day cannot be read is, as before: entries are
    refused until it is checked (a date SQLite does not take for one, '20261119', counts as unreadable too)."""
    from host.risk import RiskGate
    for bad in ("2026-11-2x", "20261119", "2026-11-19 10:00"):
        storage = Storage(tmp_path / f"bad{bad[-2:]}.sqlite")
        storage.write(lambda db: db.execute("insert into risk_days (day, breached) values (?, 0)", (bad,)))
        gate = RiskGate(storage, Limits(base=D("-2000"), max_consecutive=3), MarketClock())
        assert "risk state is unreadable" in (gate.refusal(False) or ""), bad
        storage.close()


def test_a_risk_index_left_behind_its_table_is_refused_at_the_start_with_what_to_do(tmp_path):
    """A copy of the file taken mid-write can leave an index behind its table (PRAGMA quick_check does not look):
    the cooldown read through it would miss the streak. The start is refused, saying to REINDEX."""
    import sqlite3

    import pytest

    from host.storage import DatabaseUnusable, stale_indexes
    path = tmp_path / "db.sqlite"
    Storage(path).close()

    def edit(*sql: str) -> None:
        c = sqlite3.connect(path, isolation_level=None)
        for q in sql:
            c.execute(q)
        c.close()
    flip = "update sqlite_master set sql = replace(sql, '{}', '{}') where name = 'idx_risk_days_breached'"
    edit("PRAGMA writable_schema=ON", flip.format("breached is not 0", "breached is not 1"))  # rows it then misses
    edit(*[f"insert into risk_days (day, breached) values ('2026-11-2{k}', 1)" for k in (3, 4, 5)],
         "PRAGMA writable_schema=ON", flip.format("breached is not 1", "breached is not 0"))
    with pytest.raises(DatabaseUnusable, match="REINDEX idx_risk_days_breached"):
        Storage(path)
    edit("REINDEX idx_risk_days_breached")  # what the words say to do
    assert stale_indexes(sqlite3.connect(path)) == []
    storage = Storage(path)
    m = RiskManager(storage, Limits(base=D("-2000"), max_consecutive=3), MarketClock())
    assert m.cooldown_until(date(2026, 11, 26)) == date(2026, 11, 30)
    storage.close()


def test_a_risk_index_made_by_hand_on_other_rows_is_refused_with_the_statement_that_makes_it(tmp_path):
    import sqlite3

    import pytest

    from host.storage import DatabaseUnusable
    path = tmp_path / "db.sqlite"
    Storage(path).close()
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("drop index idx_positions_open")
    c.execute("create index idx_positions_open on positions (strategy) where net_qty > 0")  # longs only
    c.close()
    with pytest.raises(DatabaseUnusable) as refused:
        Storage(path)
    assert "create index idx_positions_open on positions (strategy) where net_qty != 0" in str(refused.value)


def test_a_worker_starting_while_another_fills_orders_is_not_refused_for_a_stale_index(tmp_path):
    """The index and its table are read on one snapshot: a fill another worker commits between the two reads is
    not taken for an index left behind (it would refuse a worker's start on a busy host)."""
    import sqlite3

    from host.storage import stale_indexes
    path = tmp_path / "db.sqlite"
    Storage(path).close()
    other = sqlite3.connect(path, isolation_level=None)
    n = iter(range(10_000))

    class Rows(list):
        def fetchall(self) -> list:
            return list(self)

    class Busy:
        """A connection after each of whose statements another worker commits a new open position."""

        def __init__(self, conn: sqlite3.Connection):
            self.conn = conn

        @property
        def in_transaction(self) -> bool:
            return self.conn.in_transaction

        def execute(self, sql: str, *args) -> Rows:
            rows = Rows(self.conn.execute(sql, *args).fetchall())
            other.execute("insert into positions (strategy, exchange, symbol, product, net_qty) values "
                          "('s1', 'NFO', ?, 'M', 75)", (f"SYM{next(n)}",))
            return rows
    checked = Busy(sqlite3.connect(path, isolation_level=None))
    assert stale_indexes(checked) == []


def test_an_index_whose_keys_are_behind_its_table_is_refused(tmp_path):
    """Found from outside: the same rows, filed under other keys (a row id reused by another strategy's position,
    an index page copied from before). Read through the index, s1's book was flat while s1 held 75."""
    import sqlite3

    import pytest

    from host.storage import DatabaseUnusable
    path = tmp_path / "db.sqlite"
    Storage(path).close()
    c = sqlite3.connect(path, isolation_level=None)
    for sql in ("insert into positions (strategy, exchange, symbol, product, net_qty) values ('s1','NFO','A','M',75)",
                "drop index idx_positions_open",
                "create index idx_positions_open on positions (product) where net_qty != 0",  # keys 'M', not 's1'
                "PRAGMA writable_schema=ON",
                "update sqlite_master set sql = replace(sql, '(product)', '(strategy)') "
                "where name = 'idx_positions_open'"):
        c.execute(sql)
    c.close()
    with pytest.raises(DatabaseUnusable, match="REINDEX idx_positions_open"):
        Storage(path)


def test_a_database_migrated_by_the_first_migration_16_starts_and_gets_the_index_again(tmp_path):
    """Found from outside: migration 16 first made the breach index without the rows that cannot say a date. A
    database migrated then (schema 16 or 17) starts, and migration 18 makes the index as it is now."""
    import sqlite_utils

    from host.storage import BREACH_ROWS, MIGRATIONS
    path = tmp_path / "v17.sqlite"
    db = sqlite_utils.Database(path)
    for m in MIGRATIONS[:17]:
        m(db)
    db.execute("PRAGMA user_version = 17")
    db.conn.execute("insert into risk_days (day, breached) values ('2026-11-2x', 0)")
    db.conn.commit()
    db.close()
    storage = Storage(path)
    try:
        made = storage.conn.execute("select sql from sqlite_master where name = 'idx_risk_days_breached'").fetchone()
        assert made[0].endswith(f"where {BREACH_ROWS}") and storage.schema_version == len(MIGRATIONS)
        m = RiskManager(storage, Limits(base=D("-2000"), max_consecutive=3), MarketClock())
        with pytest.raises(Exception, match="unreadable"):
            m.cooldown_until(MON)  # the unreadable clean day is read through the new index: it fails closed
    finally:
        storage.close()


def test_a_newer_schema_is_said_to_be_newer_before_its_indexes_are_judged(tmp_path):
    """Found from outside: a database a newer host migrated (and redefined an index in) is "run the newer
    version", not "drop the index and make it as this older host does"."""
    import sqlite3

    from host.storage import DatabaseUnusable
    path = tmp_path / "db.sqlite"
    Storage(path).close()
    c = sqlite3.connect(path, isolation_level=None)
    for sql in ("drop index idx_positions_open",
                "create index idx_positions_open on positions (strategy, symbol) where net_qty != 0 and product != 'X'",
                "PRAGMA user_version=99"):
        c.execute(sql)
    c.close()
    with pytest.raises(DatabaseUnusable, match="newer strategy-host"):
        Storage(path)
