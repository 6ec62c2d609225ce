"""The engine: one thread that turns alerts, commands and broker updates into decisions and orders."""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable, Optional

import sqlite_utils

from . import guard
from .inbox import Inbox
from .models import (AlertRequest, AlertStatus, BrokerOrder, ExecutionType, Intent, Leg, OrderStatus, OrderType,
                     Product, Side, TradingState)
from .orders import OrderSender, insert_order, transition
from .risk import RiskGate
from .storage import Storage, dec, utcnow
from .strategies import StrategyRouter
from .validation import validate_intent
from .watcher import Watcher

log = logging.getLogger(__name__)
OPEN_STATUSES = ("NEW", "SUBMITTED", "UNKNOWN", "OPEN", "PARTIAL")
HEARTBEAT_KEY = "engine_heartbeat"


@dataclass(frozen=True)
class Decision:
    status: AlertStatus
    reason: Optional[str]
    orders: tuple[str, ...] = ()


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


def adding_orders(db: sqlite_utils.Database) -> list[dict]:
    """Unfinished orders that would add to (not reduce) their strategy's position."""
    marks = ",".join("?" * len(OPEN_STATUSES))
    out = []
    for o in db.query(f"select o.*, coalesce(p.net_qty, 0) net from orders o left join positions p on "
                      f"p.strategy = o.strategy and p.exchange = o.exchange and p.symbol = o.symbol and "
                      f"p.product = o.product where o.status in ({marks}) order by o.rowid", OPEN_STATUSES):
        reducing = o["net"] != 0 and (o["side"] == "SELL") == (o["net"] > 0)
        if not reducing:
            out.append(o)
    return out


def alert_from_json(text: str) -> AlertRequest:
    d = json.loads(text)
    legs = tuple(Leg(l["exchange"], l["tradingsymbol"], Side(l["direction"]), l["qty"], OrderType(l["order_type"]),
                     Product(l["product_type"]), dec(l["price"]), dec(l["trigger_price"])) for l in d["legs"])
    return AlertRequest(d["strategy_name"], ExecutionType(d["execution_type"]), legs, d.get("alert_id"))


