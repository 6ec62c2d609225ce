"""The order service: the single place that calls the broker; persists before sending; status machine."""
from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from dataclasses import replace
from decimal import Decimal
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Optional, TypeVar

import sqlite_utils

from .day_counts import count_order
from .brokers.base import Broker, BrokerError, Forbidden, Rejected, SessionExpired, UnknownOutcome, Unreachable, transport_failure
from .ids import new_id
from .models import ExecutionType, Intent, OrderRequest, OrderStatus, OrderType, Product, Side
from .storage import Storage, dec, utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")
BROKER_TIMEOUT_S = 5.0
RETURNING_SINCE = (3, 35, 0)  # UPDATE ... RETURNING; an older SQLite (Ubuntu 20.04: 3.31) reads the row after
NEXT_AFTER_NOT_SENT = {  # what a restart does with an order whose SUBMITTED mark failed (watcher.reconcile)
    OrderStatus.NEW.value: "a restart sends it if it is younger than ALERT_MAX_AGE_S, else marks it rejected",
    OrderStatus.SUBMITTED.value: "its mark was written but not confirmed on the disk: it is looked for in the "
                                 "broker's book and marked LOST if it is not there"}
FOUND = (OrderStatus.OPEN, OrderStatus.PARTIAL, OrderStatus.FILLED)  # statuses only the broker's book can give
SEGMENTS_KEPT = 10_000  # order id -> exchange, looked up for a rate-limited broker while items wait
SEND_BATCH_MAX = 32  # NEW orders taken together (paper: they share one durable SUBMITTED commit)


def insert_order(db: sqlite_utils.Database, intent: Intent, strategy: str, alert_id: Optional[str],
                 version: Optional[str] = None) -> str:
    """Write a NEW order row (inside the caller's transaction) and return our id."""
    oid = new_id("o")
    now = utcnow()
    Storage.insert(db, "orders", {
        "id": oid, "alert_id": alert_id, "strategy": strategy, "action": intent.action.value,
        "exchange": intent.exchange, "symbol": intent.symbol, "side": intent.side.value, "qty": intent.qty,
        "order_type": intent.order_type.value, "price": _txt(intent.price), "trigger_price": _txt(intent.trigger_price),
        "product": intent.product.value, "status": OrderStatus.NEW.value, "filled_qty": 0, "avg_price": None,
        "broker_order_id": None, "reason": None, "created_at": now, "updated_at": now, "strategy_version": version,
        "applied_qty": 0, "applied_value": "0",
    })
    Storage.insert(db, "order_history", {"order_id": oid, "at": now, "status": OrderStatus.NEW.value, "detail": None})
    count_order(db, strategy, intent.action.value, now)
    return oid


def _txt(v: Any) -> Optional[str]:
    return None if v is None else str(v)


def transition(db: sqlite_utils.Database, order_id: str, status: OrderStatus, detail: Optional[str] = None,
               **fields: Any) -> bool:
    """Move an order forward in the status machine, never backwards; True if anything changed."""
    row = _order_row(db, order_id)
    return row is not None and advance(db, row, status, detail, **fields) is not None


def advance(db: sqlite_utils.Database, row: dict, status: OrderStatus, detail: Optional[str] = None,
            **fields: Any) -> Optional[dict]:
    """transition() for an order row read in this transaction: the row as it is now, or None if unchanged.

    `row` is kept in step with what is written (a late ack's broker id included)."""
    current = OrderStatus(row["status"])
    if current.terminal or status.rank < current.rank:
        if fields.get("broker_order_id") and not row["broker_order_id"]:  # a late ack still tells us the id
            db.execute("update orders set broker_order_id = ? where id = ?", (fields["broker_order_id"], row["id"]))
            row["broker_order_id"] = fields["broker_order_id"]
        return None
    changes = {k: _txt(v) if k == "avg_price" else v for k, v in fields.items()
               if v is not None and (v or k != "broker_order_id")}  # a blank id never hides the known one
    if status is current and all(str(row[k]) == str(v) for k, v in changes.items()):
        return None
    if current in (OrderStatus.UNKNOWN, OrderStatus.LOST) and status in FOUND and "reason" not in changes \
            and row.get("reason"):  # "outcome unknown ..." is no longer true: the book has it
        changes["reason"] = f"found in the broker's book after it was {current.value} (see its history)"
    changes.update(status=status.value, updated_at=utcnow())
    db.execute(f"update orders set {', '.join(f'{k} = ?' for k in changes)} where id = ?", (*changes.values(), row["id"]))
    Storage.insert(db, "order_history", {"order_id": row["id"], "at": changes["updated_at"], "status": status.value,
                                         "detail": detail or (f"filled {changes['filled_qty']}" if "filled_qty" in changes else None)})
    row.update(changes)
    return row


