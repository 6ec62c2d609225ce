"""The risk gate's check of an entry after years of trading: it must cost what it cost in the first week.

Usage: python bench/risk_history.py [--reps N] [--short]
Risk keeps one risk_days row per trading day, for as long as the host runs. Each entry's check asks whether a loss
streak's cooldown is on. This times that check (RiskGate.refusal, inside a deciding transaction, as the engine
makes it) on databases holding a week, one year and two years of trading days, each after a loss streak of three
days long ago, and prints each against the week's (flat: about 1).
--short: 50 repetitions, for CI (it checks that the bench runs, not how fast).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from host.market import MarketClock  # noqa: E402
from host.models import ExecutionType, Intent, OrderType, Product, Side  # noqa: E402
from host.risk import RiskGate  # noqa: E402
from host.storage import Storage  # noqa: E402

TODAY = date(2026, 12, 2)
ENTRY = Intent("NFO", "NIFTY28APR26C24500", Side.BUY, 75, OrderType.LMT, Product.NRML, None, None,
               action=ExecutionType.ENTRY)


def database(where: Path, trading_days: int) -> Storage:
    """A host database with `trading_days` clean days recorded, after a streak of three breached days before them."""
    storage = Storage(where / f"days{trading_days}.sqlite")
    clock = MarketClock()
    days, d = [], TODAY
    while len(days) < trading_days + 3:
        d -= timedelta(days=1)
        if clock.is_trading_day(d):
            days.append((d.isoformat(), int(len(days) >= trading_days)))  # the oldest three breached
    storage.write(lambda db: db.conn.executemany(
        "insert into risk_days (day, breached, final_pnl, peak_pnl, limit_at_end, updated_at) values "
        "(?, ?, '0', '0', '-5000', '')", days))
    return storage


def per_check(storage: Storage, reps: int) -> float:
    """Seconds per entry check, the transaction's own cost taken off (best of 5 rounds)."""
    gate = RiskGate(storage)
    gate.now = lambda: datetime_at_noon()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            refusal = storage.write(lambda db: gate.refusal(False, "s1", ENTRY, db, {}))
        t1 = time.perf_counter()
        for _ in range(reps):
            storage.write(lambda db: None)
        rounds.append(((t1 - t0) - (time.perf_counter() - t1)) / reps)
    assert refusal is None, refusal  # the streak's cooldown is long over: the entry may go
    return max(min(rounds), 1e-7)


def datetime_at_noon():
    from datetime import datetime, time as clock_time
    from host.market import IST
    return datetime.combine(TODAY, clock_time(12, 0), IST)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=500)
    ap.add_argument("--short", action="store_true", help="50 repetitions: for CI")
    args = ap.parse_args()
    reps = 50 if args.short else args.reps
    with tempfile.TemporaryDirectory(prefix="bench-risk-") as tmp:
        sizes = {"a week": 5, "a year": 250, "two years": 500}
        cost = {name: per_check(database(Path(tmp), n), reps) for name, n in sizes.items()}
    week = cost["a week"]
    print(f"risk gate check of an entry, after a loss streak long ago ({reps} checks, best of 5 rounds):")
    for name, seconds in cost.items():
        print(f"  {name:>10} of trading days recorded: {seconds * 1e6:8.1f} us  {seconds / week:6.2f}x of a week's")
    print(f"two years / a week: {cost['two years'] / week:.2f}x (flat: about 1); "
          f"median of the three {statistics.median(cost.values()) * 1e6:.1f} us")


if __name__ == "__main__":
    main()
