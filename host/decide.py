"""Deciding: an intent passes the guard, then risk, then validation, and becomes NEW order rows (all or nothing)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional

import sqlite_utils

from . import flatten, guard, protect, targets
from .instruments import check_order, slices
from .pricing import DEFAULT_TICK
from .models import AlertStatus, Decision, ExecutionType, Intent, OrderType, Product, Side, TargetLeg
from .orders import insert_order
from .risk import RiskGate
from .storage import Storage
from .validation import validate_intent

OPEN_STATUSES = flatten.OPEN_STATUSES


def load_book(db: sqlite_utils.Database, strategy: str) -> guard.StrategyBook:
    """The strategy's own positions and unfinished orders, read inside the deciding transaction."""
    book = guard.StrategyBook(strategy)
    for p in db.query("select exchange, symbol, product, net_qty from positions where strategy = ? and net_qty != 0",
                      (strategy,)):
        book.positions[(p["exchange"], p["symbol"], Product(p["product"]))] = p["net_qty"]
    marks = ",".join("?" * len(OPEN_STATUSES))
    for o in db.query(f"select exchange, symbol, product, side, qty, filled_qty from orders "
                      f"where strategy = ? and status in ({marks})", (strategy, *OPEN_STATUSES)):
        book.open_orders.append(guard.OpenOrder(o["exchange"], o["symbol"], Product(o["product"]), Side(o["side"]),
                                                o["qty"] - (o["filled_qty"] or 0)))
    return book



def name_twin(db: sqlite_utils.Database, strategy: str, exchange: str, symbol: str, said: str) -> str:
    """Words for a strategy whose name differs from `strategy` only in case and that holds a position in the symbol
    (an alert meant for it would otherwise say only "nothing to exit"), said as a warning after `said` too; empty
    when there is none."""
    row = db.execute("select strategy, net_qty from positions where exchange = ? and symbol = ? and net_qty != 0 and "
                     "strategy != ? and lower(strategy) = lower(?) limit 1", (exchange, symbol, strategy,
                                                                              strategy)).fetchone()
    if row is None:
        return ""
    words = (f" (strategy names are case-sensitive: {row[0]!r}, not {strategy!r}, holds {row[1]:+d} "
             f"{exchange}:{symbol}; nothing of it is touched)")
    Storage.add_event(db, "strategy_name_case", f"{strategy}: {said}{words}", "warning", strategy, None)
    return words


def _closing(intent: Intent, book: guard.StrategyBook) -> Intent:
    """An exit held for its stop's cancel, on the side and product of the position it closes (the guard, which
    sets them for the others, does not see it); as it came if the strategy holds nothing there."""
    product = guard.position_product(intent, book)
    net = book.net(intent.exchange, intent.symbol, product)
    return replace(intent, side=Side.SELL if net > 0 else Side.BUY, product=product) if net else intent


def resting_exits(db: sqlite_utils.Database, strategy: str, key: tuple[str, str, Product], net: int) -> list[dict]:
    """The strategy's working exits of a position that are not market orders (stops, limits), not moving towards
    the market already, nor being cancelled; its host-managed protective stops aside (protect.hold_exits)."""
    if not net:
        return []
    ex, sym, product = key
    marks = ",".join("?" * len(OPEN_STATUSES))
    return list(db.query(f"select id from orders where strategy = ? and exchange = ? and symbol = ? and product = ? "
                         f"and side = ? and action != 'ENTRY' and order_type != 'MKT' and protection is null and "
                         f"escalate is null and cancel_requested is null and status in ({marks}) order by rowid",
                         (strategy, ex, sym, product.value, (Side.SELL if net > 0 else Side.BUY).value,
                          *OPEN_STATUSES)))


def _named(asked: list[Intent], intent: Intent, what: str) -> str:
    """How the answer names an intent's fields: by its place among those asked (an alert's legs[n], a plugin's
    intent[n]), whatever the guard capped, held or sliced on the way."""
    n = next((k for k, a in enumerate(asked) if (a.exchange, a.symbol) == (intent.exchange, intent.symbol)), 0)
    return f"{what}[{n}]"


def _unpriced(db: sqlite_utils.Database, key: tuple) -> str:
    """Words for an instrument with no price yet (an exit is moved from the last price): what waits for one."""
    if db.execute("select 1 from quotes where exchange = ? and symbol = ?", key[:2]).fetchone():
        return ""
    return " (once the feed gives a price for it: there is none yet)"


