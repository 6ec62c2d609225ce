"""Position-target alerts: bring a strategy's own position in a symbol to a signed target.

Only the difference is sent, through the guard and risk: a reduction as an EXIT (allowed while
reduce-only or halted), an addition as an ADJUST (an entry to risk). The newest target wins: the
strategy's working orders in that symbol are cancelled first (a NEW one before it is ever sent), and the
target is planned again once they are done. A reversal exits first and enters only after the exit has
filled. What waits is kept in `position_targets`, so a restart carries on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Optional

import sqlite_utils

from . import flatten
from .models import AlertStatus, Decision, ExecutionType, Intent, OrderStatus, OrderType, Product, Side, TargetLeg
from .storage import Storage, dec, utcnow

WAITING = "waiting"
REVERSAL = "reversal"  # waits for its exits to fill; if one does not, the entry is not sent
REPLAN = "replan"      # waits for cancelled orders to finish, whatever they did, then plans again
Evaluate = Callable[[sqlite_utils.Database, str, list[Intent], Optional[str]], Decision]


@dataclass(frozen=True)
class TargetPlan:
    """What one target needs now, what it waits for, and the words for the trail (or why it cannot be)."""

    intents: tuple[Intent, ...] = ()
    stop: tuple[dict, ...] = ()      # working orders of the strategy in the symbol, to cancel first
    wait: Optional[str] = None       # REVERSAL or REPLAN
    hasten: tuple[str, ...] = ()     # resting exits to move towards the market (a market target reached by them)
    note: str = ""
    problem: Optional[str] = None


def _signed(n: int) -> str:
    return f"{n:+d}" if n else "flat"


def _working(db: sqlite_utils.Database, strategy: str, leg: TargetLeg) -> list[dict]:
    """The strategy's unfinished orders in the symbol, its resting stops aside (an EXIT cancels those first)."""
    return list(db.query(f"select * from orders where strategy = ? and exchange = ? and symbol = ? and protection "
                         f"is null and status in ({','.join('?' * len(flatten.OPEN_STATUSES))}) order by rowid",
                         (strategy, leg.exchange, leg.symbol, *flatten.OPEN_STATUSES)))


def plan(db: sqlite_utils.Database, strategy: str, leg: TargetLeg, fresh: bool = False) -> TargetPlan:
    """The orders that take the strategy's own position in the leg's symbol and product to the target.

    A fresh market target (a POSITION alert) the strategy's working orders already reach moves its resting exits
    (stops, limits) towards the market until they fill, and cancels a resting entry, to plan again at market: the
    trader asked to be there now."""
    where = f"{leg.exchange}:{leg.symbol}"
    held = {r["product"]: r["net_qty"] for r in db.query(
        "select product, net_qty from positions where strategy = ? and exchange = ? and symbol = ? and net_qty != 0",
        (strategy, leg.exchange, leg.symbol))}
    working = _working(db, strategy, leg)
    others = sorted(({p for p in held if p != leg.product.value} | {o["product"] for o in working})
                    - {leg.product.value})
    if others:
        return TargetPlan(problem=f"{where}: strategy {strategy} holds or works this symbol in product "
                                  f"{'/'.join(others)}, and the target names {leg.product.value}: send the target "
                                  f"with product_type {others[0]}, or close that position first")
    net = held.get(leg.product.value, 0)
    projected = net + sum(Side(o["side"]).sign * (o["qty"] - (o["filled_qty"] or 0)) for o in working)
    if working:
        resting = [o for o in working if o["order_type"] != OrderType.MKT.value] \
            if fresh and leg.order_type is OrderType.MKT else []
        exits = [o for o in resting if net and o["action"] != ExecutionType.ENTRY.value
                 and (o["side"] == Side.SELL.value) == (net > 0)]
        same_price = len(exits) == len(resting) if leg.order_type is OrderType.MKT else \
            all(dec(o["price"]) == leg.price for o in working)  # (a resting entry under a market target: planned again)
        if projected == leg.target and same_price:
            hasten = tuple(o["id"] for o in exits if not o["escalate"] and not o["cancel_requested"])
            moving = f"; {len(hasten)} resting exit(s) moved towards the market until they fill" if hasten else ""
            return TargetPlan(note=f"{where}: already at target {_signed(leg.target)} ({_signed(net)} filled, "
                                   f"{_signed(projected - net)} working); nothing sent{moving}", hasten=hasten)
        return TargetPlan(stop=tuple(working), wait=REPLAN,
                          note=f"{where}: target {_signed(leg.target)}; {len(working)} working order(s) cancelled "
                               f"first, then planned again from the filled position")
    twin = ""
    if not net:  # an alert meant for a strategy whose name differs only in case says so, whatever it asks
        from .decide import name_twin  # (decide builds on targets)
        twin = name_twin(db, strategy, leg.exchange, leg.symbol, where)
    if net == leg.target:
        return TargetPlan(note=f"{where}: already at target {_signed(leg.target)}; nothing sent{twin}")
    delta = leg.target - net
    side = Side.BUY if delta > 0 else Side.SELL
    reduce = min(abs(delta), abs(net)) if net and (net > 0) != (delta > 0) else 0
    add = abs(delta) - reduce

    def intent(qty: int, action: ExecutionType) -> Intent:
        return Intent(leg.exchange, leg.symbol, side, qty, leg.order_type, leg.product, leg.price, action=action)
    words = [f"{where}: from {_signed(net)} to {_signed(leg.target)}"]
    if reduce and add:
        return TargetPlan((intent(reduce, ExecutionType.EXIT),), wait=REVERSAL, note="; ".join(
            words + [f"exit {reduce} now", f"the entry of {add} {side.value} is sent once the exit has filled"]))
    if reduce:
        return TargetPlan((intent(reduce, ExecutionType.EXIT),), note="; ".join(words + [f"exit {reduce} now"]))
    return TargetPlan((intent(add, ExecutionType.ADJUST),),
                      note="; ".join(words + [f"{'enter' if not net else 'add'} {add} {side.value}{twin}"]))


