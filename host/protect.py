"""Protective exits: the stop, target and trailing stop that travel with an entry, and a strategy's MTM limits.

One job, in one place:

- **Contract.** An ENTRY/ADJUST leg (or a plugin's Intent, see `ctx.protect`) carries a `Protection`. Its rules
  are checked here (`problems`), each with field, expected and found.
- **One stop per position, resting at the broker.** As the entry's fills arrive, `Protector.sync` places (or
  resizes with ModifyOrder) one SL-LMT order per position: trigger at the stop, limit one protection step
  beyond, our id in remarks, sliced under the freeze quantity. The stops plus the position's other working
  exits never exceed the position, so nothing can flip it.
- **Target and trailing are watched on ticks.** A target cancels the stop first; the exit is sent only once
  the broker has confirmed the cancel (a stop that filled instead ends it: no target exit). Trailing moves the
  stop with ModifyOrder, only towards profit, at most once per TRAIL_MIN_INTERVAL_S.
- **A held exit is capped at the broker's net** (live), read once its stops have ended: a sale in the broker's
  app a moment before, not yet adopted, is not sold again (an exit held for a stop's cancel, a target's).
- **Every other exit goes around the stops.** `hold_exits` (called by the Decider for every EXIT, whoever asks:
  an alert, exit-all, a breach, the square-off, a POSITION target) cancels the position's stop and keeps the
  exit until the cancel is confirmed; what remains afterwards is protected again (a partial exit resizes).
- **Strategy MTM limits** (`strategy_stoploss`, `strategy_target`, `strategy_trailing_step`, rupees measured
  from when they were set) exit all of that strategy's positions, through the same path.
- **State in SQLite** (`protections`, `strategy_limits`, `orders.protection`): after a restart each stop is
  found again by its remarks (the watcher), never placed twice, and trailing goes on. A stop cancelled by hand
  is an error event, and is placed again unless the position is flat.
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from decimal import ROUND_FLOOR, Decimal
from typing import Any, Callable, Optional

import sqlite_utils

from . import flatten, guard, pending_flattens
from .instruments import slices
from .market import IST
from .models import (BrokerView, Decision, ExecutionType, Intent, OrderStatus, OrderType, Problem, Product, Protection,
                     Side)
from .orders import insert_order
from .pricing import DEFAULT_TICK, protected_limit, round_to_tick
from .storage import Storage, dec, utcnow

log = logging.getLogger(__name__)
LIVE = ("NEW", "SUBMITTED", "UNKNOWN", "OPEN", "PARTIAL", "LOST")  # a stop that may rest or yet be booked
WORKING = ("OPEN", "PARTIAL")
LEG_FIELDS = ("stop_loss", "stop_loss_points", "stop_loss_pct", "target", "target_points", "target_pct",
              "trailing_type", "trailing_value", "trailing_activation_price")
ALERT_FIELDS = ("strategy_stoploss", "strategy_target", "strategy_trailing_step")
TRAILING_TYPES = ("POINTS", "PERCENT")
PENDING, ACTIVE, EXITING, DONE = "pending", "active", "exiting", "done"
NOT_DONE = (PENDING, ACTIVE, EXITING)  # named, not "!= done": the status index finds them, however many ended
REARM_AFTER_REJECT_S = 5.0
REARM_MAX_S = 300.0
REARM_AFTER_OUTSIDE_CANCEL_S = 7.0  # longer than a poll of the broker's books (RISK_POLL_S, 5 s)
MODIFY_WAIT_S = 5.0
HELD_READ_WAIT_S = 10.0  # a held exit waits this long at least for its read of the books (Protector.read_wait_s)
HELD_CAP_S = 120.0  # a stop is kept under what that read said the broker holds at most this long (_stop_net)
ONE = Decimal(1)


# ---------------------------------------------------------------- the contract

def _found(v: Any) -> str:
    return "nothing" if v is None else f"{v} (number)" if isinstance(v, Decimal) else repr(v)


def static_problems(p: Protection, side: Side, ref: Optional[Decimal], where: str, ref_name: str = "the entry",
                    tick: Optional[Decimal] = None, alert_where: Optional[str] = None) -> list[Problem]:
    """The audit's rules for one leg's protection: sides, stop before target and trailing, values, the tick.

    `ref` is the entry's price (its limit, or the LTP for a market entry; None when unknown)."""
    out: list[Problem] = []
    add = lambda field, expected, found: out.append(Problem(f"{where}.{field}", expected, _found(found)))  # noqa: E731
    long = side is Side.BUY
    below, above = ("below", "above") if long else ("above", "below")
    for name, forms in (("stop_loss", ("stop_loss", "stop_loss_points", "stop_loss_pct")),
                        ("target", ("target", "target_points", "target_pct"))):
        given = [f for f in forms if getattr(p, f) is not None]
        if len(given) > 1:
            add(given[1], f"only one of {', '.join(forms)}", getattr(p, given[1]))
    for name in ("stop_loss_points", "target_points"):
        v = getattr(p, name)
        if v is not None and v <= 0:
            add(name, "a number of points above 0", v)
    for name in ("stop_loss_pct", "target_pct"):
        v = getattr(p, name)
        if v is not None and not 0 < v < 100:
            add(name, "a percentage above 0 and below 100", v)
    if ref is not None:  # relative prices that would land at or below zero
        for name in ("stop_loss_points", "target_points"):
            v = getattr(p, name)
            falls = (name == "stop_loss_points") == long  # a long's stop, a short's target: below the entry
            if v is not None and v > 0 and falls and v >= ref:
                add(name, f"fewer points than {ref_name} {ref} (the price would be at or below zero)", v)
    if p.stop_loss is not None and ref is not None and not (p.stop_loss < ref if long else p.stop_loss > ref):
        add("stop_loss", f"a price {below} {ref_name} {ref} (a {side.value}'s stop loss is {below} it)", p.stop_loss)
    if p.has_target and not p.has_stop:
        add(next(f for f in ("target", "target_points", "target_pct") if getattr(p, f) is not None),
            "a stop loss with it (stop_loss, stop_loss_points or stop_loss_pct): a target needs a stop loss",
            p.target if p.target is not None else p.target_points if p.target_points is not None else p.target_pct)
    if p.target is not None:
        if ref is not None and not (p.target > ref if long else p.target < ref):
            add("target", f"a price {above} {ref_name} {ref} (a {side.value}'s target is on the profit side)", p.target)
        elif p.stop_loss is not None and not (p.target > p.stop_loss if long else p.target < p.stop_loss):
            add("target", f"a price {above} the stop loss {p.stop_loss} (on the profit side)", p.target)
    if p.trailing_type is not None:
        if p.trailing_type not in TRAILING_TYPES:
            add("trailing_type", "POINTS | PERCENT", p.trailing_type)
        if not p.has_stop:
            add("trailing_type", "a stop loss with it (stop_loss, stop_loss_points or stop_loss_pct): trailing moves "
                                 "the stop", p.trailing_type)
        if p.trailing_value is None or p.trailing_value <= 0:
            add("trailing_value", "a value above 0 (points or percent to trail by)", p.trailing_value)
        elif p.trailing_type == "PERCENT" and p.trailing_value >= 100:
            add("trailing_value", "a percentage above 0 and below 100", p.trailing_value)
        elif p.trailing_type == "POINTS" and tick and p.trailing_value < tick:
            add("trailing_value", f"at least one tick ({tick}) of points", p.trailing_value)
        elif p.trailing_type == "POINTS" and ref is not None and p.trailing_value >= ref:
            add("trailing_value", f"fewer points than {ref_name} {ref}", p.trailing_value)
        if p.trailing_activation_price is not None and ref is not None and not (
                p.trailing_activation_price > ref if long else p.trailing_activation_price < ref):
            add("trailing_activation_price", f"a price {above} {ref_name} {ref} (trailing starts once the price has "
                                             f"moved there in profit)", p.trailing_activation_price)
    else:
        for name in ("trailing_value", "trailing_activation_price"):
            if getattr(p, name) is not None:
                add("trailing_type", f"POINTS | PERCENT ({name} needs it)", None)
    if tick:
        for name in ("stop_loss", "target", "trailing_activation_price"):
            v = getattr(p, name)
            if v is not None and v % tick:
                add(name, f"a multiple of the instrument's tick size {tick}", v)
    on = f"{where}." if alert_where is None else alert_where  # the strategy limits ride on the alert
    for name in ALERT_FIELDS:
        v = getattr(p, name)
        if v is not None and v <= 0:
            out.append(Problem(f"{on}{name}", "an amount of rupees above 0", _found(v)))
    if p.strategy_trailing_step is not None and p.strategy_stoploss is None:
        out.append(Problem(f"{on}strategy_trailing_step", "strategy_stoploss with it: the step raises that stop",
                           _found(p.strategy_trailing_step)))
    return out