def _order_row(db: sqlite_utils.Database, order_id: str) -> Optional[dict]:
    return _first(db.execute("select * from orders where id = ?", (order_id,)))


def _first(cur: sqlite3.Cursor) -> Optional[dict]:
    """A statement's first row as a dict, or None; the statement is run to its end before the next one."""
    values = cur.fetchone()
    row = None if values is None else dict(zip((c[0] for c in cur.description), values, strict=True))
    cur.fetchall()
    return row


def mark_submitted(db: sqlite_utils.Database, order_id: str) -> Optional[dict]:
    """NEW -> SUBMITTED in one step; the row to send, or None if it is no longer NEW (cancelled by a
    breach or an exit-all, or sent already): such an order is never sent."""
    now = utcnow()
    returning = sqlite3.sqlite_version_info >= RETURNING_SINCE
    cur = db.execute("update orders set status = ?, updated_at = ? where id = ? and status = ?"
                     + (" returning *" if returning else ""),
                     (OrderStatus.SUBMITTED.value, now, order_id, OrderStatus.NEW.value))
    row = _first(cur) if returning else _order_row(db, order_id) if cur.rowcount == 1 else None
    if row is None:
        return None
    Storage.insert(db, "order_history", {"order_id": order_id, "at": now, "status": OrderStatus.SUBMITTED.value,
                                         "detail": None})
    return row


def request_for(row: dict) -> OrderRequest:
    """The broker request for a stored order row; our id is the remarks."""
    return OrderRequest(row["exchange"], row["symbol"], Side(row["side"]), row["qty"], OrderType(row["order_type"]),
                        Product(row["product"]), dec(row["price"]), dec(row["trigger_price"]), remarks=row["id"])


ORDER_CALLS = frozenset({"place_order", "prepare_order", "modify_order", "cancel_order"})


class BrokerGateway:
    """Runs every broker call with a timeout; a call that overruns is an unknown outcome.

    Calls that place, change or cancel orders have threads of their own: slow reads of the books never make an
    order wait in the queue. A call still queued when its time is up never leaves: it was not sent (Unreachable),
    rather than UNKNOWN and then sent late, when a thread came free."""

    def __init__(self, broker: Broker, timeout_s: float = BROKER_TIMEOUT_S):
        self.broker = broker
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="broker")
        self._orders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="broker-orders")

    def call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        future = (self._orders if what in ORDER_CALLS else self._pool).submit(fn, *args)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            if future.cancel():  # still queued behind calls that hang: it never reaches the broker
                raise Unreachable(f"{self.broker.name} {what} was not sent: earlier calls to the broker held every "
                                  f"connection for {self.timeout_s:g} s") from None
            raise UnknownOutcome(f"{self.broker.name} {what} gave no answer within {self.timeout_s:g} s") from None
        except BrokerError:
            raise
        except Exception as e:  # unclassified: unreachable only if never connected; a bug is never a clean answer
            raise transport_failure(f"{self.broker.name} {what}", e) from e

    def shutdown(self) -> None:
        for pool in (self._pool, self._orders):
            pool.shutdown(wait=False, cancel_futures=True)


