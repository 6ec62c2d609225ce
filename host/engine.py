"""The engine: a loop that only schedules. Each job lives in its own module:

- deciding (guard, risk gate, validation, orders): decide.py; position targets: targets.py
- risk, and what a breach does, on its own thread: risk_actions.py (flattening: flatten.py)
- trades made outside the host: outside.py; commands: commands.py; tick sanity: ticks.py
- the pre-open check, the daily summary and backup: daily.py (backup.py); orders: orders.py (sender), watcher.py (books)

The engine thread takes alerts, broker updates, ticks, plugin calls and reconciliation, in that
order, and isolates each item: one that raises is recorded as failed and the loop goes on.
"""
from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable, Optional

import sqlite_utils

from . import alert_positions, flatten, targets
from .broker_session import load_token
from .brokers.base import SessionExpired
from .commands import CONTROL, Commands, after_halts, is_halt
from .daily import Daily
from .exit_reads import ExitReads, ReadFailed
from .decide import Decider
from .ids import new_id
from .inbox import Inbox
from .market import IST
from .models import (AlertRequest, AlertStatus, BrokerOrder, BrokerView, Decision, ExecutionType, Intent, Leg, Order,
                     OrderStatus, OrderType, Product, Side, TargetLeg, Tick)
from .orders import OrderSender
from .outside import OutsideTrades
from .plugins.strategies import Asked, StrategyRegistry
from .protect import Protector, from_json
from .risk import RiskGate
from .risk_actions import RISK_HEARTBEAT_KEY, RiskLoop
from .storage import HEARTBEAT_KEY, Storage, dec, utcnow
from .ticks import TickSanity
from .watcher import Watcher

log = logging.getLogger(__name__)
CLOCK_EVERY_S = 1.0
SESSION_PROBE_S = 30.0  # an expired session: how often to ask the broker whether it is back
HEARD_MAX = 20_000  # orders whose last heard state is kept (strategy_on_order is called once per state)
ALERT_POLL_S = 0.1    # alerts are handed over as they are stored, commands wake the engine; this poll finds
                      # any stored elsewhere (another worker, the CLI)
DECIDED_KEPT = 10000  # ids of alerts decided lately: one handed over and also found by the poll runs once
TICKS_HELD_KEY = "ticks_held"


def alert_from_json(text: str) -> AlertRequest:
    d = json.loads(text)
    legs = tuple(Leg(l["exchange"], l["tradingsymbol"], Side(l["direction"]), l["qty"], OrderType(l["order_type"]),
                     Product(l["product_type"]), dec(l["price"]), dec(l["trigger_price"]),
                     protection=from_json(l.get("protection"))) for l in d["legs"])
    goals = tuple(TargetLeg(t["exchange"], t["tradingsymbol"], Product(t["product_type"]), OrderType(t["order_type"]),
                            t["position"], dec(t["price"])) for t in d.get("targets") or ())
    return AlertRequest(d["strategy_name"], ExecutionType(d["execution_type"]), legs, d.get("alert_id"), goals,
                        tuple(d.get("notes") or ()))


def _forward(to: str, name: str) -> property:
    """An attribute kept by one of the engine's parts (the runtime and tests set them on the engine)."""
    return property(lambda self: getattr(getattr(self, to), name),
                    lambda self, value: setattr(getattr(self, to), name, value))


@dataclass(frozen=True)
class HookIntents:
    """Intents a strategy's hook returned, waiting for their strategy's turn or for a read of the books."""

    n: tuple[int, int, int]  # its turn among the strategy's alerts and hook intents (Engine._turn)
    strategy: str
    asked: Asked
    source: str          # on_tick, on_clock, on_order
    key: Optional[str]   # the read of the books a live EXIT waits for (exit_reads), or None
    at: float            # time.monotonic() when it came


def _undecided_alerts(db: sqlite_utils.Database) -> tuple[list[dict], int]:
    """The alerts waiting for a decision, in stored order, and the last alert's rowid, from one snapshot."""
    db.execute("begin")
    try:
        rows = list(db.query("select rowid seq, * from alerts where status = 'received' order by rowid"))
        return rows, db.execute("select coalesce(max(rowid), 0) from alerts").fetchone()[0]
    finally:
        db.execute("commit")


