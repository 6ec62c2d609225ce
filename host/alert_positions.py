"""The position each strategy's alerts add up to: what TradingView believes the strategy holds.

TradingView sees only its own alerts: not a sale in the broker's app, the broker's square-off, a limit entry that
never filled, a breach's flatten, a protective stop, or an alert the host refused. An ADJUST is relative to the
position it believes in. Where that belief and the strategy's own position differ, an ADJUST that takes the belief
towards zero (or through it) moves the position only as far as the belief's new value, and only in the ADJUST's
own direction. Long 75, sold in the app: ADJUST SELL 75 then sends nothing (it used to open a short of 75), and
ADJUST SELL 150 sends 75 (TradingView's strategy is then short 75). An ADJUST that adds is sent whole, as before.

The belief, per strategy and instrument (exchange and symbol, every product together), is stored with each alert
decided, whatever the host did with it (refused while halted, rejected, blocked: TradingView's strategy believes
it traded all the same, and never sends the alert again): an ENTRY sets it to its own quantity, an EXIT takes it
towards zero by its quantity, an ADJUST moves it by its own, and a POSITION alert sets it to its target. A refused
or rejected alert sent again by hand with its alert_id (within ALERT_ID_TTL_S, as the inbox takes it) does not move
it again: the first try did, and what it moved is kept (alert_moves); the resend's ADJUSTs are cut as the first
try's would have been. With no alert since the belief was kept (a strategy's first alert after an upgrade), it is
the strategy's own position. The strategy's position counts its working orders, as a POSITION
alert does. Delivery (CNC) ADJUSTs are not cut: yesterday's buys are holdings, which the host does not count. EXITs
are not cut either (an exit is never held back), nor a strategy plugin's intents: only an alert's own legs count.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Optional

import sqlite_utils

from .flatten import OPEN_STATUSES
from .models import ExecutionType, Intent, Product, TargetLeg
from .storage import Storage, utcnow

Instrument = tuple[str, str]  # exchange, symbol


@dataclass(frozen=True)
class Plan:
    """An alert's intents with its ADJUSTs cut to the belief; the beliefs to store once it is decided."""

    intents: list[Intent]
    believed: dict[Instrument, int]
    notes: list[str]
    before: dict[Instrument, int] = field(default_factory=dict)  # where it started, where it was read
    key: Optional[str] = None  # the alert's alert_id
    resend: bool = False  # a refused or rejected try of the same alert_id moved the belief already (alert_moves)


def _held(db: sqlite_utils.Database, strategy: str, at: Instrument) -> int:
    """The strategy's position in the instrument with what its working orders will still buy or sell, as a
    POSITION alert counts it (resting stops aside: they are there in case, not a move asked for)."""
    held = db.execute("select coalesce(sum(net_qty), 0) from positions where strategy = ? and exchange = ? and "
                      "symbol = ?", (strategy, *at)).fetchone()[0]
    working = db.execute(f"select coalesce(sum(case side when 'BUY' then 1 else -1 end * (qty - coalesce(filled_qty, "
                         f"0))), 0) from orders where strategy = ? and exchange = ? and symbol = ? and status in "
                         f"({','.join('?' * len(OPEN_STATUSES))}) and protection is null",
                         (strategy, *at, *OPEN_STATUSES)).fetchone()[0]
    return held + working


def _believed(db: sqlite_utils.Database, strategy: str, at: Instrument, earlier: dict[Instrument, int]) -> int:
    """The stored belief, less what an earlier try of the same alert moved it by; unknown: the position."""
    row = db.execute("select believed from alert_positions where strategy = ? and exchange = ? and symbol = ?",
                     (strategy, *at)).fetchone()
    return (row[0] if row is not None else _held(db, strategy, at)) - earlier.get(at, 0)


def _earlier(db: sqlite_utils.Database, strategy: str, key: Optional[str], since: str) -> dict[Instrument, int]:
    """What a refused or rejected try of this alert_id moved, if it came since `since` (an older one is another
    alert that used the same id, as the inbox takes it)."""
    if key is None:
        return {}
    return {(ex, sym): n for ex, sym, n in db.execute(
        "select exchange, symbol, moved from alert_moves where strategy = ? and client_alert_id = ? and at >= ?",
        (strategy, key, since)).fetchall()}


def _words(n: int) -> str:
    return "flat" if not n else f"{n:+d}"


def _sign(n: int) -> int:
    return (n > 0) - (n < 0)