def problems(db: sqlite_utils.Database, intent: Intent, where: str, tick: Optional[Decimal]) -> list[Problem]:
    """The rules for an intent's protection, with the LTP as the reference of a market entry."""
    p = intent.protection
    if p is None:
        return []
    if intent.action is ExecutionType.EXIT and p.per_position:
        return [Problem(f"{where}.protection", "no stop, target or trailing on an EXIT (only on ENTRY or ADJUST)",
                        "a protection")]
    ref, name = intent.price, "the entry price"
    if intent.order_type in (OrderType.MKT, OrderType.SL_MKT):
        q = db.execute("select ltp from quotes where exchange = ? and symbol = ?",
                       (intent.exchange, intent.symbol)).fetchone()
        ref, name = (dec(q[0]) if q else None), "the LTP"
        if intent.order_type is OrderType.SL_MKT and intent.trigger_price is not None:
            ref, name = intent.trigger_price, "the entry's trigger price"
        if ref is None:  # an absolute price cannot be checked against a market that has not printed yet
            return [Problem(f"{where}.{f}", f"a price checked against the LTP, and no last price of {intent.exchange}:"
                            f"{intent.symbol} is known yet: send stop_loss_points/stop_loss_pct (measured from the "
                            f"fill), or a LIMIT entry", _found(getattr(p, f)))
                    for f in ("stop_loss", "target", "trailing_activation_price") if getattr(p, f) is not None] \
                + static_problems(p, intent.side, None, where, name, tick)
    return static_problems(p, intent.side, ref, where, name, tick)


def to_json(p: Optional[Protection]) -> Optional[dict]:
    return None if p is None else {k: (str(v) if isinstance(v, Decimal) else v) for k, v in asdict(p).items()
                                   if v is not None}


def from_json(d: Optional[dict]) -> Optional[Protection]:
    if not d:
        return None
    return Protection(**{k: (v if k == "trailing_type" else Decimal(v)) for k, v in d.items()})


def _key(strategy: str, exchange: str, symbol: str, product: str) -> str:
    return f"{strategy}|{exchange}|{symbol}|{product}"


def _row_key(row: dict) -> str:
    return _key(row["strategy"], row["exchange"], row["symbol"], row["product"])


def strategy_pnl(db: sqlite_utils.Database, strategy: str) -> Decimal:
    """The strategy's day PnL (realised + unrealised at the last price), CNC excluded, in Decimal."""
    total = Decimal("0")
    for r in db.query("select p.net_qty, p.avg_price, p.realized_pnl, q.ltp from positions p left join quotes q on "
                      "q.exchange = p.exchange and q.symbol = p.symbol where p.strategy = ? and p.product != 'C'",
                      (strategy,)):
        total += dec(r["realized_pnl"]) or 0
        if r["net_qty"] and r["ltp"] is not None:
            total += (Decimal(r["ltp"]) - (dec(r["avg_price"]) or 0)) * r["net_qty"]
    return total


def rebase_limits(db: sqlite_utils.Database) -> None:
    """A new day: armed strategy MTM limits count from the new day's MTM (after the carry-over), like every day limit."""
    for lim in list(db.query("select strategy from strategy_limits where status = 'armed'")):
        base = strategy_pnl(db, lim["strategy"])
        db.execute("update strategy_limits set base_pnl = ?, peak = '0', updated_at = ? where strategy = ?",
                   (str(base), utcnow(), lim["strategy"]))
        Storage.add_event(db, "strategy_limits_rebased", f"strategy {lim['strategy']}: a new day; its MTM stop and "
                          f"target count from now", "info", lim["strategy"], {"base_pnl": str(base)})


# ---------------------------------------------------------------- hooks of the Decider

def _stop(db: sqlite_utils.Database, orders: list[dict], why: str) -> flatten.Stopped:
    """Cancel stops of ours (marked first, so that their end is never taken for a cancel by hand)."""
    if orders:
        db.execute(f"update orders set cancel_requested = coalesce(cancel_requested, ?) where id in "
                   f"({','.join('?' * len(orders))})", (why, *[o["id"] for o in orders]))
    return flatten.stop(db, orders, why)


def _exit_after_stops(db: sqlite_utils.Database, p: dict, why: str, cancel_why: str) -> tuple[int, list[str]]:
    """Cancel the protection's live stops; the position is exited at market once they have ended (its net, and
    the cancels to send)."""
    net = _net(db, p)
    stopped = _stop(db, _live_stops(db, _row_key(p)), cancel_why)
    db.execute("update protections set pending_exit = ?, status = ?, updated_at = ? where strategy = ? and "
               "exchange = ? and symbol = ? and product = ?",
               (json.dumps({"qty": abs(net), "order_type": "MKT", "price": None, "why": why}), EXITING,
                utcnow(), p["strategy"], p["exchange"], p["symbol"], p["product"]))
    return net, stopped.working


def _live_stops(db: sqlite_utils.Database, key: str) -> list[dict]:
    return [o for o in db.query(f"select * from orders where protection = ? and status in "
                                f"({','.join('?' * len(LIVE))}) order by rowid", (key, *LIVE)) if not _vanished(o)]


def _overshoot(db: sqlite_utils.Database, p: dict, key: str, net: int) -> int:
    """How far the protection's own stop took its position past zero: the last fill in the symbol was that stop."""
    last = db.execute("select protection, filled_qty from orders where strategy = ? and exchange = ? and symbol = ? "
                      "and product = ? and filled_qty > 0 order by updated_at desc, rowid desc limit 1",
                      (p["strategy"], p["exchange"], p["symbol"], p["product"])).fetchone()
    return min(abs(net), last[1]) if last is not None and last[0] == key else 0