class Engine:
    """The single consumer of the inbox and of broker updates, on its own thread."""

    def __init__(self, storage: Storage, inbox: Inbox, gate: RiskGate, sender: OrderSender, watcher: Watcher,
                 router: StrategyRouter, broker_book: Callable[[], list[BrokerOrder]],
                 apply_tick: Optional[Callable[[str, str, Decimal], None]], max_alert_age_s: int,
                 reconcile_every_s: float = 5.0):
        self.storage, self.inbox, self.gate, self.sender, self.watcher = storage, inbox, gate, sender, watcher
        self.router = router
        self.broker_book = broker_book
        self.apply_tick = apply_tick
        self.max_alert_age_s = max_alert_age_s
        self.reconcile_every_s = reconcile_every_s
        self._events: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self.running = False
        self._last_reconcile = 0.0
        self._last_heartbeat = 0.0
        self._recover_pending = False

    # ---- life cycle ----
    def start(self) -> None:
        """Resume unsent orders, reconcile with the broker, then start the loop."""
        self._recover()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.running = True
        self._thread.start()
        self.inbox.wake = self.wake

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the event in hand, then stop; nothing accepted is dropped (it stays in the inbox)."""
        self.inbox.wake = None
        self._stopping.set()
        self._events.put(("wake", None))
        if self._thread:
            self._thread.join(timeout)
        self.running = False

    def flush(self) -> None:
        """Apply broker updates that arrived after the loop stopped (called at shutdown)."""
        self._apply_updates(self._drain())

    def wake(self) -> None:
        self._events.put(("wake", None))

    def on_broker_update(self, update: BrokerOrder) -> None:
        """Broker callback: only enqueue; the engine thread applies it."""
        self._events.put(("update", update))

    # ---- loop ----
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._step()
            except Exception:
                log.exception("engine step failed; continuing")
                time.sleep(0.1)

    def _drain(self, block_s: float = 0.0) -> list[tuple[str, Any]]:
        items = []
        try:
            items.append(self._events.get(timeout=block_s) if block_s else self._events.get_nowait())
            while True:
                items.append(self._events.get_nowait())
        except queue.Empty:
            pass
        return items

    def _apply_updates(self, items: list[tuple[str, Any]]) -> None:
        self.watcher.apply(u for kind, u in items if kind == "update")

    def _step(self) -> None:
        self._apply_updates(self._drain(block_s=0.1))
        self._process_alerts()
        self._process_commands()
        now = time.monotonic()
        if now - self._last_heartbeat >= 1.0:
            self._last_heartbeat = now
            self.storage.write(lambda db: Storage.put_state(db, HEARTBEAT_KEY, utcnow()))
        if now - self._last_reconcile >= self.reconcile_every_s:
            self._last_reconcile = now
            self._reconcile()

    def _reconcile(self) -> None:
        if self._recover_pending:
            self._recover()
            return
        pending = self.storage.one("select count(*) n from orders where status in ('SUBMITTED','UNKNOWN','OPEN','PARTIAL')")
        if pending["n"]:
            try:
                self.watcher.reconcile(self.broker_book(), set(self.sender.in_flight))
            except Exception as e:
                log.warning("reconcile with the broker failed: %s", e)

    def _recover(self) -> None:
        """At start-up: reconcile with the broker's book, then send the orders it has never seen."""
        try:
            unsent = self.watcher.reconcile(self.broker_book(), set(), startup=True,
                                            resend_max_age_s=self.max_alert_age_s)
        except Exception as e:
            # without the book we cannot tell what was sent: send nothing, retry on the next reconcile
            log.error("start-up reconcile failed; unsent orders wait until the broker answers: %s", e)
            self._recover_pending = True
            return
        self._recover_pending = False
        for oid in unsent:
            log.info("order %s never reached the broker before the last stop (its book was searched); "
                     "sending it now", oid)
            self.sender.enqueue(oid, resend=True)

    # ---- alerts ----
    def _process_alerts(self) -> None:
        for row in self.storage.rows("select * from alerts where status = 'received' order by rowid"):
            if self._stopping.is_set():
                return
            self._process_alert(row)

    def _process_alert(self, row: dict) -> None:
        age = datetime.now(timezone.utc) - datetime.fromisoformat(row["received_at"])
        if age > timedelta(seconds=self.max_alert_age_s):
            decision = Decision(AlertStatus.FAILED, f"stale: waited {int(age.total_seconds())} s, longer than "
                                                    f"ALERT_MAX_AGE_S={self.max_alert_age_s}; not executed")
            self.storage.write(lambda db: self._record(db, row, decision))
        else:
            alert = alert_from_json(row["body"])
            intents, why = self.router.intents_for(alert)
            if intents is None:
                decision = Decision(AlertStatus.REJECTED, why)
                self.storage.write(lambda db: self._record(db, row, decision))
            else:
                decision = self.storage.write(lambda db: self._decide(db, row, alert.strategy, intents))
        self.inbox.decided("alerts", row["id"])
        for oid in decision.orders:
            self.sender.enqueue(oid)

    def _decide(self, db: sqlite_utils.Database, row: dict, strategy: str, intents: list[Intent]) -> Decision:
        decision = self.evaluate(db, strategy, intents, alert_id=row["id"])
        self._record(db, row, decision)
        return decision

    def evaluate(self, db: sqlite_utils.Database, strategy: str, intents: list[Intent],
                 alert_id: Optional[str]) -> Decision:
        """Guard, then risk, then validation, all or nothing; write NEW orders if everything passes."""
        book = load_book(db, strategy)
        checked = [guard.check(i, book) for i in intents]
        notes = [c.note for c in checked if c.note]
        blocked = [c.blocked for c in checked if c.blocked]
        if blocked:
            return Decision(AlertStatus.BLOCKED, "; ".join(blocked))
        todo = [c for c in checked if c.intent is not None]
        refusals = {r for r in (self.gate.refusal(c.reducing) for c in todo) if r}
        if refusals:
            return Decision(AlertStatus.REFUSED, "; ".join(sorted(refusals)))
        problems = [p for n, c in enumerate(todo) for p in validate_intent(c.intent, f"intent[{n}]")]
        if problems:
            return Decision(AlertStatus.REJECTED, "; ".join(str(p) for p in problems))
        orders = tuple(insert_order(db, c.intent, strategy, alert_id) for c in todo)
        return Decision(AlertStatus.ACCEPTED, "; ".join(notes) or None, orders)

    @staticmethod
    def _record(db: sqlite_utils.Database, row: dict, d: Decision) -> None:
        db.execute("update alerts set status = ?, reason = ?, orders = ?, decided_at = ? where id = ?",
                   (d.status.value, d.reason, json.dumps(list(d.orders)), utcnow(), row["id"]))
        if d.status is not AlertStatus.ACCEPTED:
            Storage.add_event(db, f"alert_{d.status.value}", f"alert {row['id']} ({row['strategy']} "
                              f"{row['execution_type']}) {d.status.value}: {d.reason}",
                              "warning", row["strategy"], {"alert_id": row["id"]})

    # ---- commands ----
    def _process_commands(self) -> None:
        for row in self.storage.rows("select * from commands where status = 'pending' order by id"):
            handler = getattr(self, f"_cmd_{row['kind']}", None)
            try:
                if handler is None:
                    raise ValueError(f"unknown command {row['kind']!r}")
                result = {"ok": True, **(handler(json.loads(row["args"])) or {})}
            except Exception as e:
                log.exception("command %s failed", row["kind"])
                result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            self.storage.write(lambda db: db.execute(
                "update commands set status = 'done', result = ?, done_at = ? where id = ?",
                (json.dumps(result, default=str), utcnow(), row["id"])))
            self.inbox.decided("commands", str(row["id"]))

    def _cmd_halt(self, args: dict) -> dict:
        state = TradingState(args["mode"])
        self.storage.write(lambda db: self.gate.set_state(db, state, args.get("reason") or "set by the user",
                                                          args.get("by") or "api"))
        return {"state": state.value}

    def _cmd_ticks(self, args: dict) -> dict:
        ticks = [(t["exchange"], t["symbol"], Decimal(t["ltp"])) for t in args["ticks"]]
        now = utcnow()
        self.storage.write(lambda db: db["quotes"].upsert_all(
            [{"exchange": e, "symbol": s, "ltp": str(p), "at": now} for e, s, p in ticks], pk=("exchange", "symbol")))
        if self.apply_tick is not None:
            for e, s, p in ticks:
                self.apply_tick(e, s, p)
        self._apply_updates(self._drain())
        return {"applied": len(ticks)}

    def _cmd_exit_all(self, args: dict) -> dict:
        """Cancel unsent entries and exit every strategy's open positions through the guard."""
        by = args.get("by") or "api"

        def run(db: sqlite_utils.Database) -> tuple[list[str], int, list[str]]:
            cancelled, to_cancel = 0, []
            for o in adding_orders(db):
                if o["status"] == OrderStatus.NEW.value:
                    cancelled += transition(db, o["id"], OrderStatus.CANCELLED, f"exit-all by {by}",
                                            reason=f"cancelled before sending: exit-all by {by}")
                elif o["status"] in (OrderStatus.OPEN.value, OrderStatus.PARTIAL.value):
                    to_cancel.append(o["id"])
            created: list[str] = []
            strategies = [r["strategy"] for r in db.query(
                "select distinct strategy from positions where net_qty != 0 order by strategy")]
            for strategy in strategies:
                intents = [Intent(p["exchange"], p["symbol"], Side.SELL if p["net_qty"] > 0 else Side.BUY,
                                  abs(p["net_qty"]), OrderType.MKT, Product(p["product"]), action=ExecutionType.EXIT)
                           for p in db.query("select * from positions where strategy = ? and net_qty != 0", (strategy,))]
                created += self.evaluate(db, strategy, intents, alert_id=None).orders
            Storage.add_event(db, "exit_all", f"exit-all by {by}: {len(created)} exit orders, {cancelled} unsent "
                              f"orders cancelled, {len(to_cancel)} working orders being cancelled", "warning",
                              data={"orders": created, "cancelling": to_cancel})
            return created, cancelled, to_cancel
        created, cancelled, to_cancel = self.storage.write(run)
        for oid in to_cancel:  # first, so nothing new can fill while the exits go out
            self.sender.enqueue_cancel(oid, f"exit-all by {by}")
        for oid in created:
            self.sender.enqueue(oid)
        return {"orders": created, "cancelled": cancelled, "cancelling": to_cancel}