def supersede(db: sqlite_utils.Database, strategy: str, symbols: set[tuple[str, str]], by_alert: str) -> None:
    """Newer alerts win: waiting targets of this strategy in these symbols are dropped (not the alert's own)."""
    for ex, sym in symbols:
        db.execute("update position_targets set status = 'superseded', reason = ?, decided_at = ? where "
                   "status = ? and strategy = ? and exchange = ? and symbol = ? and alert_id != ?",
                   (f"superseded by alert {by_alert}", utcnow(), WAITING, strategy, ex, sym, by_alert))


def store_waiting(db: sqlite_utils.Database, alert_id: str, strategy: str, leg: TargetLeg, kind: str,
                  after: list[str]) -> None:
    db["position_targets"].insert({
        "alert_id": alert_id, "strategy": strategy, "exchange": leg.exchange, "symbol": leg.symbol,
        "product": leg.product.value, "order_type": leg.order_type.value,
        "price": None if leg.price is None else str(leg.price), "target": leg.target, "kind": kind,
        "after": json.dumps(after), "status": WAITING, "created_at": utcnow()})


def leg_of(row: dict) -> TargetLeg:
    """A stored waiting target as a TargetLeg."""
    return TargetLeg(row["exchange"], row["symbol"], Product(row["product"]), OrderType(row["order_type"]),
                     row["target"], dec(row["price"]))


def _apply(db: sqlite_utils.Database, alert_id: str, strategy: str, plans: list[tuple[TargetLeg, TargetPlan]],
           evaluate: Evaluate) -> Decision:
    """Cancel what the plans stop, evaluate what they send (all or nothing), and store what waits."""
    problems = [p.problem for _, p in plans if p.problem]
    if problems:
        return Decision(AlertStatus.REJECTED, "; ".join(problems))
    decision = evaluate(db, strategy, [i for _, p in plans for i in p.intents], alert_id)
    if decision.status is not AlertStatus.ACCEPTED:
        return decision
    cancels = list(decision.cancels)
    for leg, p in plans:
        flatten.mark_escalate(db, list(p.hasten), flatten.HEALED)
        if p.wait is None:
            continue
        stopped = flatten.stop(db, list(p.stop), f"a newer target for {leg.exchange}:{leg.symbol}")
        cancels += stopped.working
        after = stopped.pending if p.wait == REPLAN else [
            r["id"] for r in db.query(f"select id from orders where id in ({','.join('?' * len(decision.orders))}) "
                                      f"and exchange = ? and symbol = ?", (*decision.orders, leg.exchange, leg.symbol))]
        store_waiting(db, alert_id, strategy, leg, p.wait, after)
    words = "; ".join([p.note for _, p in plans] + ([decision.reason] if decision.reason else []))
    return Decision(decision.status, words, decision.orders, tuple(dict.fromkeys(cancels)))