def cancel_stops(db: sqlite_utils.Database, positions: list[tuple[str, str, str, str]], why: str) -> list[str]:
    """Cancel the live stops of these positions (strategy, exchange, symbol, product) now: to cancel at the broker."""
    out: list[str] = []
    for strategy, exchange, symbol, product in positions:
        out += _stop(db, _live_stops(db, _key(strategy, exchange, symbol, product)), why).working
    return out


def _ended(db: sqlite_utils.Database, o: dict) -> bool:
    """The stop's protection is over (or gone): nothing for it to protect."""
    row = db.execute("select status from protections where strategy = ? and exchange = ? and symbol = ? and "
                     "product = ?", (o["strategy"], o["exchange"], o["symbol"], o["product"])).fetchone()
    return row is None or row[0] == DONE


def _vanished(o: dict) -> bool:
    """A LOST stop (never seen in the broker's book in time, or gone from it): it protects nothing. It is marked
    to be cancelled should it turn up, and the position is protected again by a new one."""
    return o["status"] == OrderStatus.LOST.value


def _protected(db: sqlite_utils.Database, strategy: str, i: Intent) -> Optional[tuple[dict, list[dict]]]:
    """The protection of the position an EXIT closes, with its live stops, if a stop may rest at the broker."""
    book = guard.StrategyBook(strategy, {(i.exchange, i.symbol, Product(r[0])): r[1] for r in db.execute(
        "select product, net_qty from positions where strategy = ? and exchange = ? and symbol = ? and net_qty != 0",
        (strategy, i.exchange, i.symbol))})
    product = guard.position_product(i, book).value  # the position the guard will take the exit to close
    rows = list(db.query("select * from protections where strategy = ? and exchange = ? and symbol = ? and "
                         "product = ? and status != ?", (strategy, i.exchange, i.symbol, product, DONE)))
    if not rows:
        return None
    stops = _live_stops(db, _row_key(rows[0]))
    return (rows[0], stops) if stops else None


def split_exits(db: sqlite_utils.Database, strategy: str, intents: list[Intent]) -> tuple[list[Intent], list[Intent]]:
    """(intents to decide now, exits that must wait for their position's resting stop to be cancelled).

    An ADJUST that reduces a protected position is a trim: it waits like an EXIT, and the stop is resized after."""
    now, held = [], []
    for i in intents:
        found = i.action is not ExecutionType.ENTRY and i.protection is None and _protected(db, strategy, i)
        if found and (i.action is ExecutionType.EXIT or Side(found[0]["side"]) is i.side.opposite):
            held.append(i)
        else:
            now.append(i)
    return now, held


def hold_exits(db: sqlite_utils.Database, strategy: str, held: list[Intent]) -> tuple[list[str], list[str]]:
    """EXITs of positions whose stop rests at the broker wait: the stop is cancelled first, and the exit is sent by
    `Protector.sync` once the broker has confirmed the cancel (so the stop and the exit are never live together).
    Returns the orders to cancel at the broker, and notes."""
    cancels, notes = [], []
    for i in held:
        found = _protected(db, strategy, i)
        if found is None:
            continue
        row, stops = found
        why = f"EXIT of {strategy} {i.exchange}:{i.symbol}: the resting stop is cancelled first"
        stopped = _stop(db, stops, why)
        cancels += stopped.working
        pending = json.loads(row["pending_exit"]) if row["pending_exit"] else None
        # two trims held together (TP1 and TP2) both go: added up; what is sent is capped at the position then
        qty = pending["qty"] + i.qty if pending else i.qty
        exit_ = dict(pending) if pending else {"order_type": i.order_type.value,
                                               "price": None if i.price is None else str(i.price)}
        if i.order_type is OrderType.MKT:  # the more urgent of the two: at market
            exit_.update(order_type=OrderType.MKT.value, price=None)
        exit_["qty"] = qty
        db.execute("update protections set pending_exit = ?, status = ?, updated_at = ? where strategy = ? and "
                   "exchange = ? and symbol = ? and product = ?",
                   (json.dumps(exit_), EXITING, utcnow(), row["strategy"], row["exchange"], row["symbol"],
                    row["product"]))
        notes.append(f"{i.exchange}:{i.symbol}: the resting stop loss is cancelled first; the exit of {qty} is sent "
                     f"once the broker confirms the cancel")
    return list(dict.fromkeys(cancels)), notes


def record(db: sqlite_utils.Database, strategy: str, alert_id: Optional[str], placed: list[tuple[Intent, str]]) -> None:
    """Store the protections of accepted intents (inside the deciding transaction): one per position."""
    now = utcnow()
    for intent, oid in placed:
        p = intent.protection
        if p is None or intent.action is ExecutionType.EXIT:
            continue
        if p.strategy_limits:
            old = db.execute("select status, base_pnl, peak from strategy_limits where strategy = ?",
                             (strategy,)).fetchone()
            armed = old is not None and old[0] == "armed"
            base = Decimal(old[1]) if armed else strategy_pnl(db, strategy)
            Storage.insert(db, "strategy_limits", {
                "strategy": strategy, "stoploss": _s(p.strategy_stoploss), "target": _s(p.strategy_target),
                "trailing_step": _s(p.strategy_trailing_step), "base_pnl": str(base),
                "peak": old[2] if armed else "0", "status": "armed", "alert_id": alert_id, "reason": None,
                "updated_at": now}, upsert_pk=("strategy",))
        if not p.per_position:
            continue
        key = (strategy, intent.exchange, intent.symbol, intent.product.value)
        old = db.execute("select * from protections where strategy = ? and exchange = ? and symbol = ? and product = ?",
                         key).fetchone()
        cols = [c[0] for c in db.execute("select * from protections limit 0").description]
        old = dict(zip(cols, old)) if old else None
        same = old is not None and old["status"] != DONE and old["side"] == intent.side.value
        entries = (json.loads(old["entry_orders"] or "[]") if same else []) + [oid]
        spec = {k: v for k, v in (to_json(p) or {}).items() if k in LEG_FIELDS}
        Storage.insert(db, "protections", {
            "strategy": strategy, "exchange": intent.exchange, "symbol": intent.symbol,
            "product": intent.product.value, "side": intent.side.value, "spec": json.dumps(spec),
            "entry_orders": json.dumps(entries), "alert_id": alert_id,
            "status": old["status"] if same and old["status"] != PENDING else PENDING,
            "stop": None, "target": None, "best": old["best"] if same else None,
            "trail_active": old["trail_active"] if same else 0, "last_trail_at": old["last_trail_at"] if same else None,
            "pending_exit": old["pending_exit"] if same else None, "exit_orders": old["exit_orders"] if same else None,
            "arm_after": None, "reason": None, "created_at": old["created_at"] if same else now, "updated_at": now},
            upsert_pk=("strategy", "exchange", "symbol", "product"))


def _s(v: Optional[Decimal]) -> Optional[str]:
    return None if v is None else str(v)


# ---------------------------------------------------------------- price arithmetic