class OrderSender:
    """Sends NEW orders to the broker, one at a time in the order they were decided (in each exchange segment:
    with a rate limit, another segment's message goes at its own free turn, never behind this one's wait).

    Each order is prepared (a market order's price, its rate-limit turn) before it is marked SUBMITTED, and
    placed right after the mark. With the paper broker the orders waiting together share one mark (one fsync).
    """

    def __init__(self, storage: Storage, gateway: BrokerGateway, on_result: Callable[[str], None] = lambda oid: None):
        self.storage = storage
        self.gateway = gateway
        self.on_result = on_result
        # the broker refused to move an exit towards the market (the engine cancels it and exits another way)
        self.on_reprice_refused: Callable[[str, str], None] = lambda oid, reason: None
        self._queue: "queue.Queue[Optional[tuple[Callable[..., None], str, Any]]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self.in_flight: set[str] = set()
        self._cancels_queued: set[str] = set()  # orders with a cancel waiting in the queue
        self._cancels_lock = threading.Lock()
        self._waiting: list[tuple[Callable[..., None], str, Any]] = []  # taken from the queue, in order (_next)
        self._segments: dict[str, str] = {}  # order id -> its exchange, for the items waiting
        self._stopped = False

    def start(self) -> None:
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="order-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._queue.put(None)
        if self._thread:
            self._thread.join(timeout)

    def enqueue(self, order_id: str) -> None:
        """Queue a NEW order to send (anything else is never sent, so a queued duplicate is harmless)."""
        self._queue.put((self.send, order_id, None))

    def enqueue_reprice(self, order_id: str, price: Decimal) -> None:
        """Queue a ModifyOrder of a working order to a limit at `price` (an exit moved towards the market)."""
        self._queue.put((self.reprice, order_id, price))

    def reprice(self, order_id: str, price: Decimal) -> None:
        """ModifyOrder to a limit at `price`; the trail says so first (the fill may come before the answer)."""
        row = self.storage.one("select * from orders where id = ?", (order_id,))
        if row is None or row["status"] not in (OrderStatus.OPEN.value, OrderStatus.PARTIAL.value) \
                or not row["broker_order_id"]:
            return
        self.storage.write(lambda db: (
            Storage.insert(db, "order_history", {"order_id": order_id, "at": utcnow(), "status": row["status"],
                                                 "detail": f"moving to {price}: an unfilled exit, moved towards the "
                                                           f"market"}),
            Storage.add_event(db, "exit_repriced", f"exit {order_id} {row['side']} {row['qty']} {row['exchange']}:"
                              f"{row['symbol']} ({row['strategy']}) not filled yet: moving it to {price}", "warning",
                              row["strategy"], {"order_id": order_id, "price": str(price)})))
        req = replace(request_for(row), order_type=OrderType.LMT, price=price)
        try:
            self.gateway.call("modify_order", self.gateway.broker.modify, row["broker_order_id"], req)
        except BrokerError as e:
            message = f"moving exit {order_id} to {price} failed: {e}"
            self.storage.write(lambda db: Storage.add_event(db, "reprice_failed", message, "warning",
                                                            row["strategy"], {"order_id": order_id}))
            # a stop the broker will not make a limit: asked again, it refuses again (a limit's move refused for a
            # rate limit or a price band is tried again at the next step, as any other failure)
            if isinstance(e, Rejected) and not isinstance(e, Forbidden) and OrderType(row["order_type"]).needs_trigger:
                self.on_reprice_refused(order_id, str(e))
            return
        self.storage.write(lambda db: db.execute("update orders set price = ?, order_type = 'LMT' where id = ?",
                                                 (str(price), order_id)))

    def enqueue_modify(self, order_id: str, qty: int, price: Optional[Decimal], trigger_price: Optional[Decimal]) -> None:
        """Queue a ModifyOrder of a working order's quantity and prices (a resting stop resized or trailed)."""
        self._queue.put((self.modify, order_id, (qty, price, trigger_price)))

    def modify(self, order_id: str, change: tuple[int, Optional[Decimal], Optional[Decimal]]) -> None:
        """ModifyOrder to (qty, price, trigger_price). A larger quantity is stored before the call (a fill of the
        new quantity may arrive before the answer) and put back if the broker refuses; anything else after it."""
        qty, price, trigger = change
        row = self.storage.one("select * from orders where id = ?", (order_id,))
        if row is None or row["status"] not in (OrderStatus.OPEN.value, OrderStatus.PARTIAL.value) \
                or not row["broker_order_id"] or row["cancel_requested"]:
            return
        detail = f"modify: qty {row['qty']} -> {qty}, trigger {row['trigger_price']} -> {trigger}, price " \
                 f"{row['price']} -> {price}"
        store = lambda db: db.execute("update orders set qty = ?, price = ?, trigger_price = ? where id = ?",  # noqa: E731
                                      (qty, _txt(price), _txt(trigger), order_id))
        self.storage.write(lambda db: (Storage.insert(db, "order_history", {"order_id": order_id, "at": utcnow(),
                                                                            "status": row["status"], "detail": detail}),
                                       store(db) if qty > row["qty"] else None))
        req = replace(request_for(row), qty=qty, price=price, trigger_price=trigger)
        try:
            self.gateway.call("modify_order", self.gateway.broker.modify, row["broker_order_id"], req)
        except BrokerError as e:
            message = f"ModifyOrder of {order_id} ({detail}) failed: {e}"
            refused = not isinstance(e, UnknownOutcome)  # an unknown outcome may have grown it: keep the larger qty
            self.storage.write(lambda db: (
                db.execute("update orders set qty = ? where id = ? and qty = ?", (row["qty"], order_id, qty))
                if qty > row["qty"] and refused else None,
                Storage.add_event(db, "modify_failed", message, "warning", row["strategy"], {"order_id": order_id})))
            return
        self.storage.write(store)

    def enqueue_cancel(self, order_id: str, why: str) -> None:
        """Queue a cancel request for a working order, behind the orders already queued; one already waiting in
        the queue for it is enough (the reconcile asks again every 5 s while the broker keeps the order working)."""
        with self._cancels_lock:
            if order_id in self._cancels_queued:
                return
            self._cancels_queued.add(order_id)
        self._queue.put((self.cancel, order_id, why))

    def idle(self) -> bool:
        return self._queue.empty() and not self._waiting and not self.in_flight

    def _run(self) -> None:
        while True:
            if not self._waiting or len(self._segments) > SEGMENTS_KEPT:
                self._segments.clear()  # kept only while items wait
            self._take_queued(block=not self._waiting)
            if not self._waiting:
                if self._stopped:
                    return  # what was queued before the stop is done; nothing after it is taken
                continue
            action, order_id, arg = self._next()  # (never raises: a failed read picks the oldest)
            try:
                action(order_id, arg)
            except Exception:  # never let one order kill the sender
                log.exception("%s of order %s failed", getattr(action, "__name__", action), order_id)

    def _take_queued(self, block: bool) -> None:
        """Move what is queued into the waiting list, in order (waiting for one item if `block`); none after
        the stop."""
        while not self._stopped:
            try:
                item = self._queue.get(block=block)
            except queue.Empty:
                return
            if item is None:
                self._stopped = True
                return
            self._waiting.append(item)
            block = False

    def _next(self) -> tuple[Callable[..., None], str, Any]:
        """The oldest waiting item whose segment has a free rate-limit turn (in its segment, the oldest; with no
        rate limit, simply the oldest); the sends right behind it in its segment go with it, as one batch. If
        an order's segment cannot be read (a disk error), the oldest item goes: plain order is never wrong."""
        try:
            at, segment = self._pick()
        except Exception:
            log.exception("the exchange segments of the orders waiting could not be read; the oldest goes first")
            at, segment = 0, None
        action, order_id, arg = self._waiting.pop(at)
        if action != self.send:
            return action, order_id, arg
        batch, n = [order_id], at
        while n < len(self._waiting) and len(batch) < SEND_BATCH_MAX:
            following = self._waiting[n]
            if segment is not None and self._segments.get(following[1]) != segment:
                n += 1  # another segment's: it keeps its place
            elif following[0] == self.send:
                batch.append(self._waiting.pop(n)[1])
            else:
                break  # a cancel or a modify in this segment: the sends behind it wait for it
        return self.send_batch, ",".join(batch), batch

    def _pick(self) -> tuple[int, Optional[str]]:
        """Where the next item waits, and its segment (None: no rate limit, or one item: the oldest goes)."""
        turn_in = getattr(self.gateway.broker, "turn_in", None)
        if turn_in is None or len(self._waiting) == 1:
            return 0, None
        firsts: dict[str, int] = {}  # each segment's oldest item: only it may go
        for n, item in enumerate(self._waiting):
            firsts.setdefault(self._segment(item[1]), n)
        at = min(firsts.values(), key=lambda n: (self._turn_in(turn_in, self._segment(self._waiting[n][1])), n))
        return at, self._segment(self._waiting[at][1])

    @staticmethod
    def _turn_in(turn_in: Callable[[str], float], segment: str) -> float:
        return turn_in(segment) if segment else 0.0

    def _segment(self, order_id: str) -> str:
        """The exchange segment an order message counts against ("" for an item that is not an order's)."""
        if order_id not in self._segments:
            row = self.storage.one("select exchange from orders where id = ?", (order_id,))
            self._segments[order_id] = row["exchange"] if row else ""
        return self._segments[order_id]

    def _give_way(self, order_id: str) -> bool:
        """Before a batch's next order: True if its segment's turn is not free while another segment's waiting
        item has one (the rest of the batch then waits in its place, first in its segment)."""
        turn_in = getattr(self.gateway.broker, "turn_in", None)
        if turn_in is None:
            return False
        self._take_queued(block=False)
        try:
            segment = self._segment(order_id)
            if not self._waiting or self._turn_in(turn_in, segment) <= 0:
                return False
            return any(self._turn_in(turn_in, s) <= 0 for s in {self._segment(i[1]) for i in self._waiting} - {segment})
        except Exception:  # the batch goes on in its order
            log.exception("the exchange segments of the orders waiting could not be read; the batch goes on")
            return False

    def cancel(self, order_id: str, why: str) -> None:
        """Ask the broker to cancel a working order; the watcher records the outcome from its update."""
        with self._cancels_lock:
            self._cancels_queued.discard(order_id)  # asked again from now on: queued again
        row = self.storage.one("select * from orders where id = ?", (order_id,))
        if row is None or row["status"] not in (OrderStatus.OPEN.value, OrderStatus.PARTIAL.value) \
                or not row["broker_order_id"]:
            return
        try:
            self.gateway.call("cancel_order", self.gateway.broker.cancel, row["broker_order_id"], row["exchange"])
        except BrokerError as e:
            message = f"cancel of order {order_id} ({why}) failed: {e}"
            self.storage.write(lambda db: Storage.add_event(db, "cancel_failed", message, "warning",
                                                            row["strategy"], {"order_id": order_id}))

    def send(self, order_id: str, _: Any = None) -> None:
        """Mark SUBMITTED (persisted; only from NEW) then call the broker; record what came back."""
        self.send_batch(order_id, [order_id])

    def send_batch(self, _: str, order_ids: list[str]) -> None:
        """Send the orders in turn, each marked SUBMITTED (durably) right before its own PlaceOrder, once its price
        and its rate-limit turn are in hand: an order marked sent never waits behind another, so a process that
        dies leaves the rest NEW, and the restart sends them.

        A broker whose book is written with the order (paper) needs no preparation, and a restart sends an order
        it marked and never placed (watcher.reconcile): there the whole batch shares one mark (one fsync)."""
        self.in_flight.update(order_ids)  # SUBMITTED and not sent yet: reconciling must not call them lost
        try:
            if getattr(self.gateway.broker, "book_is_synchronous", False):
                self._mark_and_place(order_ids, {})
                return
            for n, oid in enumerate(order_ids):
                if n and self._give_way(oid):  # another segment's message has a free turn: it goes first
                    self._waiting[0:0] = [(self.send, rest, None) for rest in order_ids[n:]]
                    return
                try:
                    req = self._prepare(oid)
                except Exception:  # its refusal could not be recorded (a full disk): it stays NEW, unsent; the rest go
                    log.exception("order %s: preparing it failed and could not be recorded; it was not sent", oid)
                    continue
                if req is not None:
                    self._mark_and_place([oid], {oid: req}, unsent=order_ids[n + 1:])
        finally:
            self.in_flight.difference_update(order_ids)

    def _prepare(self, order_id: str) -> Optional[OrderRequest]:
        """The request to place for an order still NEW (read now: a breach or an exit-all may have cancelled it
        while the ones before it went out), after its price and its rate-limit turn; None if it is not to go."""
        row = self.storage.one("select * from orders where id = ? and status = 'NEW'", (order_id,))
        if row is None:
            return None
        try:
            return self.gateway.call("prepare_order", self.gateway.broker.prepare, request_for(row))
        except SessionExpired as e:  # nothing can be placed until the login
            self._session_over(row, e)
        except Exception as e:  # refused, timed out, or a bug of the adapter's: PlaceOrder was not called
            self._refused(row, e if isinstance(e, Rejected) else f"{type(e).__name__}: {e}; nothing was sent")
        return None

    def _mark_and_place(self, ids: list[str], prepared: dict[str, OrderRequest], unsent: list[str] = ()) -> None:
        """One durable commit marks the orders SUBMITTED (only from NEW; it also syncs the decisions that made
        them), then each is placed (prepared now if it was not: a broker that needs no preparation), unless a
        cancel was asked for it meanwhile. If the mark fails, these and the `unsent` that follow are reported."""
        try:
            marked = self.storage.write(lambda db: [r for r in (mark_submitted(db, oid) for oid in ids) if r],
                                        durable=True)
        except Exception as e:
            self._not_sent([*ids, *unsent], e)
            raise
        placed: list[tuple[str, str]] = []  # (our id, the broker's): their acks share one commit, after the batch
        try:
            for n, row in enumerate(marked):
                try:
                    if n and self._cancelled_before_sending(row):
                        continue
                    self._place(row, prepared.get(row["id"]) or self.gateway.broker.prepare(request_for(row)), placed)
                except Exception:  # recording one answer failed (a full disk): the rest of the batch still goes
                    log.exception("order %s: what became of it could not be recorded; the reconcile reads it from "
                                  "the broker's book", row["id"])
        finally:
            self._record_acks(placed)

    def _record_acks(self, placed: list[tuple[str, str]]) -> None:
        """The broker's ids for orders placed (OPEN); a process that dies first leaves them SUBMITTED, and the
        reconcile finds them in the broker's book by their remarks, as it finds any whose answer was lost."""
        if not placed:
            return
        try:
            self.storage.write(lambda db: [transition(db, oid, OrderStatus.OPEN, None, broker_order_id=broker_id)
                                           for oid, broker_id in placed])
        except Exception:  # they were placed: the reconcile finds them in the book by their remarks, as it would
            log.exception("the acks of orders %s could not be recorded; the reconcile reads them from the broker's "
                          "book", [oid for oid, _ in placed])
        finally:
            self.in_flight.difference_update(oid for oid, _ in placed)
        for oid, _ in placed:
            self.on_result(oid)

    def _not_sent(self, order_ids: list[str], error: Exception) -> None:
        """Marking the orders SUBMITTED failed (a failing disk, a full one): none left; the trader is told."""
        why = f"{type(error).__name__}: {error}"
        try:
            marks = ",".join("?" * len(order_ids))
            rows = self.storage.rows(f"select id, strategy, side, qty, exchange, symbol, status from orders "
                                     f"where id in ({marks}) and status in ('NEW', 'SUBMITTED')", tuple(order_ids))
            self.storage.write(lambda db: [Storage.add_event(
                db, "order_not_sent", f"order {r['id']} ({r['strategy']} {r['side']} {r['qty']} {r['exchange']}:"
                f"{r['symbol']}) was NOT sent to the broker: it could not be recorded as sent ({why}). Check the "
                f"host's disk; {NEXT_AFTER_NOT_SENT[r['status']]}", "error", r["strategy"],
                {"order_id": r["id"], "status": r["status"]}) for r in rows])
        except Exception as e:  # the database itself is failing: the log is all that is left
            log.critical("orders %s were not sent (%s), and that could not be recorded: %s", order_ids, why, e)

    def _cancelled_before_sending(self, row: dict) -> bool:
        """A cancel asked for (a breach, an exit-all) while the orders before it went out: it never leaves."""
        why = self.storage.one("select cancel_requested from orders where id = ?", (row["id"],))["cancel_requested"]
        if not why:
            return False
        reason = f"cancelled before it was sent: {why}"
        self.storage.write(lambda db: transition(db, row["id"], OrderStatus.CANCELLED, reason, reason=reason))
        self.on_result(row["id"])
        return True

    def _refused(self, row: dict, why: Any) -> None:
        """The broker refused the order, or it could not be sent (nothing reached the broker): REJECTED."""
        order_id, reason = row["id"], str(why)
        self.storage.write(lambda db: transition(db, order_id, OrderStatus.REJECTED, reason, reason=reason) and
                           Storage.add_event(db, "order_rejected", f"order {order_id} rejected: {reason}", "warning",
                                             row["strategy"], {"order_id": order_id}))
        self.on_result(order_id)

    def _session_over(self, row: dict, e: SessionExpired, marked: bool = False) -> None:
        """The broker session is over, so the order was not placed. An exit is held for the login; anything else
        is rejected (risk refuses new entries until the login, with the same words)."""
        if row["action"] == ExecutionType.EXIT.value:
            self._held_for_login(row, str(e), marked)
        else:
            self._refused(row, f"sessionexpired: {e}")

    def _held_for_login(self, row: dict, why: str, marked: bool = False) -> None:
        """An exit not placed because the broker session is over: it stays (or, answered so by PlaceOrder, goes
        back to) NEW, and the recovery after the login sends it, if its alert is young enough then."""
        order_id = row["id"]
        message = (f"order {order_id} ({row['strategy']} {row['side']} {row['qty']} {row['exchange']}:{row['symbol']}) "
                   f"was NOT placed: {why}. It is held, and sent when the broker session is back, if that is within "
                   f"ALERT_MAX_AGE_S of its alert; after that it is not sent")

        def hold(db: sqlite_utils.Database) -> None:
            if marked:  # the broker refused it for the session, so nothing was placed: NEW again, said in its history
                if db.execute("update orders set status = 'NEW', updated_at = ? where id = ? and status = 'SUBMITTED'",
                              (utcnow(), order_id)).rowcount != 1:
                    return
                Storage.insert(db, "order_history", {"order_id": order_id, "at": utcnow(), "status": "NEW",
                                                     "detail": f"PlaceOrder answered: {why}; nothing was placed"})
            Storage.add_event(db, "order_held", message, "warning", row["strategy"], {"order_id": order_id})
        self.storage.write(hold)
        self.on_result(order_id)

    def _place(self, row: dict, req: OrderRequest, placed: list[tuple[str, str]]) -> None:
        """Call the broker for one SUBMITTED order; record what came back, but an ack: that goes into `placed`, to
        be recorded with the rest of its batch's (_record_acks)."""
        order_id = row["id"]
        self.in_flight.add(order_id)
        try:
            broker_id = self.gateway.call("place_order", self.gateway.broker.place, req)
        except SessionExpired as e:
            self.in_flight.discard(order_id)
            self._session_over(row, e, marked=True)
            return
        except (Rejected, Unreachable) as e:
            self.in_flight.discard(order_id)
            self._refused(row, f"{type(e).__name__.lower()}: {e}" if not isinstance(e, Rejected) else e)
            return
        except (UnknownOutcome, BrokerError) as e:
            reason = f"outcome unknown: {e}; the watcher will look for it in the broker's book, it is not resent"
            try:
                self.storage.write(lambda db: (transition(db, order_id, OrderStatus.UNKNOWN, reason, reason=reason),
                                               Storage.add_event(db, "order_unknown", f"order {order_id}: {reason}",
                                                                 "warning", row["strategy"], {"order_id": order_id})))
            finally:
                self.in_flight.discard(order_id)
        else:
            placed.append((order_id, broker_id))  # in flight until the batch's acks are recorded
            return
        self.on_result(order_id)
