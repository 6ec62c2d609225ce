"""The engine: one thread that turns alerts, commands and broker updates into decisions and orders."""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable, Optional

import sqlite_utils

from . import flatten, guard, outside, targets
from .broker_session import load_token
from .inbox import Inbox
from .instruments import check_order, slices
from .market import IST
from .models import (AlertRequest, AlertStatus, BrokerOrder, Decision, ExecutionType, Intent, Leg, Order, OrderStatus,
                     OrderType, Product, Side, TargetLeg, Tick, TradingState)
from .orders import OrderSender, insert_order, transition
from .risk import RiskGate
from .storage import HEARTBEAT_KEY, Storage, dec, utcnow
from .plugins.strategies import Asked, StrategyRegistry
from .validation import validate_intent
from .watcher import Watcher
from . import views

log = logging.getLogger(__name__)
OPEN_STATUSES = ("NEW", "SUBMITTED", "UNKNOWN", "OPEN", "PARTIAL")
CLOCK_EVERY_S = 1.0
RISK_EVERY_S = 0.25  # at most this often: a risk check reads every position
SUMMARY_KEY = "daily_summary_day"
PNL_POINT_EVERY_S = 5.0  # at most this often a point of the day's PnL curve is stored


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


def alert_from_json(text: str) -> AlertRequest:
    d = json.loads(text)
    legs = tuple(Leg(l["exchange"], l["tradingsymbol"], Side(l["direction"]), l["qty"], OrderType(l["order_type"]),
                     Product(l["product_type"]), dec(l["price"]), dec(l["trigger_price"])) for l in d["legs"])
    goals = tuple(TargetLeg(t["exchange"], t["tradingsymbol"], Product(t["product_type"]), OrderType(t["order_type"]),
                            t["position"], dec(t["price"])) for t in d.get("targets") or ())
    return AlertRequest(d["strategy_name"], ExecutionType(d["execution_type"]), legs, d.get("alert_id"), goals,
                        tuple(d.get("notes") or ()))