def resolve(spec: Protection, side: Side, avg: Decimal, tick: Decimal) -> tuple[Optional[Decimal], Optional[Decimal]]:
    """The stop and target prices of a position entered at `avg`, on the tick (a stop rounded away from the
    price, so a relative stop never comes closer than asked)."""
    sign = 1 if side is Side.BUY else -1
    stop = spec.stop_loss
    if stop is None and spec.stop_loss_points is not None:
        stop = avg - sign * spec.stop_loss_points
    elif stop is None and spec.stop_loss_pct is not None:
        stop = avg * (1 - sign * spec.stop_loss_pct / 100)
    target = spec.target
    if target is None and spec.target_points is not None:
        target = avg + sign * spec.target_points
    elif target is None and spec.target_pct is not None:
        target = avg * (1 + sign * spec.target_pct / 100)
    stop = None if stop is None else max(round_to_tick(stop, tick, up=sign < 0), tick)
    target = None if target is None else round_to_tick(target, tick, up=sign > 0)
    return stop, target


def trailed(spec: Protection, side: Side, best: Decimal, tick: Decimal) -> Decimal:
    sign = 1 if side is Side.BUY else -1
    if spec.trailing_type == "PERCENT":
        price = best * (1 - sign * spec.trailing_value / 100)
    else:
        price = best - sign * spec.trailing_value
    return max(round_to_tick(price, tick, up=sign < 0), tick)


# ---------------------------------------------------------------- the engine's part