def decide(db: sqlite_utils.Database, alert_id: str, strategy: str, legs: tuple[TargetLeg, ...],
           evaluate: Evaluate) -> Decision:
    """A POSITION alert: supersede what waited, then plan each leg from the strategy's own book."""
    supersede(db, strategy, {(t.exchange, t.symbol) for t in legs}, alert_id)
    return _apply(db, alert_id, strategy, [(leg, plan(db, strategy, leg, fresh=True)) for leg in legs], evaluate)


def _blocking(db: sqlite_utils.Database, row: dict) -> tuple[bool, Optional[str]]:
    """(still waiting, why it cannot go on): the orders it waits for, unfinished or (a reversal's exit) unfilled."""
    ids = json.loads(row["after"] or "[]")
    if not ids:
        return False, None
    orders = list(db.query(f"select id, status, reason, filled_qty, qty from orders where id in "
                           f"({','.join('?' * len(ids))})", ids))
    if any(not OrderStatus(o["status"]).terminal for o in orders):
        return True, None
    failed = [o for o in orders if o["status"] != OrderStatus.FILLED.value]
    if failed and row["kind"] == REVERSAL:
        o = failed[0]
        return False, (f"the exit {o['id']} ended {o['status']} ({o['filled_qty']} of {o['qty']} filled"
                       f"{': ' + o['reason'] if o['reason'] else ''}): the entry was not sent")
    return False, None


def ready(db: sqlite_utils.Database, row: dict, max_age_s: float) -> bool:
    """Whether a waiting target can be decided now (what it waits for is done, or it waited too long)."""
    waiting, _ = _blocking(db, row)
    return not waiting or datetime.now(timezone.utc) - datetime.fromisoformat(row["created_at"]) > \
        timedelta(seconds=max_age_s)


def release(db: sqlite_utils.Database, row: dict, evaluate: Evaluate, max_age_s: float) -> Decision:
    """Decide a waiting target whose wait is over: plan it again and send, or drop it with the reason."""
    waiting, why = _blocking(db, row)
    if waiting:
        why = f"what it waited for did not finish within ALERT_MAX_AGE_S={max_age_s:g} s: nothing more was sent"
    leg = leg_of(row)
    if why:
        decision = Decision(AlertStatus.REJECTED, why)
    else:
        decision = _apply(db, row["alert_id"], row["strategy"], [(leg, plan(db, row["strategy"], leg))], evaluate)
    sent = decision.status is AlertStatus.ACCEPTED
    reason = decision.reason if sent else f"{decision.status.value}: {decision.reason}"
    db.execute("update position_targets set status = ?, reason = ?, decided_at = ? where id = ?",
               ("sent" if sent else "dropped", reason, utcnow(), row["id"]))
    alert = db.execute("select orders, reason from alerts where id = ?", (row["alert_id"],)).fetchone()
    if alert is not None:
        db.execute("update alerts set orders = ?, reason = ? where id = ?",
                   (json.dumps(json.loads(alert[0] or "[]") + list(decision.orders)),
                    f"{alert[1] or ''}; then: {reason}"[:2000], row["alert_id"]))
    Storage.add_event(db, "position_target", f"alert {row['alert_id']} ({row['strategy']}) target "
                      f"{row['exchange']}:{row['symbol']} {_signed(row['target'])}: {reason}",
                      "info" if sent else "warning", row["strategy"],
                      {"alert_id": row["alert_id"], "orders": list(decision.orders)})
    return decision if sent else Decision(decision.status, decision.reason)
