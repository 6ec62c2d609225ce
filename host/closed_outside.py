"""An ADJUST that follows a close in the broker's app: the close made the reduction the ADJUST asks for.

TradingView's strategy never sees a trade made in the broker's app (or the broker's square-off). Long 75, the
trader sells the 75 there; the strategy's next ADJUST SELL 75 is the reduction it believes it still has to make.
On the flat position left it would otherwise be an addition, and the account would end short 75.

So an ADJUST that would open a position on the side where trades outside the host closed the strategy's position
there, after the strategy's own last order there, counts that closed quantity as done: only the rest, if any, is
sent (an addition, checked as one). Each outside close is counted once: a state key keeps how far it was.
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Optional

import sqlite_utils

from .models import ExecutionType, Intent
from .storage import Storage


def _key(strategy: str, key: tuple[str, str, str]) -> str:
    return "closed_outside_counted:" + ":".join((strategy, *key))


def _closed_since(db: sqlite_utils.Database, strategy: str, intent: Intent) -> tuple[int, Optional[str]]:
    """How much trades outside the host on the intent's side closed of the strategy's position there since its own
    last order there (and since what an earlier ADJUST counted); the last such trade's time."""
    key = (intent.exchange, intent.symbol, intent.product.value)
    last_order = db.execute("select max(created_at) from orders where strategy = ? and exchange = ? and symbol = ? "
                            "and product = ?", (strategy, *key)).fetchone()[0] or ""
    counted = db.execute("select value from state where key = ?", (_key(strategy, key),)).fetchone()
    since = max(last_order, counted[0] if counted else "")
    closed, last = 0, None
    for at, allocation in db.execute("select at, allocation from outside_fills where exchange = ? and symbol = ? and "
                                     "product = ? and side = ? and at > ? order by at",
                                     (*key, intent.side.value, since)).fetchall():
        try:
            split = json.loads(allocation)
        except (TypeError, ValueError):
            continue
        took = sum(n for name, n in split if name == strategy) if isinstance(split, list) else 0
        if took:
            closed, last = closed + took, at
    return closed, last


def count_done(db: sqlite_utils.Database, strategy: str, intents: list[Intent],
               net: dict[tuple, int]) -> tuple[list[Intent], list[str]]:
    """The intents with each opening ADJUST cut by what trades outside the host already closed on its side (an
    ADJUST cut to nothing is dropped); a note for each cut, also said as an `exit_capped` event. `net`: the
    strategy's positions, (exchange, symbol, product) -> quantity."""
    out, notes = [], []
    for i in intents:
        if i.action is not ExecutionType.ADJUST or net.get((i.exchange, i.symbol, i.product), 0):
            out.append(i)  # a reduction (capped by the guard) or an addition to a position still held
            continue
        closed, last = _closed_since(db, strategy, i)
        if not closed:
            out.append(i)
            continue
        done = min(i.qty, closed)
        Storage.put_state(db, _key(strategy, (i.exchange, i.symbol, i.product.value)), last)
        rest = i.qty - done
        note = (f"{i.exchange}:{i.symbol}: ADJUST {i.side.value} {i.qty} counted {done} as done by the trade outside "
                f"the host (the broker's app or its square-off) that closed strategy {strategy}'s position there "
                f"({i.side.value} {closed}); " + (f"the other {rest} sent, opening a position" if rest else
                                                  "nothing sent: the position is flat"))
        notes.append(note)
        Storage.add_event(db, "exit_capped", f"{strategy}: {note}", "warning", strategy, None)
        if rest:
            out.append(replace(i, qty=rest))
    return out, notes