class Protector:
    """Keeps each protected position's stop resting at the broker; watches targets, trailing and MTM limits.

    Runs on the engine thread: `on_orders` after broker updates, `on_ticks` after prices, `sync` every second.
    Orders go out through the engine's dispatch (persisted first, our id in remarks); modifications through
    the order sender (ModifyOrder, with the gateway's timeout)."""

    def __init__(self, storage: Storage, dispatch: Callable[[Decision], None],
                 evaluate: Callable[[sqlite_utils.Database, str, list[Intent], Optional[flatten.Room]], Decision],
                 modify: Callable[..., None], instruments: Callable[[], Any] = lambda: None,
                 today: Callable[[], str] = lambda: datetime.now(IST).date().isoformat(),
                 books: Callable[[str], tuple[bool, Optional[BrokerView], str]] = lambda key: (True, None, ""),
                 outside_seen: Callable[[], None] = lambda: None):
        self.storage, self.dispatch, self.evaluate, self.modify = storage, dispatch, evaluate, modify
        # a read of the broker's books begun after it was asked for (exit_reads.take): (True, the view, "") once it
        # has ended, (False, None, "") meanwhile, (True, None, why) when it cannot cap. Paper: (True, None, "")
        self.books = books
        self.outside_seen = outside_seen  # the broker's net is not the host's book: read the positions again now
        # position key -> a held exit's read of the books: the broker's net in the instrument, the last order's rowid
        # as the read began, and when (_stop_net)
        self._held_caps: dict[str, tuple[int, int, float]] = {}
        # position key -> the read its held exit waits for (a new one each exit), and since when
        self.reading: dict[str, tuple[str, float]] = {}
        self._reads = itertools.count(1)
        self.read_wait_s = HELD_READ_WAIT_S  # then it goes uncapped (the runtime: 3 broker timeouts + 1 s, if longer)
        self.instruments = instruments
        self.today = today  # the risk day (Asia/Kolkata), as risk's clock has it
        self.protection_pct = Decimal("2")   # MARKET_PROTECTION_PCT: the stop's limit is one step beyond it
        self.trail_interval_s = Decimal("1")  # TRAIL_MIN_INTERVAL_S
        self._modifying: dict[str, tuple[float, int, Optional[Decimal]]] = {}  # order -> (since, qty, trigger)
        # a target whose exit the broker rejected: tried again only after a back-off (the process's memory)
        # key -> (monotonic until, failures, the protection's created_at: a new position's target never waits)
        self._target_wait: dict[str, tuple[float, int, str]] = {}
        self.target_exits: set[str] = set()  # target exits that ended unfilled, said here (never by risk too)
        self._target_sent: dict[str, str] = {}  # exits sent because a target was reached -> its protection's created_at

    # ---- inputs ----
    def on_orders(self, rows: list[dict]) -> None:
        """Orders changed (fills of an entry, a stop's end): act on their positions."""
        keys = {r["protection"] or _row_key(r) for r in rows}
        self._target_ends([r for r in rows if not r["protection"] and r["action"] == ExecutionType.EXIT.value
                           and OrderStatus(r["status"]).terminal])
        stray = [r for r in rows if r["protection"] and r["status"] in WORKING]
        if stray:  # a stop found working after its protection ended (one that was missing, say): cancel it
            cancels = self.storage.write(lambda db: _stop(db, [o for o in stray if _ended(db, o)],
                                                          "its protection has ended").working)
            if cancels:
                self.dispatch(Decision(_accepted(), "stray stop", (), tuple(cancels)))
        if keys:
            self.sync(keys)

    def _target_ends(self, exits: list[dict]) -> None:
        """A target's exit that ended unfilled (rejected, cancelled): the target waits (_target_waits) and it is said
        once; a filled one ends the wait."""
        for o in exits:
            since = self._target_sent.pop(o["id"], None)
            if o["status"] == OrderStatus.FILLED.value:  # an exit works again: the target does not wait
                self._target_wait.pop(_row_key(o), None)
                continue
            if since is None:
                continue
            key = _row_key(o)
            self.target_exits.add(o["id"])
            wait = self._target_waits(key, since)
            message = (f"the target exit of {o['strategy']} {o['exchange']}:{o['symbol']} ({o['product']}) ended "
                       f"{o['status']} ({o['reason']}): the stop is placed again, and the target is tried again in "
                       f"{wait:g} s")
            self.storage.write(lambda db: Storage.add_event(db, "target_exit_rejected", message, "error",
                                                            o["strategy"], {"order_id": o["id"], "wait_s": wait}))

    def _target_waiting(self, p: dict) -> bool:
        """This protection's target is waiting after its exit ended unfilled."""
        until, _, of = self._target_wait.get(_row_key(p), (0.0, 0, ""))
        return of == p["created_at"] and until > time.monotonic()

    def _target_waits(self, key: str, since: str) -> float:
        """The target of this protection (its created_at) waits 5, 10, 20 ... 300 s before it cancels the stop and
        exits again, not at every tick at the target; the wait, in seconds."""
        until, n, of = self._target_wait.get(key, (0.0, 0, since))
        n = n + 1 if of == since else 1
        wait = min(REARM_AFTER_REJECT_S * 2 ** (n - 1), REARM_MAX_S)
        self._target_wait[key] = (time.monotonic() + wait, n, since)
        return wait

    def on_ticks(self, ticks: list) -> None:
        """New prices: the best price for trailing, the target, the MTM limits."""
        symbols = {(t.exchange, t.symbol): t.ltp for t in ticks}
        watched = {(r["exchange"], r["symbol"]) for r in self.storage.rows(
            "select distinct exchange, symbol from protections where status in (?, ?)", (ACTIVE, EXITING))}
        if not watched & set(symbols):  # nothing protected in these symbols: no write on the tick path
            self._limits()
            return

        def run(db: sqlite_utils.Database) -> tuple[set[str], list[str]]:
            keys, cancels = set(), []
            for p in db.query("select * from protections where status in (?, ?)", (ACTIVE, EXITING)):
                ltp = symbols.get((p["exchange"], p["symbol"]))
                if ltp is None:
                    continue
                keys.add(_row_key(p))
                cancels += self._watch(db, p, ltp)
            return keys, cancels
        keys, cancels = self.storage.write(run)
        if cancels:
            self.dispatch(Decision(_accepted(), "target reached", (), tuple(cancels)))
        if keys:
            self.sync(keys)
        else:
            self._limits()

    def _watch(self, db: sqlite_utils.Database, p: dict, ltp: Decimal) -> list[str]:
        """The target, and the best price for trailing, of one position at a new price."""
        spec, side = from_json(json.loads(p["spec"])), Side(p["side"])
        sign = 1 if side is Side.BUY else -1
        best = dec(p["best"])
        if spec.trailing_type and (best is None or sign * (ltp - best) > 0):
            db.execute("update protections set best = ? where strategy = ? and exchange = ? and symbol = ? and "
                       "product = ?", (str(ltp), p["strategy"], p["exchange"], p["symbol"], p["product"]))
        where = f"{p['strategy']} {p['exchange']}:{p['symbol']} ({p['product']})"
        for o in _live_stops(db, _row_key(p)):  # a gap through the stop: its limit cannot fill any more
            limit = dec(o["price"])
            if o["status"] in WORKING and not o["escalate"] and not o["cancel_requested"] and limit is not None \
                    and sign * (ltp - limit) < 0:
                db.execute("update orders set escalate = ? where id = ?", (flatten.HEALED, o["id"]))
                Storage.add_event(db, "stop_gapped", f"the price {ltp} of {where} is past its stop's limit {limit}: "
                                  f"the stop (order {o['id']}) is moved towards the market until it fills", "error",
                                  p["strategy"], {"order_id": o["id"], "ltp": str(ltp)})
        target = dec(p["target"])
        if p["status"] != ACTIVE or target is None or p["pending_exit"] or sign * (ltp - target) < 0 \
                or self._target_waiting(p):
            return []
        net, cancels = _exit_after_stops(db, p, "target", f"target {target} reached: one-cancels-other")
        Storage.add_event(db, "target_hit", f"target {target} of {where} reached at {ltp}: the resting stop is "
                          f"cancelled, then the position ({net:+d}) is exited", "info", p["strategy"],
                          {"target": str(target), "ltp": str(ltp), "qty": net})
        return cancels

    def stop_unmovable(self, order_id: str, reason: str) -> None:
        """The broker refused to move a stop of ours towards the market (a gap through its limit, or an "out now"
        exit): its stops are cancelled, and the position exited at market once they have ended, as at the target."""
        def run(db: sqlite_utils.Database) -> tuple[Optional[str], list[str]]:
            o = db.execute("select protection from orders where id = ? and escalate is not null and "
                           "cancel_requested is null", (order_id,)).fetchone()
            p = next((r for r in db.query("select * from protections where status in (?, ?)", (ACTIVE, EXITING))
                      if o is not None and _row_key(r) == o[0]), None)
            if p is None:
                return None, []
            db.execute("update orders set escalate = null where id = ?", (order_id,))
            net, cancels = _exit_after_stops(db, p, "stop", f"the broker refused to move the stop ({reason})")
            # its price is past the stop: should that exit fail, a stop there is placed again only after a wait
            # (5, 10, 20 ... 300 s), never at once, gapped again, in a loop
            wait = self._target_waits(f"unmovable|{_row_key(p)}", p["created_at"])
            self._arm_after(db, p, wait)
            Storage.add_event(db, "stop_not_moved", f"the stop of {p['strategy']} {p['exchange']}:{p['symbol']} "
                              f"({p['product']}), order {order_id}, could not be moved towards the market: the broker "
                              f"refused ({reason}); it is cancelled, then the position ({net:+d}) is exited at market "
                              f"(should that exit fail, the stop is placed again in {wait:g} s)", "error",
                              p["strategy"], {"order_id": order_id})
            return _row_key(p), cancels
        key, cancels = self.storage.write(run)
        if cancels:
            self.dispatch(Decision(_accepted(), "stop not moved", (), tuple(cancels)))
        if key is not None:
            self.sync({key})

    # ---- the work ----
    def sync(self, keys: Optional[set[str]] = None) -> None:
        """Bring each protection in step: notice stop ends, release held exits, place/resize/move the stop."""
        rows = _not_done(self.storage)
        for p in rows:
            if keys is not None and _row_key(p) not in keys:
                continue
            out = self.storage.write(lambda db, p=p: self._sync_one(db, p))
            if out is None:
                continue
            decision, modifies = out
            if decision.orders or decision.cancels:
                self.dispatch(decision)
            for args in modifies:
                self._modifying[args[0]] = (time.monotonic(), args[1], args[3])
                self.modify(*args)
        self._limits()

    def _tick(self, exchange: str, symbol: str) -> Decimal:
        master = self.instruments()
        inst = master.get(exchange, symbol) if master is not None else None
        return inst.tick_size if inst is not None and inst.tick_size else DEFAULT_TICK

    def _sync_one(self, db: sqlite_utils.Database, p: dict) -> Optional[tuple[Decision, list[tuple]]]:
        key = _row_key(p)
        where = f"{p['strategy']} {p['exchange']}:{p['symbol']} ({p['product']})"
        upd: dict[str, Any] = {}
        side = Side(p["side"])
        sign = 1 if side is Side.BUY else -1
        closing = side.opposite
        spec = from_json(json.loads(p["spec"]))
        pos = db.execute("select net_qty, avg_price from positions where strategy = ? and exchange = ? and "
                         "symbol = ? and product = ?", (p["strategy"], p["exchange"], p["symbol"], p["product"])).fetchone()
        net, avg = (pos[0], dec(pos[1])) if pos else (0, None)
        stops = [dict(zip([c[0] for c in cur.description], r)) for cur in [db.execute(
            "select * from orders where protection = ? order by rowid", (key,))] for r in cur.fetchall()]
        live = [o for o in stops if o["status"] in LIVE and not _vanished(o)]
        self._notice(db, p, stops, net, where)
        orders: list[str] = []
        cancels: list[str] = []
        modifies: list[tuple] = []

        def done(why: str, severity: str = "info") -> tuple[Decision, list]:
            stopped = _stop(db, live, f"protection of {where} ended: {why}")
            upd.update(status=DONE, reason=why, pending_exit=None)
            self.reading.pop(key, None)
            self._held_caps.pop(key, None)
            self._update(db, p, upd)
            Storage.add_event(db, "protection_ended", f"protection of {where} ended: {why}", severity, p["strategy"],
                              {"position": key})
            return Decision(_accepted(), why, (), tuple(stopped.working)), []

        if p["status"] == PENDING:
            if net * sign > 0:
                upd["status"] = p["status"] = ACTIVE
            else:
                entries = json.loads(p["entry_orders"] or "[]")
                marks = ",".join("?" * len(entries)) or "''"
                unfinished = db.execute(f"select count(*) from orders where id in ({marks}) and status not in "
                                        f"('FILLED','CANCELLED','REJECTED','EXPIRED')", entries).fetchone()[0]
                if not unfinished:
                    return done("the entry ended without a fill")
                return None
        if net * sign < 0 and (over := _overshoot(db, p, key, net)):
            return self._close_overshoot(db, p, where, over, done)
        if net * sign <= 0:
            return done("the position is flat" if net == 0 else "the position was reversed")
        tick = self._tick(p["exchange"], p["symbol"])
        stop = dec(p["stop"])
        if stop is None:  # the first fill: relative stops and targets are measured from the fill price
            stop, target = resolve(spec, side, avg or Decimal("0"), tick)
            upd.update(stop=_s(stop), target=_s(target), best=p["best"] or _s(avg))
            p["best"] = upd["best"]
            if avg is not None and stop is not None and sign * (avg - stop) <= 0 and not p["pending_exit"]:
                # filled at or past the stop (a market entry that slipped): a stop there could never rest
                p["pending_exit"] = json.dumps({"qty": abs(net), "order_type": "MKT", "price": None, "why": "stop"})
                Storage.add_event(db, "stop_hit", f"{where} filled at {avg}, at or past its stop loss {stop}: the "
                                  f"position ({net:+d}) is exited at once, no stop is placed", "warning", p["strategy"],
                                  {"avg_price": str(avg), "stop": str(stop)})
        # held exits: sent once no stop can fill any more
        if p["pending_exit"]:
            if live:
                return self._finish(db, p, upd, orders, cancels, modifies)
            ready, view, unread = self._room(db, key)
            room = flatten.closing_room(db, view)
            if not ready:  # the broker's books are being read for it: the engine syncs it again once they are
                return self._finish(db, p, upd, orders, cancels, modifies)
            pending = json.loads(p["pending_exit"])
            qty = min(pending["qty"], abs(net))
            upd.update(pending_exit=None, status=ACTIVE)
            if qty > 0:
                intent = Intent(p["exchange"], p["symbol"], closing, qty, OrderType(pending["order_type"]),
                                Product(p["product"]), dec(pending.get("price")), action=ExecutionType.EXIT)
                d = self.evaluate(db, p["strategy"], [intent], room)
                unbooked = self._broker_holds(db, p, view)
                orders += d.orders
                cancels += d.cancels
                if d.orders and intent.order_type is OrderType.MKT:  # moved towards the market until it fills
                    db.execute(f"update orders set escalate = ? where id in ({','.join('?' * len(d.orders))})",
                               (flatten.HEALED, *d.orders))
                upd["exit_orders"] = json.dumps(list(d.orders))
                if pending.get("why") == "target" and d.orders:
                    self._target_sent.update({oid: p["created_at"] for oid in d.orders})
                elif pending.get("why") == "target" and d.status is _accepted():  # cut to nothing: exit_capped said
                    self._target_waits(_row_key(p), p["created_at"])  # why; looked at again after the wait
                elif pending.get("why") == "target":  # the host refused it (guard, risk, validation): no order
                    wait = self._target_waits(_row_key(p), p["created_at"])
                    Storage.add_event(db, "target_exit_rejected", f"the target exit of {where} was not sent "
                                      f"({d.status.value}: {d.reason}): the stop is placed again, and the target is "
                                      f"tried again in {wait:g} s", "error", p["strategy"], {"wait_s": wait})
                sent = db.execute(f"select coalesce(sum(qty), 0) from orders where id in "
                                  f"({','.join('?' * len(d.orders))})", d.orders).fetchone()[0] if d.orders else 0
                went = "sent" if sent == qty else f"cut to {sent}" if d.status is _accepted() else "not sent"
                Storage.add_event(db, "protected_exit", f"{where}: the stop is no longer live; exit of {qty} {went} "
                                  f"({d.status.value}{': ' + d.reason if d.reason else ''}){unread}{unbooked}",
                                  "warning" if unread or unbooked or sent < qty else "info", p["strategy"],
                                  {"orders": list(d.orders)})
        # trailing: towards profit only, at most once per TRAIL_MIN_INTERVAL_S
        best = dec(p["best"])
        if spec.trailing_type and best is not None and stop is not None and not p["pending_exit"]:
            active = bool(p["trail_active"]) or spec.trailing_activation_price is None or \
                sign * (best - spec.trailing_activation_price) >= 0
            if active and not p["trail_active"]:
                upd["trail_active"] = 1
            candidate = trailed(spec, side, best, tick) if active else stop
            last = p["last_trail_at"]
            due = last is None or (datetime.now(timezone.utc) - datetime.fromisoformat(last)).total_seconds() \
                >= float(self.trail_interval_s)
            if sign * (candidate - stop) >= tick and due:
                Storage.add_event(db, "stop_moved", f"trailing stop of {where} moved from {stop} to {candidate} "
                                  f"(best price {best})", "info", p["strategy"],
                                  {"from": str(stop), "to": str(candidate), "position": key})
                stop = candidate
                upd.update(stop=_s(stop), last_trail_at=utcnow())
        # the resting stop: sized to the position less its other working exits
        others = db.execute(
            f"select coalesce(sum(qty - coalesce(filled_qty, 0)), 0) from orders where strategy = ? and exchange = ? "
            f"and symbol = ? and product = ? and side = ? and action != 'ENTRY' and protection is null and status in "
            f"({','.join('?' * len(LIVE))})", (p["strategy"], p["exchange"], p["symbol"], p["product"],
                                               closing.value, *LIVE)).fetchone()[0]
        desired = max(self._stop_net(db, p, net) - others, 0)
        if any(o["status"] not in WORKING or o["cancel_requested"] or self._busy(o) for o in live):
            return self._finish(db, p, upd, orders, cancels, modifies)  # wait for the broker's answer
        total = sum(o["qty"] - (o["filled_qty"] or 0) for o in live)
        limit = protected_limit(closing, stop, self.protection_pct, tick)
        want = {o["id"]: o["qty"] for o in live}
        if desired == 0 and live:
            cancels += _stop(db, live, f"{where}: other exits cover the position").working
            live = []
        elif desired > total:
            after = p["arm_after"]
            if after and datetime.fromisoformat(after) > datetime.now(timezone.utc):
                return self._finish(db, p, upd, orders, cancels, modifies)
            master = self.instruments()
            grow = Intent(p["exchange"], p["symbol"], closing, live[-1]["qty"] + desired - total if live else
                          desired, OrderType.SL_LMT, Product(p["product"]), limit, stop, action=ExecutionType.EXIT)
            if live and len(slices(master, grow)) == 1:
                want[live[-1]["id"]] = grow.qty
            else:
                new = replace(grow, qty=desired - total)
                for q in slices(master, new):
                    oid = insert_order(db, replace(new, qty=q), p["strategy"], p["alert_id"])
                    db.execute("update orders set protection = ? where id = ?", (key, oid))
                    orders.append(oid)
                Storage.add_event(db, "stop_placing", f"{where}: stop loss {closing.value} {desired - total} "
                                  f"SL-LMT trigger {stop} limit {limit} being placed", "info", p["strategy"],
                                  {"position": key, "trigger": str(stop), "limit": str(limit)})
        elif desired < total:
            excess = total - desired
            for o in reversed(live):
                rest = o["qty"] - (o["filled_qty"] or 0)
                if excess <= 0:
                    break
                if rest > excess:
                    want[o["id"]] = o["qty"] - excess
                    excess = 0
                else:
                    cancels += _stop(db, [o], f"{where}: the stop is resized to {desired}").working
                    want.pop(o["id"])
                    excess -= rest
        for o in live:
            if o["id"] not in want:
                continue
            if want[o["id"]] != o["qty"] or dec(o["trigger_price"]) != stop:
                modifies.append((o["id"], want[o["id"]], limit, stop))
        return self._finish(db, p, upd, orders, cancels, modifies)

    def _room(self, db: sqlite_utils.Database, key: str) -> tuple[bool, Optional[BrokerView], str]:
        """Whether a held exit may go now, and the read of the books it is capped by (flatten.closing_room): one begun
        once its stops had ended (each exit asks for its own). A read that failed, positions that cannot be read, or a
        read not done within read_wait_s is said, and the exit goes by the strategy's own position: a stop no
        longer rests, so it must go."""
        read, since = self.reading.setdefault(key, (f"protect:{key}:{next(self._reads)}", time.monotonic()))
        ready, view, why = self.books(read)
        if not ready:
            if time.monotonic() - since <= self.read_wait_s:
                return False, None, ""
            why = f"the broker's books were not read within {self.read_wait_s:g} s"
        self.reading.pop(key, None)
        if why:
            log.warning("the exit of %s held for its stop goes uncapped: %s", key, why)
            return True, None, f"; not capped at the broker's net: {why}"
        return True, view, ""

    def _broker_holds(self, db: sqlite_utils.Database, p: dict, view: Optional[BrokerView]) -> str:
        """After a held exit decided on a read of the books: where the broker holds less for this strategy than its
        own net, the stop covers no more than the broker holds (_stop_net). Words for the trader when it does;
        empty when the broker holds it all, or the books were not read."""
        if view is None or view.mark is None:
            return ""
        key = _row_key(p)
        self._held_caps[key] = (view.net.get((p["exchange"], p["symbol"], p["product"]), 0), view.mark,
                                time.monotonic())
        holds = self._stop_net(db, p, _net(db, p))
        if key not in self._held_caps:
            return ""
        self.outside_seen()
        return (f"; the broker holds {holds} of it (a trade in the broker's app not yet counted, or a fill not yet "
                f"heard of): no stop is placed for more until the host's book comes down to it, or "
                f"{HELD_CAP_S:g} s pass")

    def _stop_net(self, db: sqlite_utils.Database, p: dict, net: int) -> int:
        """The position the stop is sized to: its net, or less after a read of the books said the broker holds less
        (_broker_holds): the broker's net then, with the fills of every order made since (which that read could not
        see), less what the other strategies' books hold there now. At most HELD_CAP_S, and only while the host's
        book holds more than that."""
        key = _row_key(p)
        cap = self._held_caps.get(key)
        if cap is None:
            return abs(net)
        broker, mark, at = cap
        since = db.execute("select coalesce(sum(case side when 'BUY' then filled_qty else -filled_qty end), 0) from "
                           "orders where exchange = ? and symbol = ? and product = ? and rowid > ? and filled_qty > 0",
                           (p["exchange"], p["symbol"], p["product"], mark)).fetchone()[0]
        book = _instrument_book(db, p)
        others = sum(book.values()) - book.get(p["strategy"], 0)
        holds = max((1 if Side(p["side"]) is Side.BUY else -1) * (broker + since - others), 0)
        if holds >= abs(net) or time.monotonic() - at > HELD_CAP_S:
            del self._held_caps[key]
            return abs(net)
        return holds

    def _close_overshoot(self, db: sqlite_utils.Database, p: dict, where: str, over: int,
                         done: Callable[[str, str], tuple[Decision, list]]) -> tuple[Decision, list]:
        """Our stop filled after its position was closed (its cancel came too late): it opened a position nobody
        asked for. That part is exited at once, and said loudly."""
        ended, _ = done("a stop filled after the position was closed", "error")
        side = Side(p["side"])  # the overshoot is on the stop's side: closing it is the protected side again
        d = self.evaluate(db, p["strategy"], [Intent(p["exchange"], p["symbol"], side, over, OrderType.MKT,
                                                     Product(p["product"]), action=ExecutionType.EXIT)], None)
        if d.orders:
            db.execute(f"update orders set escalate = ? where id in ({','.join('?' * len(d.orders))})",
                       (flatten.HEALED, *d.orders))
        Storage.add_event(db, "stop_overfilled", f"a stop loss of {where} filled after its position was closed "
                          f"(its cancel came too late) and opened {over} the other way: that is exited at once "
                          f"({d.status.value}{': ' + d.reason if d.reason else ''})", "error", p["strategy"],
                          {"qty": over, "orders": list(d.orders)})
        return Decision(_accepted(), "stop overfilled", tuple(d.orders), tuple(ended.cancels) + tuple(d.cancels)), []

    def _finish(self, db: sqlite_utils.Database, p: dict, upd: dict, orders: list, cancels: list,
                modifies: list) -> tuple[Decision, list]:
        self._update(db, p, upd)
        return Decision(_accepted(), "protection", tuple(orders), tuple(dict.fromkeys(cancels))), modifies

    def _busy(self, o: dict) -> bool:
        """A ModifyOrder of this stop is on its way (until the row shows it, or MODIFY_WAIT_S passed)."""
        seen = self._modifying.get(o["id"])
        if seen is None:
            return False
        since, qty, trigger = seen
        if (o["qty"] == qty and dec(o["trigger_price"]) == trigger) or time.monotonic() - since > MODIFY_WAIT_S:
            self._modifying.pop(o["id"], None)
            return False
        return True

    @staticmethod
    def _update(db: sqlite_utils.Database, p: dict, upd: dict) -> None:
        if not upd:
            return
        upd["updated_at"] = utcnow()
        db.execute(f"update protections set {', '.join(f'{k} = ?' for k in upd)} where strategy = ? and "
                   f"exchange = ? and symbol = ? and product = ?",
                   (*upd.values(), p["strategy"], p["exchange"], p["symbol"], p["product"]))

    def _notice(self, db: sqlite_utils.Database, p: dict, stops: list[dict], net: int, where: str) -> None:
        """Say what happened to each stop once: resting, hit, cancelled by hand, rejected, expired."""
        for o in stops:
            state = o["noticed"] or 0
            text = f"{o['side']} {o['qty']} SL-LMT trigger {o['trigger_price']} limit {o['price']} (order {o['id']})"
            if state < 1 and o["status"] in WORKING:
                db.execute("update orders set noticed = 1 where id = ?", (o["id"],))
                Storage.add_event(db, "stop_placed", f"stop loss of {where} rests at the broker: {text}", "info",
                                  p["strategy"], {"order_id": o["id"], "trigger": o["trigger_price"],
                                                  "broker_order_id": o["broker_order_id"]})
            if state < 2 and _vanished(o):
                db.execute("update orders set noticed = 2, cancel_requested = coalesce(cancel_requested, ?) where "
                           "id = ?", ("LOST: replaced by a new stop; cancelled if it turns up", o["id"]))
                seen = "is gone from the broker's book" if o["broker_order_id"] else "never showed in the broker's book"
                Storage.add_event(db, "stop_missing", f"the stop loss of {where} {seen} ({text}): a new stop is "
                                  "placed" + ("" if net else " unless the position is flat") + ", and this one is "
                                  "cancelled if it turns up", "error", p["strategy"], {"order_id": o["id"]})
                continue
            if state >= 2 or not OrderStatus(o["status"]).terminal:
                continue
            db.execute("update orders set noticed = 2 where id = ?", (o["id"],))
            if o["status"] == "FILLED":
                Storage.add_event(db, "stop_hit", f"stop loss of {where} hit: {text} filled {o['filled_qty']} @ "
                                  f"{o['avg_price']}; no target exit is sent", "warning", p["strategy"],
                                  {"order_id": o["id"], "avg_price": o["avg_price"]})
            elif o["status"] == "CANCELLED" and not o["cancel_requested"]:
                # the broker may have closed the position too (its square-off cancels stops first): wait for
                # the next read of its books before placing a stop again
                self._arm_after(db, p, REARM_AFTER_OUTSIDE_CANCEL_S)
                again = (f"placed again in {REARM_AFTER_OUTSIDE_CANCEL_S:g} s unless the broker's books show the "
                         f"position closed" if net else "not placed again: the position is flat")
                Storage.add_event(db, "stop_cancelled_outside", f"the stop loss of {where} was cancelled at the "
                                  f"broker, not by the host ({text}): {again}", "error", p["strategy"],
                                  {"order_id": o["id"]})
            elif o["status"] in ("REJECTED", "EXPIRED"):
                failures = sum(1 for x in stops if x["status"] in ("REJECTED", "EXPIRED"))
                wait = min(REARM_AFTER_REJECT_S * 2 ** (failures - 1), REARM_MAX_S)  # 5, 10, 20 ... 300 s
                self._arm_after(db, p, wait)
                Storage.add_event(db, "stop_rejected" if o["status"] == "REJECTED" else "stop_expired",
                                  f"the stop loss of {where} ended {o['status']} ({o['reason']}): placed again in "
                                  f"{wait:g} s", "error" if o["status"] == "REJECTED" else "warning",
                                  p["strategy"], {"order_id": o["id"]})

    @staticmethod
    def _arm_after(db: sqlite_utils.Database, p: dict, wait_s: float) -> None:
        until = datetime.fromtimestamp(time.time() + wait_s, timezone.utc).isoformat()
        p["arm_after"] = until  # the row in hand too: it decides in this same step
        db.execute("update protections set arm_after = ? where strategy = ? and exchange = ? and symbol = ? "
                   "and product = ?", (until, p["strategy"], p["exchange"], p["symbol"], p["product"]))

    # ---- a strategy's MTM limits ----
    def _limits(self) -> None:
        for lim in self.storage.rows("select * from strategy_limits where status = 'armed'"):
            d = self.storage.write(lambda db, lim=lim: self._check_limit(db, lim))
            if d is not None and (d.orders or d.cancels):
                self.dispatch(d)

    def _check_limit(self, db: sqlite_utils.Database, lim: dict) -> Optional[Decision]:
        name = lim["strategy"]
        mtm = strategy_pnl(db, name) - Decimal(lim["base_pnl"])
        peak = max(Decimal(lim["peak"] or "0"), mtm)
        stoploss, target, step = dec(lim["stoploss"]), dec(lim["target"]), dec(lim["trailing_step"])
        floor = None
        if stoploss is not None:
            floor = -stoploss + ((peak / step).to_integral_value(ROUND_FLOOR) * step if step and peak > 0 else 0)
        hit = None
        if floor is not None and mtm <= floor:
            hit = ("strategy_stoploss", f"MTM {mtm} reached the strategy stop {floor}")
        elif target is not None and mtm >= target:
            hit = ("strategy_target", f"MTM {mtm} reached the strategy target {target}")
        if hit is None:
            if peak != Decimal(lim["peak"] or "0"):
                db.execute("update strategy_limits set peak = ? where strategy = ?", (str(peak), name))
            return None
        db.execute("update strategy_limits set status = 'hit', peak = ?, reason = ?, updated_at = ? where strategy = ?",
                   (str(peak), hit[1], utcnow(), name))
        Storage.add_event(db, f"{hit[0]}_hit", f"strategy {name}: {hit[1]}: all its positions are exited and its "
                          f"resting stops cancelled", "warning", name, {"mtm": str(mtm), "peak": str(peak)})
        # by risk, as its own strategy stop (within the broker's net, its exits moved and healed), with the hit
        pending_flattens.add(db, [pending_flattens.Pending(f"{hit[0]} of {name}", self.today(), strategy=name,
                                                           everything=True)])
        return Decision(_accepted(), hit[1])