class Engine:
    """The single consumer of the inbox, broker updates, ticks and the clock, on its own thread."""

    def __init__(self, storage: Storage, inbox: Inbox, gate: RiskGate, sender: OrderSender, watcher: Watcher,
                 strategies: StrategyRegistry, broker_book: Callable[[], list[BrokerOrder]],
                 apply_tick: Optional[Callable[[str, str, Decimal], None]], max_alert_age_s: int,
                 require_known: bool = False, reconcile_every_s: float = 5.0,
                 broker_positions: Callable[[], list] = list, risk_poll_s: float = 5.0,
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        self.storage, self.inbox, self.gate, self.sender, self.watcher = storage, inbox, gate, sender, watcher
        self.strategies = strategies
        self.broker_book = broker_book
        self.apply_tick = apply_tick
        self.max_alert_age_s = max_alert_age_s
        self.require_known = require_known
        self.reconcile_every_s = reconcile_every_s
        self._events: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self.running = False
        self._last_reconcile = 0.0
        self._last_heartbeat = 0.0
        self._last_clock = 0.0
        self._recover_pending = False
        self._reconcile_again_at = 0.0
        self.plugin_registries: dict[str, Any] = {"strategy": strategies}
        self.broker_positions = broker_positions
        self.risk_poll_s = risk_poll_s
        self.now = now
        self._last_poll = 0.0
        self._blind: Optional[str] = None
        self._manual_seen: dict[tuple, int] = {}
        self._broker_net: dict[tuple, int] = {}  # the broker's net per (exchange, symbol, product), last poll
        self._cancels_sent: dict[str, float] = {}  # order id -> when its cancel was last asked for
        self._risk_dirty = True
        self._last_risk = 0.0
        self._pnl_point: tuple[float, Optional[Decimal]] = (0.0, None)
        self._in_ticks = False
        self.broker: Any = None       # the live broker, for session commands (set by the runtime)
        self.on_session_restored: Callable[[], None] = lambda: None
        self.instruments: Optional[Callable[[], Any]] = None  # live mode: the instrument master
        self.preopen: Any = None  # live mode: the time of the daily session check
        self.summary_time: Any = None  # the time of the daily summary (DAILY_SUMMARY_TIME)
        self._summary_day: Optional[str] = None  # the last day a summary went out
        self._preopen_day: Any = None
        self.gateway_call: Callable[..., Any] = lambda what, fn: fn()
        self.data_dir: Any = None
        self._targets_waiting = True  # POSITION reversals may wait for their exit (cleared when none is found)

    # ---- life cycle ----
    def start(self, changes: list[Callable[[], None]] = ()) -> None:
        """Apply start-up changes (plugins), resume unsent orders, reconcile, then start the loop."""
        for change in changes:
            change()
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
        """Apply broker updates and plugin changes that arrived after the loop stopped (at shutdown)."""
        self._handle(self._drain(), dispatch=False)

    def wake(self) -> None:
        self._events.put(("wake", None))

    def submit(self, fn: Callable[[], None]) -> None:
        """Run fn on the engine thread, between two events (plugin swaps use this)."""
        self._events.put(("call", fn))

    def request_reconcile(self) -> None:
        """Reconcile with the broker's book now and once more a second later: the feed was away, and
        updates for orders sent while its subscriptions were being renewed may be lost too."""
        self._last_reconcile = 0.0
        self._reconcile_again_at = time.monotonic() + 1.0
        self.wake()

    def order_changed(self, order_id: str) -> None:
        """The order sender recorded a broker answer (ack, rejection, unknown outcome)."""
        self._events.put(("order", order_id))

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

    def _handle(self, items: list[tuple[str, Any]], dispatch: bool = True) -> None:
        """Apply broker updates (then tell the owning strategies), and run submitted changes, in order."""
        updates = [u for kind, u in items if kind == "update"]
        changed = self.watcher.apply(updates) if updates else []
        self._risk_dirty = self._risk_dirty or bool(changed)
        for kind, oid in items:
            if kind == "order":
                row = self.storage.one("select * from orders where id = ?", (oid,))
                if row is not None:
                    changed.append(row)
        ticks = [t for kind, batch in items if kind == "ticks" for t in batch]
        if ticks and (self._in_ticks or not dispatch):
            self._events.put(("ticks", ticks))  # applying ticks already: these wait for the next step
        elif ticks:
            self._apply_ticks(ticks)
        for kind, fn in items:
            if kind == "call":
                try:
                    fn()
                except Exception:
                    log.exception("engine call failed")
        self._cancel_requested(changed)
        if dispatch:
            for row in changed:
                live = self.strategies.live(row["strategy"])
                if live is not None and "strategy_on_order" in live.candidate.hooks:
                    self._act(live.candidate.name, self.strategies.ask(live, "strategy_on_order",
                                                                       order=Order.from_row(row)), "on_order")

    def _step(self) -> None:
        self._handle(self._drain(block_s=0.1))
        if self._targets_waiting:
            self._release_targets()
        self._process_alerts()
        self._process_commands()
        now = time.monotonic()
        if now - self._last_clock >= CLOCK_EVERY_S:
            self._last_clock = now
            self._clock()
            self._risk_dirty = True
        if self._risk_dirty and now - self._last_risk >= RISK_EVERY_S:
            self._risk_dirty = False
            self._risk_check()
        if now - self._last_heartbeat >= 1.0:
            self._last_heartbeat = now
            self.storage.write(lambda db: Storage.put_state(db, HEARTBEAT_KEY, utcnow()))
        if self._reconcile_again_at and now >= self._reconcile_again_at:
            self._reconcile_again_at = 0.0
            self._last_reconcile = 0.0
        if now - self._last_reconcile >= self.reconcile_every_s:
            self._last_reconcile = now
            self._reconcile()

    def _preopen_check(self, now: datetime) -> None:
        """Once per trading day at the pre-open time: is the broker session valid? Say so either way."""
        if self.preopen is None or self.broker is None or not hasattr(self.broker, "check_session"):
            return
        day = now.date()
        if day == self._preopen_day or now.time() < self.preopen or not self.gate.clock.is_trading_day(day):
            return
        self._preopen_day = day
        try:
            valid = self.gateway_call("check_session", self.broker.check_session)
        except Exception as e:  # unreachable, timeout: not valid as far as we can tell
            valid, why = False, f"{type(e).__name__}: {e}"
        else:
            why = "get_limits did not answer Ok"
        message = ("pre-open check: the broker session is valid" if valid else
                   f"pre-open check: the broker session is NOT valid ({why}): log in at /broker/login before the open")
        self.storage.write(lambda db: Storage.add_event(db, "preopen_check", message, "info" if valid else "error",
                                                        data={"valid": valid, "login": "/broker/login"}))
        opened = self._session_opened_on()
        if valid and opened is not None and opened < day:
            self.storage.write(lambda db: Storage.add_event(
                db, "broker_session_expiring", f"the broker session still answers but was opened on {opened}; "
                "Shoonya sessions end daily: log in again at /broker/login before the open", "warning",
                data={"opened": opened.isoformat(), "login": "/broker/login"}))

    def _session_opened_on(self) -> Optional[date]:
        """The day (Asia/Kolkata) the saved broker token was obtained, if a token was saved by a login."""
        token = load_token(self.data_dir) if self.data_dir is not None else None
        try:
            return datetime.fromisoformat(token["saved_at"]).astimezone(IST).date() if token else None
        except (KeyError, TypeError, ValueError):
            return None

    def _clock(self) -> None:
        now = self.now().astimezone(IST)
        self._preopen_check(now)
        self._daily_summary(now)
        for live in self.strategies.with_hook("strategy_on_clock"):
            self._act(live.candidate.name, self.strategies.ask(live, "strategy_on_clock", now=now), "on_clock")

    def _daily_summary(self, now: datetime) -> None:
        """Once per trading day, after DAILY_SUMMARY_TIME: the day in numbers, as an event."""
        day = now.date()
        if self.summary_time is None or now.time() < self.summary_time or not self.gate.clock.is_trading_day(day):
            return
        if self._summary_day is None:  # read once; kept in memory after that
            self._summary_day = self.storage.get_state(SUMMARY_KEY) or ""
        if self._summary_day == day.isoformat():
            return
        self._summary_day = day.isoformat()
        s = views.day_summary(self.storage, self.gate)
        filled, rejected = s["orders"].get("FILLED", 0), s["orders"].get("REJECTED", 0)
        refused = sum(n for k, n in s["alerts"].items() if k not in ("accepted", "received"))
        per = ", ".join(f"{k} {v}" for k, v in sorted(s["by_strategy"].items())) or "no positions"
        message = (f"day {s['day']}: PnL {s['pnl']}; {sum(s['orders'].values())} orders ({filled} filled, {rejected} "
                   f"rejected); {sum(s['alerts'].values())} alerts ({refused} not executed); state {s['state']}; {per}")
        data = {**s, "pnl": str(s["pnl"]), "by_strategy": {k: str(v) for k, v in s["by_strategy"].items()}}
        self.storage.write(lambda db: (Storage.add_event(db, "daily_summary", message, "info", None, data),
                                       Storage.put_state(db, SUMMARY_KEY, day.isoformat())))

    def _reconcile(self) -> None:
        if self._recover_pending:
            self._recover()
            return
        pending = self.storage.one("select count(*) n from orders where status in ('SUBMITTED','UNKNOWN','OPEN',"
                                   "'PARTIAL') or (status = 'LOST' and updated_at >= ?)",
                                   ((datetime.now(timezone.utc) - timedelta(days=1)).isoformat(),))
        if pending["n"]:
            try:
                self.watcher.reconcile(self.broker_book(), set(self.sender.in_flight))
            except Exception as e:
                log.warning("reconcile with the broker failed: %s", e)
            self._cancel_requested(self.storage.rows("select * from orders where cancel_requested is not null and "
                                                     "status in ('OPEN', 'PARTIAL')"))

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
            log.info("order %s was never handed to the broker before the last stop; sending it now", oid)
            self.sender.enqueue(oid)

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
            asked = (self.strategies.admit(alert, self.require_known) if alert.execution_type is ExecutionType.POSITION
                     else self.strategies.route_alert(alert, self.require_known))
            if asked.error:
                decision = Decision(asked.status, asked.error)
                self.storage.write(lambda db: self._record(db, row, decision))
            elif alert.execution_type is ExecutionType.POSITION:
                decision = self.storage.write(lambda db: self._decide_targets(db, row, alert, asked.version))
            else:
                decision = self.storage.write(
                    lambda db: self._decide(db, row, alert.strategy, list(asked.intents), asked.version))
        self.inbox.decided("alerts", row["id"])
        self._dispatch(decision)

    def _decide(self, db: sqlite_utils.Database, row: dict, strategy: str, intents: list[Intent],
                version: Optional[str]) -> Decision:
        decision = self.evaluate(db, strategy, intents, alert_id=row["id"], version=version)
        if decision.status is AlertStatus.ACCEPTED:  # a newer alert in a symbol drops a reversal waiting there
            targets.supersede(db, strategy, {(i.exchange, i.symbol) for i in intents}, row["id"])
        self._record(db, row, decision, version)
        return decision

    def _decide_targets(self, db: sqlite_utils.Database, row: dict, alert: AlertRequest,
                        version: Optional[str]) -> Decision:
        """A POSITION alert: only the difference from the strategy's own position is sent (see targets)."""
        decision = targets.decide(db, row["id"], alert.strategy, alert.targets, self._evaluator(version))
        self._targets_waiting = True
        self._record(db, row, decision, version)
        return decision

    def _evaluator(self, version: Optional[str] = None) -> targets.Evaluate:
        return lambda db, strategy, intents, alert_id: self.evaluate(db, strategy, intents, alert_id, version)

    def _release_targets(self) -> None:
        """Position targets whose wait is over (exits filled, cancels done): plan them again, send or drop."""
        rows = self.storage.rows("select * from position_targets where status = ? order by id", (targets.WAITING,))
        self._targets_waiting = bool(rows)
        for row in rows:
            if self.storage.read(lambda db: targets.ready(db, row, self.max_alert_age_s)):
                self._dispatch(self.storage.write(lambda db: targets.release(
                    db, row, self._evaluator(), self.max_alert_age_s)))

    def evaluate(self, db: sqlite_utils.Database, strategy: str, intents: list[Intent],
                 alert_id: Optional[str], version: Optional[str] = None) -> Decision:
        """Guard, then risk, then validation, all or nothing; write NEW orders if everything passes.

        An EXIT also stops the strategy's own orders that would add to that symbol (the rest of a working
        entry must not fill after the exit); a full exit then follows up on what they filled meanwhile.
        """
        book = load_book(db, strategy)
        full_exits = {(i.exchange, i.symbol, i.product) for i in intents if i.action is ExecutionType.EXIT
                      and i.qty >= abs(book.net(i.exchange, i.symbol, guard.position_product(i, book)))}
        checked = [guard.check(i, book) for i in intents]
        notes = [c.note for c in checked if c.note]
        blocked = [c.blocked for c in checked if c.blocked]
        if blocked:
            return Decision(AlertStatus.BLOCKED, "; ".join(blocked))
        todo = [c for c in checked if c.intent is not None]
        params = self.strategies.params(strategy)
        refusals = {r for r in (self.gate.refusal(c.reducing, strategy, c.intent, db, params) for c in todo) if r}
        if refusals:
            return Decision(AlertStatus.REFUSED, "; ".join(sorted(refusals)))
        master = self.instruments() if self.instruments is not None else None
        sliced = [(c, replace(c.intent, qty=q)) for c in todo for q in slices(master, c.intent)]
        problems = [str(p) for n, (c, i) in enumerate(sliced) for p in validate_intent(i, f"intent[{n}]")]
        if master is not None:
            problems += [p for n, (c, i) in enumerate(sliced) for p in check_order(
                master, i.exchange, i.symbol, i.qty, (i.price, i.trigger_price), f"intent[{n}]", c.reducing)]
        if problems:
            return Decision(AlertStatus.REJECTED, "; ".join(problems))
        if len(sliced) > len(todo):
            notes.append(f"{len(todo)} order(s) sent as {len(sliced)} slices under the freeze quantity")
        orders = tuple(insert_order(db, i, strategy, alert_id, version) for _, i in sliced)
        cancels: list[str] = []
        for ex, sym in dict.fromkeys((i.exchange, i.symbol) for i in intents if i.action is ExecutionType.EXIT):
            stopped = flatten.cancel_adding(db, f"EXIT of {strategy} in {ex}:{sym}", strategy=strategy, exchange=ex,
                                    symbol=sym)
            cancels += stopped.working
            if stopped.pending and alert_id is not None:
                for key in full_exits:
                    if key[:2] == (ex, sym):  # what the stopped orders fill meanwhile is exited after them
                        targets.store_waiting(db, alert_id, strategy, TargetLeg(ex, sym, key[2], OrderType.MKT, 0),
                                              targets.REPLAN, stopped.pending)
                        self._targets_waiting = True
                notes.append(f"{len(stopped.pending)} working order(s) of {strategy} adding to {ex}:{sym} cancelled")
        return Decision(AlertStatus.ACCEPTED, "; ".join(notes) or None, orders, tuple(cancels))

    def _act(self, strategy: str, asked: Asked, source: str) -> None:
        """Turn what a strategy hook returned into orders, through the guard and risk; record the outcome."""
        if asked.error or not asked.intents:
            return  # failures were recorded as plugin events where they happened
        def run(db: sqlite_utils.Database) -> Decision:
            d = self.evaluate(db, strategy, list(asked.intents), alert_id=None, version=asked.version)
            words = f"{len(d.orders)} order(s)" if d.status is AlertStatus.ACCEPTED else f"{d.status.value}: {d.reason}"
            Storage.add_event(db, f"strategy_{source}", f"strategy {strategy} v{asked.version} {source}: "
                              f"{len(asked.intents)} intent(s) -> {words}",
                              "info" if d.status is AlertStatus.ACCEPTED else "warning", strategy,
                              {"version": asked.version, "orders": list(d.orders), "status": d.status.value})
            return d
        self._dispatch(self.storage.write(run))

    @staticmethod
    def _record(db: sqlite_utils.Database, row: dict, d: Decision, version: Optional[str] = None) -> None:
        db.execute("update alerts set status = ?, reason = ?, orders = ?, decided_at = ? where id = ?",
                   (d.status.value, d.reason, json.dumps(list(d.orders)), utcnow(), row["id"]))
        if d.status is not AlertStatus.ACCEPTED:
            who = f"{row['strategy']} v{version}" if version else row["strategy"]
            Storage.add_event(db, f"alert_{d.status.value}", f"alert {row['id']} ({who} "
                              f"{row['execution_type']}) {d.status.value}: {d.reason}",
                              "warning", row["strategy"], {"alert_id": row["id"], "version": version})

    # ---- commands ----
    def _process_commands(self) -> None:
        for row in self.storage.rows("select * from commands where status = 'pending' order by id"):
            handler = getattr(self, f"_cmd_{row['kind']}", None)
            try:
                if handler is None:
                    raise ValueError(f"unknown command {row['kind']!r}")
                result = {"ok": True, **(handler(json.loads(row["args"])) or {})}
            except LookupError as e:
                result = {"ok": False, "missing": True, "error": str(e).strip("'\"")}
            except Exception as e:
                log.exception("command %s failed", row["kind"])
                result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            self.storage.write(lambda db: db.execute(
                "update commands set status = 'done', result = ?, done_at = ? where id = ?",
                (json.dumps(result, default=str), utcnow(), row["id"])))
            self.inbox.decided("commands", str(row["id"]))

    def _cmd_broker_session(self, args: dict) -> dict:
        """A new token was saved by /broker/callback: use it now."""
        from .broker_session import load_token
        saved = load_token(self.data_dir) if self.data_dir else None
        broker = self.broker
        if saved is None or not hasattr(broker, "use_token"):
            raise LookupError("no saved broker token to load")
        broker.use_token(saved["access_token"], saved["uid"], saved.get("actid"))
        valid = broker.check_session()
        if valid:  # reconnect the feed with the new token; read the book and positions now
            self.on_session_restored()
            self._recover()
            self._risk_check(force_poll=True)
        return {"valid": valid}

    def _cmd_halt(self, args: dict) -> dict:
        state = TradingState(args["mode"])
        if state is TradingState.ACTIVE:  # an explicit resume also replaces an unreadable risk record
            self.gate.manager.repair(self.gate.clock.day(self.now()))
        self.storage.write(lambda db: self.gate.set_state(db, state, args.get("reason") or "set by the user",
                                                          args.get("by") or "api"))
        return {"state": state.value}

    def _cmd_plugin(self, args: dict) -> dict:
        """enable, disable or reload one plugin of a kind."""
        registry = self.plugin_registries[args["kind"]]
        entry = registry.entries.get(args["name"])
        if entry is None or (entry.path is None and entry.live is None):
            raise LookupError(f"no {args['kind']} named {args['name']!r}")
        by = args.get("by") or "api"
        if args["action"] in ("enable", "disable"):
            registry.set_disabled(args["name"], args["action"] == "disable", f"{args['action']}d by {by}")
        elif args["action"] == "reload":
            if entry.path is None or not entry.path.exists():
                raise LookupError(f"{args['kind']} {args['name']!r} has no file to reload")
            outcome = registry.prepare(entry.path, force=True)
            if outcome is not None:
                registry.apply(outcome)
        entry = registry.entries[args["name"]]
        return {"name": entry.name, "status": entry.status, "generation": entry.generation, "error": entry.error}

    def _cmd_ticks(self, args: dict) -> dict:
        ticks = [Tick(t["exchange"], t["symbol"], Decimal(t["ltp"])) for t in args["ticks"]]
        self._apply_ticks(ticks)
        return {"applied": len(ticks)}

    def on_ticks(self, ticks: list[Tick]) -> None:
        """Feed callback: only enqueue; the engine thread applies them."""
        self._events.put(("ticks", ticks))

    def _apply_ticks(self, ticks: list[Tick]) -> None:
        """New prices: store them, move the (paper) market, run strategies' on_tick, check risk."""
        self._in_ticks = True
        try:
            self._apply_ticks_now(ticks)
        finally:
            self._in_ticks = False

    def _apply_ticks_now(self, ticks: list[Tick]) -> None:
        now = utcnow()
        self.storage.write(lambda db: db["quotes"].upsert_all(
            [{"exchange": t.exchange, "symbol": t.symbol, "ltp": str(t.ltp), "at": now} for t in ticks],
            pk=("exchange", "symbol")))
        if self.apply_tick is not None:
            for t in ticks:
                self.apply_tick(t.exchange, t.symbol, t.ltp)
        self._handle(self._drain())
        if time.monotonic() - self._last_risk >= RISK_EVERY_S:  # risk sees the new prices before strategies do
            self._risk_check()
        else:
            self._risk_dirty = True
        for t in ticks:
            for live in self.strategies.subscribers(t):
                self._act(live.candidate.name, self.strategies.ask(live, "strategy_on_tick", tick=t), "on_tick")

    def _cmd_exit_all(self, args: dict) -> dict:
        return self._flatten(f"exit-all by {args.get('by') or 'api'}")

    def _flatten(self, why: str, strategy: Optional[str] = None, product: Optional[str] = None) -> dict:
        """Stop orders that add exposure and exit each open position (all, one strategy's, or one product's)."""
        try:  # the broker's net now, so that nothing closed outside is sold again; unreadable: no cap
            net: Optional[dict] = {(p.exchange, p.symbol, p.product.value): p.net_qty for p in self.broker_positions()}
        except Exception as e:
            log.warning("%s: the broker's positions are unreadable (%s); exits are capped by our own book only", why, e)
            net = None
        done = self.storage.write(lambda db: flatten.flatten(
            db, why, lambda d, name, intents: self.evaluate(d, name, intents, alert_id=None), net, strategy, product))
        self._dispatch(Decision(AlertStatus.ACCEPTED, why, done.orders, done.cancels), why)
        return {"orders": list(done.orders), "cancelled": done.cancelled_new, "cancelling": list(done.cancels),
                "left": list(done.left)}

    def _dispatch(self, decision: Decision, why: str = "") -> None:
        """Cancels first, so nothing new can fill while the new orders go out; then the new orders."""
        for oid in decision.cancels:
            self._cancels_sent[oid] = time.monotonic()
            self.sender.enqueue_cancel(oid, why or decision.reason or "cancel")
        for oid in decision.orders:
            self.sender.enqueue(oid)

    def _cancel_requested(self, rows: list[dict]) -> None:
        """Orders marked for cancelling before their broker id was known: cancel them once it is (again after 5 s)."""
        now = time.monotonic()
        for row in rows:
            if row.get("cancel_requested") and row["status"] in flatten.WORKING and row["broker_order_id"] \
                    and now - self._cancels_sent.get(row["id"], -10.0) >= 5.0:
                self._cancels_sent[row["id"]] = now
                self.sender.enqueue_cancel(row["id"], row["cancel_requested"])

    # ---- risk ----
    def _risk_check(self, force_poll: bool = False) -> None:
        """Poll the broker's positions now and then; compare the day's PnL with the limits; act."""
        now = self.now()
        mono = time.monotonic()
        if force_poll or mono - self._last_poll >= self.risk_poll_s:
            self._last_poll = mono
            self._poll_broker()
        self._last_risk = mono
        pnl, by_strategy = views.pnl_by_strategy(self.storage)

        def exposed() -> bool:  # asked only after a breach: positions that no working exit covers
            return bool(self.storage.one(
                "select 1 from positions p where p.net_qty != 0 and abs(p.net_qty) > coalesce((select sum(o.qty - "
                "o.filled_qty) from orders o where o.strategy = p.strategy and o.exchange = p.exchange and "
                "o.symbol = p.symbol and o.product = p.product and o.action = 'EXIT' and o.status in "
                "('NEW','SUBMITTED','UNKNOWN','OPEN','PARTIAL')), 0) limit 1"))
        caps = {n: Decimal(str(self.strategies.params(n)["max_loss"])) for n in by_strategy
                if self.strategies.params(n).get("max_loss")}
        actions = self.gate.manager.check(now, None if self._blind else pnl, self._blind, exposed, by_strategy, caps)
        if not self._blind:
            self._record_pnl(now, pnl)
        for action in actions:
            self._act_on_risk(action)

    def _record_pnl(self, now: datetime, pnl: Decimal) -> None:
        """Store a point of the day's PnL curve when it has changed, at most every PNL_POINT_EVERY_S."""
        mono = time.monotonic()
        last_at, last = self._pnl_point
        if pnl == last or mono - last_at < PNL_POINT_EVERY_S:
            return
        self._pnl_point = (mono, pnl)
        day = self.gate.clock.day(now).isoformat()
        self.storage.write(lambda db: db.execute("insert into pnl_points (day, at, pnl) values (?, ?, ?)",
                                                 (day, utcnow(), str(pnl))))

    def _act_on_risk(self, action: Any) -> None:
        halted_by_risk = lambda: self.gate.state().get("by") == "risk"  # noqa: E731
        if action.kind == "fail_closed":
            if self.gate.trading_state is TradingState.ACTIVE:
                self.storage.write(lambda db: self.gate.set_state(db, TradingState.REDUCE_ONLY, action.message, "risk"))
            return  # said once, through the state change
        self.storage.write(lambda db: Storage.add_event(db, f"risk_{action.kind}", action.message, action.severity,
                                                        action.data.get("strategy"), action.data or None))
        if action.kind == "breach":
            self.storage.write(lambda db: self.gate.set_state(db, TradingState.HALTED, action.message, "risk"))
            self._flatten("risk: daily max loss breached")
        elif action.kind == "violation":
            self._flatten("risk: positions after the breach")
        elif action.kind == "resume" and halted_by_risk():
            self.storage.write(lambda db: self.gate.set_state(db, TradingState.ACTIVE, action.message, "risk"))
        elif action.kind == "strategy_breach":
            self._flatten(f"risk: strategy {action.data['strategy']} max loss", strategy=action.data["strategy"])
        elif action.kind == "new_day":  # the day's PnL starts again; open positions carry over
            self.storage.write(lambda db: (db.execute("update positions set realized_pnl = '0'"),
                                           db.execute("delete from positions where net_qty = 0")))
        elif action.kind == "square_off":
            self._flatten("risk: intraday square-off", product="I")

    def _poll_broker(self) -> None:
        """Read the broker's positions (unreadable: blind, never "flat") and its books (trades made outside)."""
        try:
            positions = self.broker_positions()
        except Exception as e:
            self._blind = f"{type(e).__name__}: {e}"
            return
        self._blind = None
        self._broker_net = {(p.exchange, p.symbol, p.product.value): p.net_qty for p in positions}
        try:
            book: Optional[list[BrokerOrder]] = self.broker_book()
        except Exception as e:  # without the books no outside trade can be told from our own: adopt nothing
            log.warning("outside trades not checked: the broker's books are unreadable (%s)", e)
            book = None
        self._adopt_outside(book, positions)

    def _adopt_outside(self, book: Optional[list[BrokerOrder]], broker_positions: list) -> None:
        """Apply fills of orders placed outside the host; then count what still differs, if nothing explains it.

        An unexplained difference must be seen on two polls in a row, and is ignored where one of our
        orders is unfinished (a fill may be at the broker a moment before the watcher has applied it).
        """
        if book is None:
            self._manual_seen = {}
            return
        remarks = list({o.remarks for o in book if o.remarks})
        ours: set[str] = set()
        for i in range(0, len(remarks), 500):
            chunk = remarks[i:i + 500]
            ours |= {r["id"] for r in self.storage.rows(
                f"select id from orders where id in ({','.join('?' * len(chunk))})", tuple(chunk))}
        fills = outside.foreign_fills(book, ours)
        if fills:
            adopted = self.storage.write(lambda db: [outside.adopt_fill(db, *f) for f in fills])
            self._risk_dirty = self._risk_dirty or any(a is not None for a in adopted)
        explained = {(o.exchange, o.symbol, o.product) for o in book if o.remarks not in ours}
        mine: dict[tuple, int] = {}
        for r in self.storage.rows("select exchange, symbol, product, sum(net_qty) n from positions "
                                   "group by exchange, symbol, product"):
            mine[(r["exchange"], r["symbol"], r["product"])] = r["n"]
        working = {(r["exchange"], r["symbol"], r["product"]) for r in self.storage.rows(
            f"select distinct exchange, symbol, product from orders where status in "
            f"({','.join('?' * len(OPEN_STATUSES))})", OPEN_STATUSES)}
        theirs = {(p.exchange, p.symbol, p.product.value): p for p in broker_positions}
        diffs = {}
        for key in (set(mine) | set(theirs)) - explained - working:
            diff = (theirs[key].net_qty if key in theirs else 0) - mine.get(key, 0)
            if diff:
                diffs[key] = diff
        confirmed = {k: d for k, d in diffs.items() if self._manual_seen.get(k) == d}
        self._manual_seen = {k: d for k, d in diffs.items() if k not in confirmed}
        for (ex, sym, prod), diff in confirmed.items():
            bp = theirs.get((ex, sym, prod))
            quote = self.storage.one("select ltp from quotes where exchange = ? and symbol = ?", (ex, sym))
            price = Decimal(quote["ltp"]) if quote else (bp.avg_price if bp else Decimal("0"))
            side = Side.BUY if diff > 0 else Side.SELL
            self.storage.write(lambda db: outside.allocate(
                db, ex, sym, prod, side, abs(diff), price, "found in the broker's positions (no order in today's "
                "books explains it)"))
            self._risk_dirty = True