class Decider:
    """The one path from intents to orders, whoever asks (an alert, a plugin, a breach, a target)."""

    def __init__(self, gate: RiskGate, params: Callable[[str], dict], on_waiting: Callable[[], None] = lambda: None):
        self.gate = gate
        self.params = params
        self.on_waiting = on_waiting  # a follow-up target was stored (the engine looks for it)
        self.instruments: Optional[Callable[[], Any]] = None  # live mode: the instrument master

    def evaluate(self, db: sqlite_utils.Database, strategy: str, intents: list[Intent],
                 alert_id: Optional[str], version: Optional[str] = None,
                 room: Optional[flatten.Room] = None, out_now: bool = False,
                 legs: Optional[list[Intent]] = None) -> Decision:
        """Guard, then risk, then validation, all or nothing; write NEW orders if everything passes.

        out_now (a strategy's alert or hook, not risk's own flattens, which mark their exits themselves): a market
        EXIT of the whole position moves the strategy's resting exits there towards the market until they fill.

        An EXIT also stops the strategy's own orders that would add to that symbol (the rest of a working
        entry must not fill after the exit); a full exit then follows up on what they filled meanwhile.
        """
        asked = intents  # EXITs of positions with a resting stop wait for its cancel (protect.hold_exits)
        intents, held = protect.split_exits(db, strategy, list(intents))
        book = load_book(db, strategy)
        full_exits = {(i.exchange, i.symbol, guard.position_product(i, book)) for i in asked
                      if i.action is ExecutionType.EXIT
                      and i.qty >= abs(book.net(i.exchange, i.symbol, guard.position_product(i, book)))}
        checked = [guard.check(i, book) for i in intents]
        notes = [c.note + name_twin(db, strategy, i.exchange, i.symbol, c.note)
                 if c.intent is None and i.action is ExecutionType.EXIT else c.note
                 for c, i in zip(checked, intents) if c.note]
        blocked = [c.blocked for c in checked if c.blocked]
        if blocked:
            return Decision(AlertStatus.BLOCKED, "; ".join(blocked))
        # exits and reductions (an ADJUST that reduces, too), and the exits held for a resting stop's cancel, are
        # capped at the broker's net: a sale in the broker's app a moment ago is not sold again
        reducing = [c for c in checked if c.intent is not None and c.reducing]
        held = [_closing(i, book) for i in held]
        capped, cap_notes = flatten.cap_exits([c.intent for c in reducing] + held, room,
                                              lambda key: flatten.across(db, strategy, key, room))
        cut = {id(c): i for c, i in zip(reducing, capped)}
        todo = [replace(c, intent=cut[id(c)]) if id(c) in cut else c for c in checked if c.intent is not None]
        todo = [c for c in todo if c.intent is not None and c.intent.qty > 0]
        held = [i for i in capped[len(reducing):] if i.qty > 0]
        notes += cap_notes
        for note in cap_notes:  # the answer may go unread (TradingView keeps none): an event says it too
            Storage.add_event(db, "exit_unsure" if flatten.DOUBT in note else "exit_capped", f"{strategy}: {note}",
                              "warning", strategy, None)
        params = self.params(strategy)
        refusals = {r for r in (self.gate.refusal(c.reducing, strategy, c.intent, db, params) for c in todo) if r}
        if refusals:
            return Decision(AlertStatus.REFUSED, "; ".join(sorted(refusals)))
        notes += list(dict.fromkeys(n for n in (self.gate.after_market(c.intent, c.reducing) for c in todo) if n))
        master = self.instruments() if self.instruments is not None else None
        sliced = [(c, replace(c.intent, qty=q)) for c in todo for q in slices(master, c.intent)]
        named = [(c, i, _named(legs or asked, i, "legs" if alert_id is not None else "intent")) for c, i in sliced]
        problems = [str(p) for c, i, name in named for p in validate_intent(i, name)]
        problems += [str(p) for c, i, name in named for p in protect.problems(
            db, i, name, self._tick(master, i.exchange, i.symbol))]
        if master is not None:
            problems += [p for c, i, name in named for p in check_order(
                master, i.exchange, i.symbol, i.qty, (i.price, i.trigger_price), name, c.reducing)]
        if problems:
            return Decision(AlertStatus.REJECTED, "; ".join(problems))
        if len(sliced) > len(todo):
            notes.append(f"{len(todo)} order(s) sent as {len(sliced)} slices under the freeze quantity")
        orders = tuple(insert_order(db, i, strategy, alert_id, version) for _, i in sliced)
        protect.record(db, strategy, alert_id, [(i, oid) for (_, i), oid in zip(sliced, orders)])
        cancels, held_notes = protect.hold_exits(db, strategy, held)
        notes += held_notes
        # a market exit of the whole position means "out now": the strategy's resting exits there (a stop, a limit
        # away from the market) move towards the market until they fill, as exit-all's do
        for key in {(i.exchange, i.symbol, guard.position_product(i, book)) for i in intents
                    if i.action is ExecutionType.EXIT and i.order_type is OrderType.MKT} & full_exits:
            resting = resting_exits(db, strategy, key, book.net(*key)) if out_now else []
            if resting:
                flatten.mark_escalate(db, [o["id"] for o in resting], flatten.HEALED)
                where = f"{key[0]}:{key[1]}"
                notes = [n for n in notes if not n.startswith(f"nothing to exit in {where} ")]
                notes.append(f"{len(resting)} resting exit(s) of {strategy} in {where} cover the rest of the "
                             f"position: moved towards the market until they fill{_unpriced(db, key)}")
        for ex, sym in dict.fromkeys((i.exchange, i.symbol) for i in asked if i.action is ExecutionType.EXIT):
            stopped = flatten.cancel_adding(db, f"EXIT of {strategy} in {ex}:{sym}", strategy=strategy, exchange=ex,
                                    symbol=sym)
            cancels += stopped.working
            if stopped.pending and alert_id is not None:
                for key in full_exits:
                    if key[:2] == (ex, sym):  # what the stopped orders fill meanwhile is exited after them
                        targets.store_waiting(db, alert_id, strategy, TargetLeg(ex, sym, key[2], OrderType.MKT, 0),
                                              targets.REPLAN, stopped.pending)
                        self.on_waiting()
                notes.append(f"{len(stopped.pending)} working order(s) of {strategy} adding to {ex}:{sym} cancelled")
        return Decision(AlertStatus.ACCEPTED, "; ".join(notes) or None, orders, tuple(dict.fromkeys(cancels)))

    @staticmethod
    def _tick(master: Any, exchange: str, symbol: str) -> Optional[Any]:
        """The tick a stop or target must be on: the instrument's, else (paper) 0.05 outside currencies."""
        inst = master.get(exchange, symbol) if master is not None else None
        if inst is not None and inst.tick_size:
            return inst.tick_size
        return None if exchange in ("CDS", "BCD") else DEFAULT_TICK