def _instrument_book(db: sqlite_utils.Database, p: dict) -> dict[str, int]:
    """Every strategy's net in the position's instrument, as the host's book has it."""
    return {r[0]: r[1] for r in db.execute("select strategy, net_qty from positions where exchange = ? and symbol = ? "
                                           "and product = ? and net_qty != 0", (p["exchange"], p["symbol"],
                                                                                p["product"]))}


def _net(db: sqlite_utils.Database, p: dict) -> int:
    row = db.execute("select net_qty from positions where strategy = ? and exchange = ? and symbol = ? and "
                     "product = ?", (p["strategy"], p["exchange"], p["symbol"], p["product"])).fetchone()
    return row[0] if row else 0


def _accepted() -> Any:
    from .models import AlertStatus
    return AlertStatus.ACCEPTED


# ---------------------------------------------------------------- what the API and the pages show

def _not_done(storage: Storage) -> list[dict]:
    """The protections still at work, oldest first (read through the status index: ended ones cost nothing)."""
    return storage.rows(f"select * from protections where status in ({','.join('?' * len(NOT_DONE))}) "
                        f"order by created_at", NOT_DONE)


def position_fields(storage: Storage) -> dict[tuple, dict]:
    """Per position (strategy, exchange, symbol, product): its stop, target, trail level and resting stop order."""
    out: dict[tuple, dict] = {}
    for p in _not_done(storage):
        spec = json.loads(p["spec"] or "{}")
        key = _row_key(p)
        resting = [o for o in storage.rows(f"select id, broker_order_id, status, qty, filled_qty, trigger_price, "
                                           f"price from orders where protection = ? and status in "
                                           f"({','.join('?' * len(LIVE))}) order by rowid", (key, *LIVE))
                   if not _vanished(o)]
        out[(p["strategy"], p["exchange"], p["symbol"], p["product"])] = {
            "stop_loss": dec(p["stop"]), "target": dec(p["target"]),
            "trailing": ({"type": spec["trailing_type"], "value": dec(spec.get("trailing_value")),
                          "activation_price": dec(spec.get("trailing_activation_price")),
                          "active": bool(p["trail_active"]), "best_price": dec(p["best"]),
                          "level": dec(p["stop"]) if p["trail_active"] else None}
                         if spec.get("trailing_type") else None),
            "protection_status": p["status"],
            "stop_orders": [{"id": o["id"], "broker_order_id": o["broker_order_id"], "status": o["status"],
                             "qty": o["qty"] - (o["filled_qty"] or 0), "trigger_price": dec(o["trigger_price"]),
                             "price": dec(o["price"])} for o in resting]}
    return out


def strategy_limit_records(storage: Storage) -> list[dict]:
    return [{"strategy": r["strategy"], "stoploss": dec(r["stoploss"]), "target": dec(r["target"]),
             "trailing_step": dec(r["trailing_step"]), "status": r["status"], "reason": r["reason"]}
            for r in storage.rows("select * from strategy_limits order by strategy")]