def plan(db: sqlite_utils.Database, strategy: str, intents: Iterable[Intent], key: Optional[str] = None,
         since: str = "") -> Plan:
    """Cut each ADJUST that reduces the belief to what moves the strategy's position to the belief's new value,
    in its own direction (one cut to nothing is dropped); the beliefs after the alert. key: its alert_id; since:
    the oldest try of it that counts (ALERT_ID_TTL_S ago)."""
    earlier = _earlier(db, strategy, key, since)
    believed: dict[Instrument, int] = {}
    before: dict[Instrument, int] = {}
    moved: dict[Instrument, int] = {}  # what this alert's ADJUSTs already send, per instrument
    out, notes = [], []
    for i in intents:
        at, d = (i.exchange, i.symbol), i.side.sign * i.qty
        if i.action is ExecutionType.ENTRY:
            believed[at] = believed.get(at, 0) + d  # a fresh start (the guard lets an ENTRY in only flat)
            out.append(i)
            continue
        if at not in believed:
            believed[at] = before[at] = _believed(db, strategy, at, earlier)
        b = believed[at]
        if i.action is ExecutionType.EXIT:
            believed[at] = _sign(b) * max(abs(b) - i.qty, 0)
            out.append(i)
            continue
        believed[at] = b + d
        if not b or _sign(d) == _sign(b) or i.product is Product.CNC:  # an ADJUST that adds; or delivery, whose
            # holdings (yesterday's buys) the host does not count: it cannot tell what TradingView's trim finds
            moved[at] = moved.get(at, 0) + d
            out.append(i)
            continue
        held = _held(db, strategy, at) + moved.get(at, 0)  # with the working orders, this alert's sends too
        gap = b + d - held  # from the position to the belief's new value
        qty = min(abs(gap), i.qty) if _sign(gap) == _sign(d) else 0
        moved[at] = moved.get(at, 0) + i.side.sign * qty
        if qty < i.qty:
            notes.append(f"{i.exchange}:{i.symbol} ADJUST {i.side.value} {i.qty} cut to {qty}: TradingView believes "
                         f"the strategy holds {_words(b)} and means {_words(b + d)}; it holds {_words(held)} with its "
                         f"working orders, moved by what TradingView does not see (a trade in the broker's app, a "
                         f"square-off, flatten or stop, an order not filled, an alert refused or capped at zero)"
                         + ("" if qty else ": nothing to send") + ". A POSITION alert sets both")
        if qty:
            out.append(replace(i, qty=qty))
    if earlier:  # sent again by hand: the first try moved the belief; this one only trades (cut from where it was)
        return Plan(out, {}, notes, {}, key, resend=True)
    return Plan(out, believed, notes, before, key)


def targets(legs: Iterable[TargetLeg]) -> dict[Instrument, int]:
    """A POSITION alert's beliefs: its targets, every product of an instrument together."""
    out: dict[Instrument, int] = {}
    for leg in legs:
        out[(leg.exchange, leg.symbol)] = out.get((leg.exchange, leg.symbol), 0) + leg.target
    return out


def store(db: sqlite_utils.Database, strategy: str, p: Plan, accepted: bool) -> None:
    """Keep a decided alert's beliefs; an accepted one's cuts said (an `adjust_capped` warning each: TradingView
    keeps no answer); what a refused or rejected one moved kept, so that its resend does not move it again."""
    if p.key is not None and accepted is p.resend:  # a resend that went; a first try that did not (older rows out)
        db.execute("delete from alert_moves where strategy = ? and client_alert_id = ?", (strategy, p.key))
    if p.key is not None and not accepted and not p.resend:
        now = utcnow()
        for at, n in p.believed.items():  # every instrument it touched, 0 too: a resend is known by its row
            start = p.before[at] if at in p.before else _believed(db, strategy, at, {})
            db.execute("insert into alert_moves (strategy, client_alert_id, exchange, symbol, moved, at) values "
                       "(?, ?, ?, ?, ?, ?)", (strategy, p.key, *at, n - start, now))
    set_beliefs(db, strategy, p.believed)
    for note in p.notes if accepted else ():
        Storage.add_event(db, "adjust_capped", f"{strategy}: {note}", "warning", strategy, None)


def set_beliefs(db: sqlite_utils.Database, strategy: str, believed: dict[Instrument, int]) -> None:
    now = utcnow()
    for (exchange, symbol), n in believed.items():
        db.execute("insert into alert_positions (strategy, exchange, symbol, believed, updated_at) values "
                   "(?, ?, ?, ?, ?) on conflict (strategy, exchange, symbol) do update set believed = "
                   "excluded.believed, updated_at = excluded.updated_at", (strategy, exchange, symbol, n, now))
