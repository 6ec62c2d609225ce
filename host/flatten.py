"""Flattening: what a breach, an exit-all, a strategy's stop and the square-off do.

1. Every order that would add exposure is stopped, whatever its state: a NEW one is cancelled before
   it is sent (the sender only sends what is still NEW), a working one is cancelled at the broker, and
   one whose broker id is not known yet (SUBMITTED, UNKNOWN, LOST) is marked `cancel_requested` and
   cancelled as soon as the id is known.
2. Each open position is exited on its own, so one unexitable leg never blocks the others.
3. The exits never take the account's net position at the broker past what the other strategies hold on the
   other side in that symbol (past zero, when none does): a position closed in the broker's app is not sold twice,
   and a strategy whose position another strategy's offsets at the account can still exit its own.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Callable, Collection, Mapping, Optional

import sqlite_utils

from .models import AlertStatus, BrokerView, ExecutionType, Intent, OrderStatus, OrderType, Product, Side
from .orders import transition
from .storage import Storage, dec, utcnow
from .watcher import move_position

log = logging.getLogger(__name__)

OPEN_STATUSES = ("NEW", "SUBMITTED", "UNKNOWN", "OPEN", "PARTIAL")
MANUAL = "manual"  # the strategy of trades made outside the host that closed no strategy's position
HEALED = 2  # orders.escalate of the exits risk heals: exit-all's, a strategy's stop's, the square-off's, protect's (a
# target's, a hit stop's, a strategy MTM stop's); made oversized, one is cancelled and its position exited after (1:
# the day's breach's, healed while the breach stands)
WORKING = (OrderStatus.OPEN.value, OrderStatus.PARTIAL.value)
DOUBT = "the broker's books did not settle"  # a cut that may be wrong: said in the answer and as an event


@dataclass
class Stopped:
    """Orders stopped by one cancel pass: cancelled before sending, being cancelled at the broker, or marked."""

    cancelled_new: int = 0
    working: list[str] = field(default_factory=list)   # cancel at the broker now
    pending: list[str] = field(default_factory=list)   # every stopped order that may still fill (working + marked)


@dataclass(frozen=True)
class Bound:
    """The most a follow-up exits of one position: no more than it `held` on the side the cancelled exit (`side`)
    closed; after that exit filled past zero (the position reversed), no more than it could overfill (`over`).
    None: no bound of that kind (the position as it is, within the broker's net)."""

    side: Optional[str] = None
    held: Optional[int] = None
    over: Optional[int] = None

    def most(self, net: int) -> Optional[int]:
        closing = "SELL" if net > 0 else "BUY"
        return self.held if self.side is None or closing == self.side else self.over


@dataclass(frozen=True)
class Flattened:
    orders: tuple[str, ...]
    cancels: tuple[str, ...]
    cancelled_new: int
    left: tuple[str, ...]  # positions left alone, with why
    failed: tuple[tuple[tuple[str, str, str, str], str], ...] = ()  # positions whose exit failed: (key, why)


def adding_orders(db: sqlite_utils.Database, strategy: Optional[str] = None, exchange: Optional[str] = None,
                  symbol: Optional[str] = None) -> list[dict]:
    """Unfinished orders (LOST ones too: they may yet be booked) that would add to their strategy's position."""
    where, args = ["o.status in (?, ?, ?, ?, ?, ?)"], [*OPEN_STATUSES, OrderStatus.LOST.value]
    for column, value in (("strategy", strategy), ("exchange", exchange), ("symbol", symbol)):
        if value is not None:
            where.append(f"o.{column} = ?")
            args.append(value)
    out = []
    for o in db.query(f"select o.*, coalesce(p.net_qty, 0) net from orders o left join positions p on "
                      f"p.strategy = o.strategy and p.exchange = o.exchange and p.symbol = o.symbol and "
                      f"p.product = o.product where {' and '.join(where)} order by o.rowid", args):
        reducing = o["net"] != 0 and (o["side"] == "SELL") == (o["net"] > 0) and o["action"] != "ENTRY"
        if not reducing:
            out.append(o)
    return out


def stop(db: sqlite_utils.Database, orders: list[dict], why: str) -> Stopped:
    """Stop these unfinished orders, whatever their state (see the module's first rule)."""
    stopped = Stopped()
    for o in orders:
        if o["status"] == OrderStatus.NEW.value:
            stopped.cancelled_new += transition(db, o["id"], OrderStatus.CANCELLED, why,
                                                reason=f"cancelled before sending: {why}")
            continue
        stopped.pending.append(o["id"])
        if o["status"] in WORKING and o["broker_order_id"]:
            stopped.working.append(o["id"])
        db.execute("update orders set cancel_requested = ? where id = ? and cancel_requested is null", (why, o["id"]))
    return stopped


def mark_escalate(db: sqlite_utils.Database, ids: list[str], mark: int = 1) -> None:
    """These exits move towards the market until they fill (RiskLoop.escalate); `mark` says whose they are
    (HEALED: risk heals them, and exits the rest of the position after cancelling one grown oversized)."""
    if ids:
        db.execute(f"update orders set escalate = ? where id in ({','.join('?' * len(ids))})", (mark, *ids))


def cancel_adding(db: sqlite_utils.Database, why: str, product: Optional[str] = None, **scope: Optional[str]) -> Stopped:
    """Stop every order that adds exposure in the scope (strategy, exchange, symbol), whatever its state."""
    return stop(db, [o for o in adding_orders(db, **scope) if product is None or o["product"] == product], why)


def _cross(db: sqlite_utils.Database, held: list[dict], why: str) -> tuple[list[dict], list[tuple]]:
    """Strategies long and short the same instrument offset each other at the account: close them against
    each other at the last price (no broker order can). Returns the positions still to exit, and those crossed."""
    by_key: dict[tuple, list[dict]] = {}
    for p in held:
        by_key.setdefault((p["exchange"], p["symbol"], p["product"]), []).append({**p, "was": p["net_qty"]})
    for (ex, sym, prod), rows in by_key.items():
        longs = [p for p in rows if p["net_qty"] > 0]
        shorts = [p for p in rows if p["net_qty"] < 0]
        qty = min(sum(p["net_qty"] for p in longs), -sum(p["net_qty"] for p in shorts))
        if qty <= 0:
            continue
        quote = db.execute("select ltp from quotes where exchange = ? and symbol = ?", (ex, sym)).fetchone()
        price = Decimal(quote[0]) if quote else dec(longs[0]["avg_price"]) or Decimal("0")
        for group, side in ((longs, Side.SELL), (shorts, Side.BUY)):
            left = qty
            for p in group:
                take = min(left, abs(p["net_qty"]))
                move_position(db, (p["strategy"], ex, sym, prod), side, take, price)
                p["net_qty"] += side.sign * take
                left -= take
        Storage.add_event(db, "internal_cross", f"{why}: {qty} {ex}:{sym} ({prod}) held long by "
                          f"{', '.join(p['strategy'] for p in longs)} and short by "
                          f"{', '.join(p['strategy'] for p in shorts)} offset at the account: closed against each "
                          f"other at {price}, no broker order", "warning", None, {"qty": qty, "price": str(price)})
    crossed = [(p["strategy"], p["exchange"], p["symbol"], p["product"]) for rows in by_key.values() for p in rows
               if p["net_qty"] != p["was"]]
    return [p for rows in by_key.values() for p in rows if p["net_qty"]], crossed


@dataclass(frozen=True)
class Room:
    """How far new exits may take the account's net towards zero, per instrument; and our exits there whose
    fills the two reads of the book could not place before or after the read of the positions."""

    left: dict[tuple, int]
    unsure: dict[tuple, tuple[str, ...]]
    net: dict[tuple, int] = field(default_factory=dict)  # the broker's net as read, before our working exits

    def doubt(self, key: tuple) -> str:
        """What a cut in this instrument may be wrong about, for the trader; empty when the books were clear."""
        ids = self.unsure.get(key)
        return (f"; {DOUBT} whether our exit {', '.join(ids)} has filled: if it has, the position is still open, "
                f"so send the EXIT again (a new alert: the same body within DEDUPE_WINDOW_S is a duplicate) or use "
                f"exit-all") if ids else ""


_EXITS = "action != 'ENTRY' and protection is null"  # our exits that close a position (resting stops aside)


def exits_now(db: sqlite_utils.Database) -> tuple[int, dict[str, int]]:
    """Taken as a read of the broker's books begins: the last order's rowid, and our unfinished exits with what
    they had filled (models.BrokerView)."""
    mark = db.execute("select coalesce(max(rowid), 0) from orders").fetchone()[0]
    return mark, {r["id"]: r["filled_qty"] or 0 for r in db.query(
        f"select id, filled_qty from orders where {_EXITS} and status in ({','.join('?' * len(OPEN_STATUSES))})",
        OPEN_STATUSES)}


def _left_to_fill(o: dict, before: Optional[dict], after: Optional[dict],
                  view: Optional[BrokerView] = None) -> tuple[int, bool]:
    """What an unfinished exit of ours may still fill that the positions, read between the two book reads, do not
    show; and whether the books make that sure. When unsure, the larger figure: an exit cut short, never a short."""
    b = before.get(o["id"]) if before is not None else None
    a = after.get(o["id"]) if after is not None else None
    # fills surely in the net: those the book showed before the positions were read, else those our row had
    # when the reads began (it may have heard of more since; one made since, decided while they ran, had none)
    then = None if view is None or view.mark is None else \
        0 if o["rowid"] > view.mark else view.exits_then.get(o["id"])
    base = b.filled_qty if b is not None else then if then is not None else (o["filled_qty"] or 0)
    # an exit ended since fills no more: what it filled is all it can take off the net (unless a read of the
    # book showed it working: the books, not a message heard first, say whether it ended)
    ended = OrderStatus(o["status"]).terminal and not any(x is not None and not x.status.terminal for x in (b, a))
    left = max(((o["filled_qty"] or 0) if ended else o["qty"]) - base, 0)
    if o["status"] == OrderStatus.NEW.value:
        return left, True  # never sent
    if before is None or after is None:
        return left, False  # a book unread: our row is all there is
    if b is not None and b.status.terminal:
        return 0, True  # ended before the positions were read: its fills are in the net
    if a is None:  # not booked by the second read: nothing of it filled (unless it left the book: unsure)
        return left, b is None and o["status"] not in WORKING
    if a.filled_qty <= base:  # no fill between the reads: the positions saw what the books saw
        return (0 if a.status.terminal else left), (o["filled_qty"] or 0) <= base  # unless we heard of more
    return left, False  # filled between the reads: before the positions read, or after it


def closing_room(db: sqlite_utils.Database, view: Optional[BrokerView],
                 skip: Collection[str] = ()) -> Optional[Room]:
    """The broker's net, less what our exits already working or queued there close when they fill: how far new
    exits may still take the account towards zero. None without a fresh read of the broker's positions.

    The book is read before and after the positions (OutsideTrades.read_for_exits); an exit ended before is not
    counted, one whose fill the reads cannot place is counted in full, so an exit may come out short (the notes
    say so) but never takes the account past zero. Resting stops are left out: their position's exit is sent only
    once the stop's cancel is confirmed (protect.split_exits)."""
    if view is None:
        return None
    left, unsure = dict(view.net), {}
    before = {o.remarks: o for o in view.before if o.remarks} if view.before is not None else None
    after = {o.remarks: o for o in view.after if o.remarks} if view.after is not None else None
    # an exit the first read showed working counts even if its row ended since: its fill may postdate the positions
    # so does one unfinished as the reads began, or made since: the host may have heard of its fills meanwhile
    seen = [r for r, o in (before or {}).items() if not o.status.terminal] + list(view.exits_then)
    named = f" union select rowid from orders where id in ({','.join('?' * len(seen))})" if seen else ""
    since = "" if view.mark is None else " union select rowid from orders where rowid > ?"
    # (each part by its own index: an OR of them read every order ever made)
    for o in db.query(f"select rowid, id, exchange, symbol, product, side, qty, filled_qty, status from orders "
                      f"where {_EXITS} and rowid in (select rowid from orders where status in "
                      f"({','.join('?' * len(OPEN_STATUSES))}){named}{since}) order by rowid",
                      (*OPEN_STATUSES, *seen, *(() if view.mark is None else (view.mark,)))):
        key = (o["exchange"], o["symbol"], o["product"])
        net = left.get(key, 0)
        if o["id"] in skip or not net or (net > 0) != (o["side"] == Side.SELL.value):
            continue
        qty, sure = _left_to_fill(o, before, after, view)
        if qty and not sure:
            unsure[key] = unsure.get(key, ()) + (o["id"],)
        left[key] = net - (1 if net > 0 else -1) * min(abs(net), qty)
    return Room(left, unsure, dict(view.net))


@dataclass(frozen=True)
class Across:
    """What the other strategies hold long and short in one instrument, and why it is not counted (empty: it is)."""

    longs: int = 0
    shorts: int = 0
    not_counted: str = ""

    def usable(self) -> tuple[int, int]:
        return (0, 0) if self.not_counted else (self.longs, self.shorts)

    def words(self, side: Side) -> str:
        """For a cap note: the other strategies' holdings an exit on `side` counted, or left out and why."""
        held = self.shorts if side is Side.SELL else self.longs
        if not held:
            return ""
        return f"; other strategies' {held:+d} there is not counted ({self.not_counted})" if self.not_counted \
            else f" and other strategies hold {held:+d} there"


def across(db: sqlite_utils.Database, strategy: str, key: tuple, room: Optional[Room]) -> Across:
    """The longs and shorts that strategies other than `strategy` hold in the instrument `key` (exchange, symbol,
    product), which its exit may take the account's net past zero by; not counted (the account's zero is the bound)
    unless the host's book explains the broker's net there whole and no trade outside the host ever touched the
    instrument (a contract: its life). A sale in the broker's app is booked to a strategy by a guess
    (outside.allocate): with two strategies long, the one it shrank may not be the one the trader closed, and that
    one's exit must not sell it again, that day or any later one."""
    if room is None:
        return Across()
    row = db.execute("select coalesce(sum(max(net_qty, 0)), 0), coalesce(sum(min(net_qty, 0)), 0) from positions "
                     "where exchange = ? and symbol = ? and product = ? and strategy not in (?, ?) and net_qty != 0",
                     (*key, strategy, MANUAL)).fetchone()
    if not any(row):
        return Across()
    held = db.execute("select coalesce(sum(net_qty), 0) from positions where exchange = ? and symbol = ? and "
                      "product = ?", key).fetchone()[0]
    net = room.net.get(key, 0)  # (no row at the broker: flat)
    if held != net:
        why = (f"the host's book there adds up to {held:+d} and the broker's net to {net:+d}: a fill not yet heard "
               f"of, or a trade in the broker's app not yet booked")
    elif db.execute("select 1 from outside_fills where exchange = ? and symbol = ? and product = ? limit 1",
                    key).fetchone():
        why = "a trade outside the host touched this contract, and which strategy's position it closed is a guess"
    else:
        why = ""
    return Across(row[0], row[1], why)


def closable(net: int, side: Side, across: Across = Across()) -> int:
    """How much an exit on `side` may close at the broker, whose net (less the exits working there) is `net`: a sale
    down to the other strategies' shorts, a buy up to their longs (to zero, when none holds any or they are not
    counted). Two strategies long and short 75 leave the account flat, and each can still exit its own 75."""
    longs, shorts = across.usable()
    return max(net - shorts, 0) if side is Side.SELL else max(longs - net, 0)


def cap_exits(intents: list[Intent], room: Optional[Room],
              across: Callable[[tuple], Across] = lambda key: Across()) -> tuple[list[Intent], list[str]]:
    """Exits and reductions (one for one) cut down so that none takes the account's net at the broker past what the
    other strategies hold on the other side (`across`; a position closed outside a moment ago); the notes say so. No
    cap without a fresh read of the broker's positions."""
    if room is None:
        return intents, []
    out, notes, left = [], [], dict(room.left)
    for i in intents:
        key = (i.exchange, i.symbol, i.product.value)
        if i.action is ExecutionType.ENTRY:
            out.append(i)
            continue
        net, others = left.get(key, 0), across(key)
        qty = min(i.qty, closable(net, i.side, others))
        if qty < i.qty:
            notes.append(f"{i.exchange}:{i.symbol} exit capped from {i.qty} to {qty}: the broker's net, less the "
                         f"exits already working there, is {net:+d}{others.words(i.side)}{room.doubt(key)}")
        out.append(replace(i, qty=qty))  # 0: nothing left to close at the broker (the caller drops it)
        left[key] = net + (qty if i.side is Side.BUY else -qty)
    return out, notes


def cap_unsent_exits(db: sqlite_utils.Database, order_ids: list[str], room: Room) -> list[str]:
    """Exits and reductions stored and never sent (a restart, a login after the session ended), cut down as
    cap_exits does when they are sent late, and to what their strategy still holds: the trader may have closed the
    position in the broker's app meanwhile. One cut to nothing is rejected; the orders still to send, in order."""
    rows = {r["id"]: r for r in db.query(f"select * from orders where id in ({','.join('?' * len(order_ids))})",
                                         tuple(order_ids))}
    left, keep, own = dict(room.left), [], {}
    for oid in order_ids:
        o = rows.get(oid)
        if o is None or o["action"] == ExecutionType.ENTRY.value:
            keep.append(oid)
            continue
        key, side = (o["exchange"], o["symbol"], o["product"]), Side(o["side"])
        own_key = (o["strategy"], *key)
        if own_key not in own:
            row = db.execute("select net_qty from positions where strategy = ? and exchange = ? and symbol = ? and "
                             "product = ?", own_key).fetchone()
            own[own_key] = row[0] if row else 0
        if o["action"] != ExecutionType.EXIT.value and not closable(own[own_key], side) \
                and not _sold_outside_since(db, key, side, o["created_at"]):
            keep.append(oid)  # an ADJUST that adds (nothing outside took the position it may have reduced)
            continue
        net, others = left.get(key, 0), across(db, o["strategy"], key, room)
        qty = min(o["qty"], closable(net, side, others), closable(own[own_key], side))
        if qty == o["qty"]:
            own[own_key] += side.sign * qty
            left[key] = net + side.sign * qty
            keep.append(oid)
            continue
        why = (f"not sent late: strategy {o['strategy']} now holds {own[own_key]:+d} in {o['exchange']}:{o['symbol']}, "
               f"and the broker's net there, less the exits already working, is {net:+d}{others.words(side)}; "
               f"so this {o['action']} is cut from {o['qty']} to {qty}" + (" and not sent" if not qty else "")
               + room.doubt(key))
        own[own_key] += side.sign * qty
        left[key] = net + side.sign * qty
        if qty:
            db.execute("update orders set qty = ? where id = ? and status = 'NEW'", (qty, oid))
            Storage.insert(db, "order_history", {"order_id": oid, "at": utcnow(), "status": "NEW", "detail": why})
            keep.append(oid)
        else:
            transition(db, oid, OrderStatus.REJECTED, why, reason=why)
        Storage.add_event(db, "exit_capped", f"order {oid} ({o['strategy']}): {why}", "warning", o["strategy"],
                          {"order_id": oid, "qty": qty})
    return keep


def _sold_outside_since(db: sqlite_utils.Database, key: tuple, side: Side, since: str) -> bool:
    """A trade outside the host on `side` in the instrument since `since`: an ADJUST decided before it to reduce a
    position (now gone) would open one the other way if it were sent as it is."""
    return db.execute("select 1 from outside_fills where exchange = ? and symbol = ? and product = ? and side = ? "
                      "and at >= ? limit 1", (*key, side.value, since)).fetchone() is not None


def flatten(db: sqlite_utils.Database, why: str, evaluate: Callable[[sqlite_utils.Database, str, list[Intent]], object],
            broker: Optional[Room], strategy: Optional[str] = None, product: Optional[str] = None,
            skip: Callable[[dict], Optional[str]] = lambda p: None, quiet: bool = False,
            only: Optional[Mapping[tuple[str, str, str, str], Bound]] = None) -> Flattened:
    """Stop adding orders and exit each open position (all, one strategy's, or one product's). With `only`
    ((strategy, exchange, symbol, product) -> its Bound: risk's follow-up of cancelled oversized exits), exit just
    those positions, each within its bound."""
    if only is None:
        stopped = cancel_adding(db, why, product=product, strategy=strategy)
        # a position target waiting to enter (a reversal's second half) must not enter after a flatten
        db.execute("update position_targets set status = 'superseded', reason = ?, decided_at = ? where status = "
                   "'waiting' and (? is null or strategy = ?) and (? is null or product = ?)",
                   (f"dropped: {why}", utcnow(), strategy, strategy, product, product))
    else:  # what adds was stopped by the exit-all itself; what was sent since is the trader's
        stopped = Stopped()
    created: list[str] = []
    cancels = list(stopped.working)
    left: list[str] = []
    failed: list[tuple[tuple[str, str, str, str], str]] = []
    waiting: list[str] = []  # exits held until their resting stop's cancel is confirmed
    room = dict(broker.left) if broker is not None else {}  # how far the account may still go towards zero
    held = [p for p in db.query("select * from positions where net_qty != 0 order by strategy, exchange, symbol")
            if (strategy is None or p["strategy"] == strategy) and (product is None or p["product"] == product)
            and (only is None or (p["strategy"], p["exchange"], p["symbol"], p["product"]) in only)]
    if strategy is None:
        from .protect import cancel_stops  # (protect builds on flatten)
        held, crossed = _cross(db, held, why)
        cancels += cancel_stops(db, crossed, f"{why}: the position was closed against another strategy's")
    for p in held:
        key = (p["exchange"], p["symbol"], p["product"])
        where = f"{p['strategy']} {p['exchange']}:{p['symbol']} ({p['product']}) {p['net_qty']:+d}"
        reason = skip(p)
        if reason:
            left.append(f"{where}: {reason}")
            continue
        qty = abs(p["net_qty"])
        most = only[(p["strategy"], p["exchange"], p["symbol"], p["product"])].most(p["net_qty"]) if only else None
        if most is not None:  # what was bought or sold since is the trader's
            qty = min(qty, most)
        if broker is not None:  # never past the broker's net: a position closed outside is not sold twice
            qty = min(qty, closable(room.get(key, 0), Side.SELL if p["net_qty"] > 0 else Side.BUY,
                                    across(db, p["strategy"], key, broker)))
        if qty == 0 and most == 0:
            left.append(f"{where}: nothing of it is risk's to close (what was bought or sold since the cancel is "
                        f"yours)")
            continue
        if qty == 0:
            left.append(f"{where}: nothing left to close at the broker (its net, less the exits already working "
                        f"there){broker.doubt(key) if broker is not None else ''}")
            continue
        side = Side.SELL if p["net_qty"] > 0 else Side.BUY
        db.execute("savepoint flatten_position")  # one position's failure undoes its own exit only
        try:
            d = evaluate(db, p["strategy"], [Intent(p["exchange"], p["symbol"], side, qty, OrderType.MKT,
                                                    Product(p["product"]), action=ExecutionType.EXIT)])
            held_back = not d.orders and d.status is AlertStatus.ACCEPTED and _exit_held(db, p)
            sent = 0 if broker is None else qty if held_back else db.execute(
                f"select coalesce(sum(qty), 0) from orders where id in ({','.join('?' * len(d.orders))})",
                tuple(d.orders)).fetchone()[0]
        except Exception as e:  # (a bug, an odd row): the other positions are still exited; the caller retries it
            db.execute("rollback to flatten_position")
            db.execute("release flatten_position")
            log.exception("%s: the exit of %s could not be made", why, where)
            failed.append(((p["strategy"], p["exchange"], p["symbol"], p["product"]),
                           f"{where}: its exit could not be made ({type(e).__name__}: {e})"))
            continue
        db.execute("release flatten_position")
        created += d.orders
        cancels += d.cancels
        if broker is not None:  # what is sent (the guard takes off what exits already cover), or held back
            room[key] = room.get(key, 0) - (1 if p["net_qty"] > 0 else -1) * sent
        if held_back:
            waiting.append(where)  # its resting stop is cancelled first; the exit follows the broker's confirmation
        elif not d.orders and d.reason and "nothing to exit" not in d.reason:
            left.append(f"{where}: {d.status.value}: {d.reason}")
    if quiet and not (created or cancels or stopped.cancelled_new or stopped.pending or failed):
        return Flattened((), (), 0, tuple(left))  # nothing done: a repeat says nothing
    Storage.add_event(db, "exit_all", f"{why}: {len(created)} exit orders, {stopped.cancelled_new} unsent orders "
                      f"cancelled, {len(stopped.pending)} working orders being cancelled"
                      + (f"; {len(waiting)} exits sent once their resting stop is cancelled: {'; '.join(waiting)}"
                         if waiting else "")
                      + (f"; left alone: {'; '.join(left)}" if left else "")
                      + (f"; FAILED, tried again: {'; '.join(w for _, w in failed)}" if failed else ""),
                      "error" if failed else "warning", strategy,
                      data={"orders": created, "cancelling": stopped.pending, "left": left,
                            "after_stop_cancel": waiting, "failed": [w for _, w in failed]})
    return Flattened(tuple(created), tuple(dict.fromkeys(cancels)), stopped.cancelled_new, tuple(left),
                     tuple(failed))


def _exit_held(db: sqlite_utils.Database, p: dict) -> bool:
    """The position's exit waits for its resting stop's cancel (protect.hold_exits stored it)."""
    return db.execute("select 1 from protections where strategy = ? and exchange = ? and symbol = ? and product = ? "
                      "and pending_exit is not null", (p["strategy"], p["exchange"], p["symbol"], p["product"])
                      ).fetchone() is not None