class Engine:
    """Schedules the work: the engine thread for alerts, updates, ticks and plugins; risk's own thread."""

    preopen = _forward("daily", "preopen")
    summary_time = _forward("daily", "summary_time")
    gateway_call = _forward("daily", "gateway_call")
    instruments = _forward("decider", "instruments")
    risk_poll_s = _forward("risk", "risk_poll_s")

    def __init__(self, storage: Storage, inbox: Inbox, gate: RiskGate, sender: OrderSender, watcher: Watcher,
                 strategies: StrategyRegistry, broker_book: Callable[[], list[BrokerOrder]],
                 apply_tick: Optional[Callable[[str, str, Decimal], None]], max_alert_age_s: int,
                 require_known: bool = False, reconcile_every_s: float = 5.0,
                 broker_positions: Callable[[], list] = list, risk_poll_s: float = 5.0,
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc), tick_jump_pct: Decimal = Decimal("20"),
                 flatten_scope: str = "strategies+manual"):
        self.storage, self.inbox, self.gate, self.sender, self.watcher = storage, inbox, gate, sender, watcher
        self.strategies = strategies
        self.broker_book = broker_book
        self.apply_tick = apply_tick
        self.max_alert_age_s = max_alert_age_s
        self.require_known = require_known
        self.reconcile_every_s = reconcile_every_s
        self.now = now
        self.decider = Decider(gate, strategies.params, self._targets_stored)
        self.daily = Daily(storage, gate)
        self.outside = OutsideTrades(storage, broker_positions, broker_book)
        self.risk = RiskLoop(storage, gate, self.decider, self._dispatch, self.outside, strategies.params, now,
                             risk_poll_s, flatten_scope)
        self.exit_reads = ExitReads(lambda: self.outside.read_for_exits(), lambda: self._events.put(("wake", None)))
        self.commands = Commands(storage, inbox)
        self.commands.handlers.update(halt=self.risk.halt, exit_all=self.risk.exit_all, plugin=self._cmd_plugin,
                                      ticks=self._cmd_ticks, broker_session=self._cmd_broker_session,
                                      paper_fault=self._cmd_paper_fault)
        self.risk.commands = lambda: self.commands.run(CONTROL, after_halts())  # a resume, an exit-all
        self.risk.halts = lambda: self.commands.run(("halt",), is_halt)  # at once, on a thread of their own
        self.risk.reprice = sender.enqueue_reprice
        sender.on_reprice_refused = lambda oid, reason: self.submit(lambda: self._reprice_refused(oid, reason))
        self.ticks = TickSanity(tick_jump_pct, self._stored_price)
        self.protect = Protector(storage, self._dispatch,  # stops resting at the broker, targets, trailing
                                 lambda db, name, intents, room: self.decider.evaluate(db, name, intents, alert_id=None,
                                                                                       room=room),
                                 sender.enqueue_modify,
                                 lambda: self.decider.instruments() if self.decider.instruments else None,
                                 lambda: self.risk.gate.clock.day(self.risk.now()).isoformat(),
                                 self._protect_books, lambda: self.risk.wake(poll=True))
        strategies.act = self._act  # what a strategy's tick, clock and order hooks return, acted on here
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
        self._cancels_sent: dict[str, float] = {}  # order id -> when its cancel was last asked for
        self._in_ticks = False
        self.broker: Any = None       # the live broker, for session commands (set by the runtime)
        self.on_session_restored: Callable[[], None] = lambda: None
        self._targets_waiting = True  # position targets may wait (cleared when none is found)
        self._heard: dict[str, tuple[str, int]] = {}  # order id -> the state its strategy last heard of
        self._after_start: set[str] = set()  # working orders at start: the first reconcile tells what changed
        self._session_probed = time.monotonic()  # the first probe a full SESSION_PROBE_S after the start
        self._alerts_in: list[dict] = []  # alert rows handed over or found, not decided yet, in stored order
        self._alerts_polled = 0.0
        self._look_now = False  # another process stored an alert: poll the inbox on the next step
        self._seen_seq = 0  # every alert up to this rowid is known here (found by a poll, or handed over)
        self._commands_due = True     # woken for a command (or not looked for within ALERT_POLL_S)
        self._commands_polled = 0.0
        self._decided: dict[str, None] = {}
        self._arrivals = itertools.count()  # each strategy's alerts and hook intents are taken in turn (_turn)
        self._hooks_in: list[HookIntents] = []  # hook intents waiting their strategy's turn (or the books)
        self._held: set[str] = set()  # strategies with an alert or hook intents waiting: new hook intents queue

    @property
    def data_dir(self) -> Any:
        return self.daily.data_dir

    @data_dir.setter
    def data_dir(self, value: Any) -> None:
        self.daily.data_dir = value

    # ---- life cycle ----
    def start(self, changes: list[Callable[[], None]] = ()) -> None:
        """Apply start-up changes (plugins), resume unsent orders, reconcile, then start both loops."""
        for change in changes:
            change()
        self.daily.broker = self.broker
        self.storage.keep_reserve()
        try:  # before the books are read and the feed's prices applied: today's trades made meanwhile count today
            self.risk.begin_day()
        except Exception as e:
            log.exception("beginning the new day at start-up failed; risk's first check begins it")
            self._say_day_not_begun(e)
        # what strategies knew of their working orders before the stop; the first reconcile tells them what the
        # start-up reconcile changed (on the engine thread, once risk has looked)
        working = self._watched()
        self._after_start = {r["id"] for r in working}
        self._heard.update((r["id"], (r["status"], r["filled_qty"] or 0)) for r in working)
        self._recover()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.running = True
        self._thread.start()
        try:  # a first risk check before anything is answered, so that /healthz is true from the start
            self.risk.check(poll=True)
            self.storage.write(lambda db: (Storage.put_state(db, HEARTBEAT_KEY, utcnow()),
                                           Storage.put_state(db, RISK_HEARTBEAT_KEY, utcnow())))
        except Exception:
            log.exception("the first risk check failed; risk tries again on its own thread")
        self.risk.start()
        self.inbox.hand = self._hand
        self.inbox.wake = self.wake

    def _say_day_not_begun(self, e: Exception) -> None:
        try:
            self.storage.write(lambda db: Storage.add_event(
                db, "risk_day_not_begun", f"a new trading day could not begin at start-up ({type(e).__name__}: {e}): "
                f"risk's first check begins it, after the broker's books are read, so trades made in the broker's "
                f"app while the host was stopped may count as yesterday's: compare today's PnL with the broker's",
                "error"))
        except Exception:
            log.exception("and that could not be recorded")

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the event in hand, then stop; nothing accepted is dropped (it stays in the inbox)."""
        self.inbox.wake = None
        self.inbox.hand = None
        self._stopping.set()
        self._events.put(("wake", None))
        if self._thread:
            self._thread.join(timeout)
        self.risk.stop(timeout)
        self.running = False

    def flush(self) -> None:
        """Apply broker updates and plugin changes that arrived after the loop stopped (at shutdown). Hook intents
        still waiting are stored now, in order, as orders not yet sent: the start-up sends them, its exits capped
        at the broker's net then (flatten.cap_unsent_exits); waiting alerts stay in the inbox."""
        self._handle(self._drain(), dispatch=False)
        held, self._hooks_in = self._hooks_in, []
        first_alert: dict[str, tuple] = {}  # each strategy's first alert still waiting: its turn
        for r in self._alerts_in:
            first_alert[r["strategy"]] = min(r["_n"], first_alert.get(r["strategy"], r["_n"]))
        for h in sorted(held, key=lambda h: h.n):
            waited = time.monotonic() - h.at
            if h.strategy in first_alert and first_alert[h.strategy] < h.n:  # the alert is decided at the start
                self._hook_failed(h, "the host stopped while they waited behind the strategy's alert, which is "
                                     "decided again at the start-up (they would go before it)", "warning")
            elif waited > self.max_alert_age_s:
                self._hook_failed(h, f"stale: waited {int(waited)} s, longer than ALERT_MAX_AGE_S="
                                     f"{self.max_alert_age_s}")
            elif self._still_live(h):
                self._isolated(f"{h.strategy} {h.source} intents", lambda: self._act_now(
                    h.strategy, h.asked, h.source, None))

    def wake(self) -> None:
        self._commands_due = True  # a command may be waiting
        self._events.put(("wake", None))
        self.risk.wake_halts()  # a control command may be waiting too

    def stored_elsewhere(self, table: str) -> None:
        """Another process stored an alert or a command (wakeups.py): look at the inbox now, not at the poll."""
        if table == "commands":
            self.wake()  # the engine's kinds on its next step, the control ones (halt, exit-all) on risk's thread
            return
        if self._look_now:
            return  # a look is due already: a burst (or a flood) of wake-ups puts one event in the queue
        self._look_now = True
        self._events.put(("wake", None))

    def _hand(self, row: dict) -> None:
        """A new alert row, just committed (called in commit order): decided on the engine thread."""
        self._events.put(("alert", row))

    def submit(self, fn: Callable[[], None]) -> None:
        """Run fn on the engine thread, between two events (plugin swaps use this)."""
        self._events.put(("call", fn))

    def _reprice_refused(self, order_id: str, reason: str) -> None:
        """The broker refused to move an exit towards the market: a protective stop is cancelled and its position
        exited by protect.py (as at its target), any other exit by risk's follow-up."""
        row = self.storage.one("select protection from orders where id = ?", (order_id,))
        if row is not None and row["protection"]:
            self.protect.stop_unmovable(order_id, reason)
        elif row is not None:
            self.risk.exit_unmovable(order_id, reason)

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

    def on_ticks(self, ticks: list[Tick]) -> None:
        """Feed callback: only enqueue; the engine thread applies them (after the sanity check)."""
        self._events.put(("ticks", ticks))

    # ---- the loop: it only schedules ----
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._step()
            except Exception:
                log.exception("engine step failed; continuing")
                time.sleep(0.1)

    def _step(self) -> None:
        self._handle(self._drain(block_s=0.1))
        if self._targets_waiting:
            self._isolated("position targets", self._release_targets)
        read = {key for key, (at, since) in self.protect.reading.items()
                if self.exit_reads.done(at) or time.monotonic() - since > self.protect.read_wait_s}
        if read:  # held exits whose read of the books has ended (or taken too long): sent now
            self._isolated("protection", lambda: self.protect.sync(read))
        self._process_alerts()
        now = time.monotonic()
        if self._commands_due or now - self._commands_polled >= ALERT_POLL_S:
            self._commands_due, self._commands_polled = False, now
            self._isolated("commands", lambda: self.commands.run(self.commands.other_kinds() or ("-",)))
        if now - self._last_clock >= CLOCK_EVERY_S:
            self._last_clock = now
            self._isolated("clock", self._clock)
            self._isolated("protection", self.protect.sync)
            self.risk.wake()
        if now - self._last_heartbeat >= 1.0:
            self._last_heartbeat = now
            held = self.ticks.held_count
            self.storage.keep_reserve()  # again, once a full disk has space back
            self.storage.write(lambda db: (Storage.put_state(db, HEARTBEAT_KEY, utcnow()),
                                           Storage.put_state(db, TICKS_HELD_KEY, str(held))))
        if self._reconcile_again_at and now >= self._reconcile_again_at:
            self._reconcile_again_at = 0.0
            self._last_reconcile = 0.0
        if now - self._last_reconcile >= self.reconcile_every_s:
            self._last_reconcile = now
            self._isolated("reconcile", self._reconcile)

    @staticmethod
    def _isolated(what: str, job: Callable[[], Any]) -> None:
        """Run one job; a failure is logged and the loop goes on to the next."""
        try:
            job()
        except Exception:
            log.exception("engine: %s failed; continuing", what)

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
        for kind, row in items:
            if kind == "alert":
                row["_n"] = self._turn()
                self._alerts_in.append(row)
                if row["seq"] > self._seen_seq + 1:  # a gap: another process stored one before it, its wake-up
                    self._look_now = True            # lost or late: the look decides them in rowid order
                self._seen_seq = max(self._seen_seq, row["seq"])
        updates = [u for kind, u in items if kind == "update"]
        changed = self.watcher.apply(updates) if updates else []
        if changed:
            self.risk.wake()
        if self.watcher.outside_filled:  # a trade in the broker's app: read the books now, not at the next poll,
            self.watcher.outside_filled = False  # so that a stop for more than is left is resized before it is hit
            self.risk.wake(poll=True)  # (the protections are synced on the clock, each second)
        for kind, oid in items:
            if kind == "order":
                row = self.storage.one("select * from orders where id = ?", (oid,))
                if row is not None and row["status"] == OrderStatus.NEW.value:
                    self._recover_pending = True  # held for the broker login: the recovery after it sends it
                elif row is not None:
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
        changed = list({row["id"]: row for row in changed}.values())  # the watcher's and the sender's, once each
        self._cancel_requested(changed)
        if changed:
            self._isolated("protection", lambda: self.protect.on_orders(changed))
        for row in changed:  # risk backs off an exit the broker keeps rejecting
            if row.get("protection") or row["id"] in self.protect.target_exits:
                continue  # a resting stop, or a target's exit: protect.py says what became of it
            if row["action"] == ExecutionType.EXIT.value and row["status"] == OrderStatus.REJECTED.value:
                self.risk.exit_rejected(row)
            elif row["action"] == ExecutionType.EXIT.value and row["status"] == OrderStatus.FILLED.value:
                self.risk.exit_filled(row)
        if dispatch:
            self._tell_strategies(changed)

    def _tell_strategies(self, rows: list[dict]) -> None:
        """strategy_on_order, once per state (status, filled quantity) of an order, however many paths (the
        broker's update, the sender's answer, a reconcile) report it; a protective stop's orders included."""
        for row in rows:
            state = (row["status"], row["filled_qty"] or 0)
            if self._heard.get(row["id"]) == state:
                continue
            self._heard[row["id"]] = state
            if len(self._heard) > HEARD_MAX:  # the oldest half: orders long finished
                for oid in list(self._heard)[:HEARD_MAX // 2]:
                    del self._heard[oid]
            live = self.strategies.live(row["strategy"])
            if live is not None and "strategy_on_order" in live.candidate.hooks:
                self._act(live.candidate.name, self.strategies.ask(live, "strategy_on_order",
                                                                   order=Order.from_row(row)), "on_order")

    def _clock(self) -> None:
        now = self.now().astimezone(IST)
        self.daily.broker = self.broker
        self.daily.preopen_check(now)
        self.daily.summary(now)
        self.daily.backup_if_due(now)
        for live in self.strategies.with_hook("strategy_on_clock"):
            self._act(live.candidate.name, self.strategies.ask(live, "strategy_on_clock", now=now), "on_clock")

    def _reconcile(self) -> None:
        """Reconcile with the broker's book; the owning strategies hear what it changed."""
        if not self._session_ready():
            return
        ids = sorted({r["id"] for r in self._watched()} | self._after_start)
        self._after_start = set()
        self._reconcile_book()
        for at in range(0, len(ids), 500):
            chunk = ids[at:at + 500]
            self._tell_strategies(self.storage.rows(f"select * from orders where id in ({','.join('?' * len(chunk))}) "
                                                    "order by rowid", tuple(chunk)))

    def _session_ready(self) -> bool:
        """False while the live broker's session is expired: reconciling waits for the login (which reconciles at
        once), asking the broker only every SESSION_PROBE_S whether the session is back (a login elsewhere)."""
        if not getattr(self.broker, "session_expired", False):
            return True
        now = time.monotonic()
        if now - self._session_probed < SESSION_PROBE_S:
            return False
        self._session_probed = now
        try:
            valid = self.gateway_call("check_session", self.broker.check_session)
        except Exception as e:
            log.debug("broker session probe failed: %s", e)
            return False
        if valid:
            self.on_session_restored()
        return bool(valid)

    def _watched(self) -> list[dict]:
        """The orders a reconcile may change (unfinished, or LOST and still looked for): id, status, filled_qty."""
        return self.storage.rows("select id, status, filled_qty from orders where status in ('NEW', 'SUBMITTED', "
                                 "'UNKNOWN', 'OPEN', 'PARTIAL', 'LOST')")

    def _reconcile_book(self) -> None:
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
                (log.debug if isinstance(e, SessionExpired) else log.warning)("reconcile with the broker failed: %s", e)
            self._cancel_requested(self.storage.rows("select * from orders where cancel_requested is not null and "
                                                     "status in ('OPEN', 'PARTIAL')"))

    def _recover(self) -> None:
        """At start-up: reconcile with the broker's book, then send the orders it has never seen."""
        if getattr(self.broker, "session_expired", False):  # waits for the login, which calls this again
            self._recover_pending = True
            return
        try:
            unsent = self.watcher.reconcile(self.broker_book(), set(), startup=True,
                                            resend_max_age_s=self.max_alert_age_s,
                                            book_is_synchronous=getattr(self.broker, "book_is_synchronous", False))
        except Exception as e:
            # without the book we cannot tell what was sent: send nothing, retry on the next reconcile; an
            # expired session has said so once already (broker_session): not again at every try
            (log.debug if isinstance(e, SessionExpired) else log.error)(
                "start-up reconcile failed; unsent orders wait until the broker answers: %s", e)
            self._recover_pending = True
            return
        if unsent and not getattr(self.broker, "book_is_synchronous", False):
            view = self.outside.read_for_exits()  # the trader may have closed a position in the app meanwhile
            if view is None:  # without the broker's positions, no exit is sent late: tried again shortly
                log.warning("unsent orders wait: the broker's positions cannot be read (%s)", self.outside.blind)
                self._recover_pending = True
                return
            unsent = self.storage.write(lambda db: flatten.cap_unsent_exits(
                db, unsent, flatten.closing_room(db, view, skip=unsent)))
        self._recover_pending = False
        for oid in unsent:
            log.info("order %s was never handed to the broker (the host stopped, or the broker session was over); "
                     "sending it now", oid)
            self.sender.enqueue(oid)

    # ---- alerts ----
    def _process_alerts(self) -> None:
        now = time.monotonic()
        if self._look_now or now - self._alerts_polled >= ALERT_POLL_S:  # stored by another worker, or at start
            self._look_now, self._alerts_polled = False, now
            known = {r["id"] for r in self._alerts_in}
            found, top = self.storage.read(_undecided_alerts)
            for r in (r for r in found if r["id"] not in known):  # stored by another worker, found late: its turn
                later = [a for a in self._alerts_in if a["strategy"] == r["strategy"] and a["seq"] > r["seq"]]
                # is just before its strategy's first alert stored after it (taken in stored order), else now
                r["_n"] = (min(later, key=lambda a: a["seq"])["_n"][0], -1, r["seq"]) if later else self._turn()
                self._alerts_in.append(r)
            self._seen_seq = max(self._seen_seq, top)
        self._take_turns()

    def _turn(self) -> tuple[int, int, int]:
        """The next turn: a strategy's alerts and hook intents are taken in this order (_take_turns)."""
        return next(self._arrivals), 0, 0

    def _take_turns(self) -> None:
        """Decide alerts and act on hooks' intents, each strategy's in the order they came. One waits while its
        strategy is in a call, or for a read of the broker's books (exit_reads: a live EXIT); the strategy's later
        ones wait behind it, other strategies' go on."""
        turns = sorted([(r["_n"], r) for r in self._alerts_in] + [(h.n, h) for h in self._hooks_in],
                       key=lambda t: t[0])
        self._alerts_in, self._hooks_in = [], []
        waiting: set[str] = set()
        for at, (_, item) in enumerate(turns):
            if self._stopping.is_set():  # what is left keeps its turn
                for _, rest in turns[at:]:
                    self._keep(rest)
                break
            try:
                if isinstance(item, HookIntents):
                    self._hook_turn(item, waiting)
                else:
                    self._alert_turn(item, waiting)
            except Exception:  # (a full disk): it keeps its turn, tried again on the next step; the rest go on
                hook = isinstance(item, HookIntents)
                log.exception("engine: the turn of %s failed; tried again", item.strategy if hook else item["id"])
                if not hook:
                    if not self._undecided(item["id"]):
                        continue
                    self._decided.pop(item["id"], None)
                self._keep(item)
                waiting.add(item.strategy if hook else item["strategy"])
        self._held = waiting

    def _keep(self, item: dict | HookIntents) -> None:
        (self._hooks_in if isinstance(item, HookIntents) else self._alerts_in).append(item)  # type: ignore[arg-type]

    def _undecided(self, alert_id: str) -> bool:
        """Still `received` in the inbox (never decided twice): checked only after a turn failed."""
        try:
            row = self.storage.one("select status from alerts where id = ?", (alert_id,))
        except Exception:
            return True  # unreadable: kept; the check is made again when its next turn fails
        return row is not None and row["status"] == AlertStatus.RECEIVED.value

    def _alert_turn(self, row: dict, waiting: set[str]) -> None:
        if row["id"] in self._decided:
            return  # handed over and found by the poll too: decided once
        name = row["strategy"]
        if name in waiting or (self.strategies.working(name) and not self.strategies.live(name).caller.busy()):
            waiting.add(name)  # within its budget: asked again on the next step
            self._alerts_in.append(row)
            if self._wants_view(row):
                self.exit_reads.ask(row["id"])  # read with the alert before it: one read serves both
            return
        try:
            ready, view = self._view_for(row)
        except ReadFailed as e:  # decided below: it fails, saying why
            ready, view = True, e
        if not ready:  # the broker's books are being read for it
            waiting.add(name)
            self._alerts_in.append(row)
            return
        self._decided[row["id"]] = None
        if len(self._decided) > DECIDED_KEPT:
            del self._decided[next(iter(self._decided))]
        try:
            self._process_alert(row, view)
        except Exception as e:  # isolated to this alert: it fails with the error, the loop goes on
            log.exception("alert %s failed", row["id"])
            decision = Decision(AlertStatus.FAILED, f"the host failed on this alert ({type(e).__name__}: {e}); "
                                                    f"not executed")
            if self.storage.write(lambda db: self._record_failure(db, row, decision)):
                self._told(row, decision)
            else:  # its decision was committed before the failure: it stands, and its orders go out by the recovery
                self._recover_pending = True
                self.inbox.decided("alerts", row["id"])  # the waiter reads the decision as stored

    def _hook_turn(self, h: HookIntents, waiting: set[str]) -> None:
        waited = time.monotonic() - h.at
        if waited > self.max_alert_age_s:
            self.exit_reads.forget(h.key or "")
            self._hook_failed(h, f"stale: waited {int(waited)} s, longer than ALERT_MAX_AGE_S={self.max_alert_age_s}")
            return
        if h.strategy in waiting:
            self._hooks_in.append(h)
            if h.key is not None:
                self.exit_reads.ask(h.key)  # read with the one before it: one read serves both
            return
        view: Optional[BrokerView] = None
        if h.key is not None:
            try:
                ready, view = self.exit_reads.take(h.key)
            except ReadFailed as e:
                self._hook_failed(h, str(e))
                return
            if not ready:
                waiting.add(h.strategy)
                self._hooks_in.append(h)
                return
        if not self._still_live(h):
            return
        try:
            self._act_now(h.strategy, h.asked, h.source, view)
        except Exception as e:  # isolated: the others go on
            log.exception("strategy %s %s intents failed", h.strategy, h.source)
            self._hook_failed(h, f"the host failed on them ({type(e).__name__}: {e})")

    def _still_live(self, h: HookIntents) -> bool:
        """The version whose hook asked is still the strategy's, enabled (intents held for the books may outlive
        it); if not, they are dropped and said, as posted intents are (plugin_late)."""
        entry = self.strategies.entries.get(h.strategy)
        if entry is None or (not entry.disabled and entry.live is not None
                             and entry.live.candidate.version == h.asked.version):
            return True
        self.storage.write(lambda db: Storage.add_event(
            db, "plugin_late", f"strategy {h.strategy} v{h.asked.version} was disabled or replaced while its "
            f"{h.source} intents waited for the broker's books; {len(h.asked.intents)} intent(s) dropped", "warning",
            h.strategy, {"hook": h.source, "version": h.asked.version}))
        return False

    def _hook_failed(self, h: HookIntents, why: str, severity: str = "error") -> None:
        try:
            self.storage.write(lambda db: Storage.add_event(
                db, f"strategy_{h.source}", f"strategy {h.strategy} v{h.asked.version} {h.source}: "
                f"{len(h.asked.intents)} intent(s) -> failed: {why}; not executed", severity, h.strategy,
                {"version": h.asked.version, "orders": [], "status": AlertStatus.FAILED.value}))
        except Exception:
            log.exception("strategy %s %s intents failed (%s); not executed", h.strategy, h.source, why)

    def _stale(self, row: dict) -> Optional[timedelta]:
        """How long a stale alert waited (longer than ALERT_MAX_AGE_S); None if it may still run."""
        age = datetime.now(timezone.utc) - datetime.fromisoformat(row["received_at"])
        return age if age > timedelta(seconds=self.max_alert_age_s) else None

    def _wants_view(self, row: dict) -> bool:
        """An EXIT, POSITION or ADJUST alert (one that may reduce) in live mode is capped at the broker's net, read
        after it arrived."""
        return row["execution_type"] != ExecutionType.ENTRY.value \
            and not getattr(self.broker, "book_is_synchronous", False)

    def _view_for(self, row: dict) -> tuple[bool, Optional[BrokerView]]:
        """(False, None) while the read of the books an alert needs runs (exit_reads.py); (True, the view) once it
        has; (True, None) for an alert that needs none."""
        if not self._wants_view(row):
            return True, None
        if self._stale(row):
            self.exit_reads.forget(row["id"])
            return True, None
        return self.exit_reads.take(row["id"])

    def _process_alert(self, row: dict, view: Optional[BrokerView] | ReadFailed = None) -> None:
        age = self._stale(row)
        if age is not None:
            decision = Decision(AlertStatus.FAILED, f"stale: waited {int(age.total_seconds())} s, longer than "
                                                    f"ALERT_MAX_AGE_S={self.max_alert_age_s}; not executed")
            self.storage.write(lambda db: self._record(db, row, decision))
        elif isinstance(view, ReadFailed):
            raise view
        else:
            alert = alert_from_json(row["body"])  # view: the trader may have just closed it in the broker's app
            asked = (self.strategies.admit(alert, self.require_known) if alert.execution_type is ExecutionType.POSITION
                     else self.strategies.route_alert(alert, self.require_known))
            if asked.error:
                decision = Decision(asked.status, asked.error)
                self.storage.write(lambda db: self._record(db, row, decision))
            elif alert.execution_type is ExecutionType.POSITION:
                decision = self.storage.write(lambda db: self._decide_targets(
                    db, row, alert, asked.version, flatten.closing_room(db, view)))
            else:
                decision = self.storage.write(lambda db: self._decide(
                    db, row, alert.strategy, list(asked.intents), asked.version, flatten.closing_room(db, view),
                    asked.as_sent))
        self._told(row, decision)
        self._dispatch(decision)

    def _told(self, row: dict, d: Decision) -> None:
        """Wake the alert's waiter with the decision just committed (the row _record wrote)."""
        self.inbox.decided("alerts", row["id"], {**row, "status": d.status.value, "reason": d.reason,
                                                 "orders": json.dumps(list(d.orders))})

    def _decide(self, db: sqlite_utils.Database, row: dict, strategy: str, intents: list[Intent],
                version: Optional[str], room: Optional[flatten.Room] = None, as_sent: bool = False) -> Decision:
        """An alert's intents decided; as_sent (its own legs, no plugin rewrote them): its ADJUSTs are relative to
        what TradingView believes (alert_positions.py: after a sale in the app, not sold again)."""
        planned = alert_positions.plan(  # an alert_id's earlier try counts within ALERT_ID_TTL_S, as the inbox's does
            db, strategy, intents, row["client_alert_id"], (datetime.now(timezone.utc) - timedelta(
                seconds=self.inbox.alert_id_ttl_s)).isoformat(timespec="milliseconds")) if as_sent else None
        decision = self.decider.evaluate(db, strategy, planned.intents if planned else intents, alert_id=row["id"],
                                         version=version, room=room, out_now=True, legs=intents)
        accepted = decision.status is AlertStatus.ACCEPTED
        if accepted:  # a newer alert in a symbol drops a reversal waiting there
            targets.supersede(db, strategy, {(i.exchange, i.symbol) for i in intents}, row["id"])
        if planned is not None:
            alert_positions.store(db, strategy, planned, accepted)  # whatever the host did: TradingView believes it
            if accepted and planned.notes:
                decision = replace(decision, reason="; ".join(planned.notes + ([decision.reason] if decision.reason
                                                                                else [])))
        self._record(db, row, decision, version)
        return decision

    def _decide_targets(self, db: sqlite_utils.Database, row: dict, alert: AlertRequest,
                        version: Optional[str], room: Optional[flatten.Room] = None) -> Decision:
        """A POSITION alert: only the difference from the strategy's own position is sent (see targets); its
        exits capped at the broker's net, as an EXIT alert's are (a position closed in the broker's app)."""
        decision = targets.decide(db, row["id"], alert.strategy, alert.targets, self._evaluator(version, room))
        self._targets_waiting = True
        alert_positions.set_beliefs(db, alert.strategy, alert_positions.targets(alert.targets))
        self._record(db, row, decision, version)
        return decision

    def _evaluator(self, version: Optional[str] = None, room: Optional[flatten.Room] = None) -> targets.Evaluate:
        return lambda db, strategy, intents, alert_id: self.decider.evaluate(db, strategy, intents, alert_id, version,
                                                                             room=room)

    def _release_targets(self) -> None:
        """Position targets whose wait is over (exits filled, cancels done): plan them again, send or drop."""
        rows = self.storage.rows("select * from position_targets where status = ? order by id", (targets.WAITING,))
        self._targets_waiting = bool(rows)
        for row in rows:
            if not self.storage.read(lambda db: targets.ready(db, row, self.max_alert_age_s)):
                continue
            ready, view = self._target_view(row)
            if ready:  # planned again from the strategy's position: its exit capped at the broker's net, as ever
                self._dispatch(self.storage.write(lambda db: targets.release(
                    db, row, self._evaluator(room=flatten.closing_room(db, view)), self.max_alert_age_s)))

    def _target_view(self, row: dict) -> tuple[bool, Optional[BrokerView]]:
        """A waiting target is planned again (live) on a read of the books made once its wait was over
        (exit_reads); (False, None) until then, and again after a read that failed (logged)."""
        if getattr(self.broker, "book_is_synchronous", False):
            return True, None
        try:
            return self.exit_reads.take(f"target:{row['id']}")
        except ReadFailed as e:
            log.warning("position target %s of alert %s waits: %s; read again", row["id"], row["alert_id"], e)
            return False, None

    def _protect_books(self, read: str) -> tuple[bool, Optional[BrokerView], str]:
        """For an exit a stop held (protect.py), live: a read of the books begun once the stop had ended, however
        long ago it ended (an exit waits for no second read); and, if the exit cannot be capped, why."""
        if getattr(self.broker, "book_is_synchronous", False):
            return True, None, ""
        try:
            ready, view = self.exit_reads.take(read, fresh_s=None)
        except ReadFailed as e:
            return True, None, str(e)
        blind = self.outside.blind
        return ready, view, ("" if view is not None or not ready else
                             f"the broker's positions are unreadable ({blind or 'no answer'})")

    def _targets_stored(self) -> None:
        self._targets_waiting = True

    def _act(self, strategy: str, asked: Asked, source: str) -> None:
        """Turn what a strategy hook returned into orders, through the guard and risk; record the outcome."""
        if asked.error or not asked.intents:
            return  # failures were recorded as plugin events where they happened
        # a hook's exit or reduction, live, is capped at the broker's net read after it (a position closed in the
        # broker's app)
        key = new_id("h") if not getattr(self.broker, "book_is_synchronous", False) and any(
            i.action is not ExecutionType.ENTRY for i in asked.intents) else None
        if key is None and strategy not in self._held and all(r["strategy"] != strategy for r in self._alerts_in):
            self._act_now(strategy, asked, source, None)
            return  # (an alert of the strategy come before it, in the same events, is decided first)
        self._hooks_in.append(HookIntents(self._turn(), strategy, asked, source, key, time.monotonic()))
        self._held.add(strategy)  # its later intents queue behind these
        if key is not None:
            self.exit_reads.ask(key)

    def _act_now(self, strategy: str, asked: Asked, source: str, view: Optional[BrokerView]) -> None:
        def run(db: sqlite_utils.Database) -> Decision:
            d = self.decider.evaluate(db, strategy, list(asked.intents), alert_id=None, version=asked.version,
                                      room=flatten.closing_room(db, view), out_now=True)
            words = f"{len(d.orders)} order(s)" if d.status is AlertStatus.ACCEPTED else f"{d.status.value}: {d.reason}"
            if d.status is AlertStatus.ACCEPTED and d.reason:
                words += f" ({d.reason})"
            Storage.add_event(db, f"strategy_{source}", f"strategy {strategy} v{asked.version} {source}: "
                              f"{len(asked.intents)} intent(s) -> {words}",
                              "info" if d.status is AlertStatus.ACCEPTED else "warning", strategy,
                              {"version": asked.version, "orders": list(d.orders), "status": d.status.value})
            return d
        self._dispatch(self.storage.write(run))

    @classmethod
    def _record_failure(cls, db: sqlite_utils.Database, row: dict, d: Decision) -> bool:
        """Record a failure on an alert still undecided; False (nothing written) when its decision was committed."""
        stored = db.execute("select status from alerts where id = ?", (row["id"],)).fetchone()
        if stored is not None and stored[0] != AlertStatus.RECEIVED.value:
            return False
        cls._record(db, row, d)
        return True

    @staticmethod
    def _record(db: sqlite_utils.Database, row: dict, d: Decision, version: Optional[str] = None) -> None:
        db.execute("update alerts set status = ?, reason = ?, orders = ?, decided_at = ? where id = ?",
                   (d.status.value, d.reason, json.dumps(list(d.orders)), utcnow(), row["id"]))
        if d.status is not AlertStatus.ACCEPTED:
            who = f"{row['strategy']} v{version}" if version else row["strategy"]
            Storage.add_event(db, f"alert_{d.status.value}", f"alert {row['id']} ({who} "
                              f"{row['execution_type']}) {d.status.value}: {d.reason}",
                              "warning", row["strategy"], {"alert_id": row["id"], "version": version})

    # ---- commands that run on the engine thread ----
    def _cmd_broker_session(self, args: dict) -> dict:
        """A new token was saved by /broker/callback: use it now."""
        saved = load_token(self.data_dir) if self.data_dir else None
        broker = self.broker
        if saved is None or not hasattr(broker, "use_token"):
            raise LookupError("no saved broker token to load")
        broker.use_token(saved["access_token"], saved["uid"], saved.get("actid"))
        valid = broker.check_session()
        if valid:  # reconnect the feed with the new token; read the book and positions now
            self.on_session_restored()
            self._recover()
            self.risk.check(poll=True)  # now, so that the next entry sees risk sighted again
        return {"valid": valid}

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
        """Paper ticks from the API: checked like the feed's (a jump needs a second tick to confirm it)."""
        ticks = [Tick(t["exchange"], t["symbol"], Decimal(t["ltp"])) for t in args["ticks"]]
        held = self.ticks.held_count
        self._apply_ticks(ticks)
        return {"applied": len(ticks) - (self.ticks.held_count - held), "held": self.ticks.held_count - held}

    def _cmd_paper_fault(self, args: dict) -> dict:
        """Paper mode: make the broker's positions unreadable (a reason), or readable again (None)."""
        self.broker.fail_positions = args.get("positions_unreadable")
        return {"positions_unreadable": self.broker.fail_positions}

    # ---- ticks ----
    def _stored_price(self, exchange: str, symbol: str) -> Optional[Decimal]:
        q = self.storage.one("select ltp from quotes where exchange = ? and symbol = ?", (exchange, symbol))
        return dec(q["ltp"]) if q else None

    def _apply_ticks(self, ticks: list[Tick], checked: bool = False) -> None:
        """New prices (feed ticks pass the sanity check): store them, move the (paper) market, wake risk, and
        run strategies' on_tick."""
        ticks = ticks if checked else self.ticks.admit(ticks)
        if not ticks:
            return
        self._in_ticks = True
        try:
            now = utcnow()
            self.storage.write(lambda db: db["quotes"].upsert_all(
                [{"exchange": t.exchange, "symbol": t.symbol, "ltp": str(t.ltp), "at": now} for t in ticks],
                pk=("exchange", "symbol")))
            if self.apply_tick is not None:
                for t in ticks:
                    self.apply_tick(t.exchange, t.symbol, t.ltp)
            self._handle(self._drain())
            self._isolated("protection", lambda: self.protect.on_ticks(ticks))
            self.risk.wake()  # risk sees the new prices on its own thread
            for t in ticks:
                for live in self.strategies.subscribers(t):
                    self._act(live.candidate.name, self.strategies.ask(live, "strategy_on_tick", tick=t), "on_tick")
        finally:
            self._in_ticks = False

    # ---- orders out ----
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

