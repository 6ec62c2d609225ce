"""What risk does, on its own thread and schedule: check the day's PnL against the limits, and act.

Nothing else can hold it up: alerts and plugins run on the engine thread, and a failure here is
logged and tried again on the next beat. What happens on a breach:

1. the trading state becomes `halted` (by risk);
2. every order that adds exposure is stopped, whatever its state (flatten.py);
3. every position risk counts is exited: strategy-owned ones, and today's `manual` intraday/NRML ones
   (RISK_FLATTEN_SCOPE); CNC never; the breach event lists what was left alone;
4. positions that reappear are flattened again (a `violation`), unless the trader resumed with
   `override_breach`; an exit the broker rejects is retried with back-off (1, 2, 4 ... 60 s), with
   one error event per position.

While positions cannot be read (blind), the PnL is estimated from our own book and the feed's prices,
entries are refused, and a breach still acts.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Optional

from . import flatten, pending_flattens, protect, views
from .commands import Conflict
from .decide import Decider
from .market import IST
from .models import AlertStatus, Decision, Side, TradingState
from .outside import OutsideTrades
from .pricing import DEFAULT_TICK, protected_limit
from .risk import Action, CorruptState, RiskGate, command_id
from .storage import Storage, dec, utcnow

log = logging.getLogger(__name__)
RISK_EVERY_S = 0.25
WOKEN_POLL_MIN_S = 1.0  # a burst of fills from the broker's app reads the broker's books once a second at most
PNL_POINT_EVERY_S = 5.0  # at most this often a point of the day's PnL curve is stored
RISK_HEARTBEAT_KEY = "risk_heartbeat"
QUIET_S = 60.0  # a repeated violation or a bad parameter is said at most this often
BACKOFF_MAX_S = 60.0
SCOPES = ("strategies", "strategies+manual")
EXIT_ALL_AFTER_KEY = "exit_all_after"  # exit-all's oversized exits being cancelled, and the positions exited after
EXIT_ALL_MARK = flatten.HEALED  # orders.escalate of the exits risk heals (flatten.HEALED says whose)
RESUME_WAIT_S = 1.0  # a resume waits this long at most for a check under way (halt and exit-all queue behind it)
DONE_BEFORE = "done before a restart (the state carries this command): not done again"
TRIGGER_SEEN_AFTER_S = 1.0  # a print this long after the broker took a stop is one it has seen (feed latency)
FOLLOW_UP_MAX_S = 600.0  # a follow-up whose cancels have not ended by then is dropped, said (not sent days later)


class FlattenIncomplete(Exception):
    """Some positions' exits could not be made (each is named); the others were."""


def _done_before(current: dict, command: Optional[int]) -> bool:
    """The state already carries this command: it was done before a restart (which found it not marked done)."""
    return command is not None and command_id(current) == command


class RiskLoop:
    """The risk check and its actions, and the control commands (halt, exit-all), on their own thread."""

    def __init__(self, storage: Storage, gate: RiskGate, decider: Decider, dispatch: Callable[[Decision, str], None],
                 outside: OutsideTrades, params: Callable[[str], dict], now: Callable[[], datetime],
                 risk_poll_s: float = 5.0, scope: str = "strategies+manual"):
        self.storage, self.gate, self.decider, self.dispatch, self.outside = storage, gate, decider, dispatch, outside
        gate.manager.begin_day = self._begin_day
        self.params, self.now, self.risk_poll_s, self.scope = params, now, risk_poll_s, scope
        self.commands: Callable[[], None] = lambda: None  # exit-all and resume (set by the engine)
        self.halts: Callable[[], None] = lambda: None  # halts and reduce-only, on their own thread (set by the engine)
        self.reprice: Callable[[str, Decimal], None] = lambda oid, price: None  # ModifyOrder (set by the engine)
        self.reprice_s = Decimal("3")  # EXIT_REPRICE_S
        self.protection_pct = Decimal("2")  # MARKET_PROTECTION_PCT: the size of each step
        self._wake = threading.Event()
        self._halt_wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._halts_thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()  # one check at a time, whoever asks
        self._force_poll = True
        self._last_poll = 0.0
        self._last_beat = 0.0
        self._pnl_point: tuple[float, Optional[Decimal]] = (0.0, None)
        self._said: dict[str, float] = {}  # what was said when (quiet repeats)
        self._backoff: dict[tuple, tuple[float, int]] = {}  # position key -> (next try, rejected exits in a row)
        self._rejections_told: set[str] = set()  # exits whose rejection was acted on (each once, however it came)
        self._oversize_told: set[str] = set()  # exits left working past their position (said once)
        self._flatten_retry: dict[pending_flattens.Pending, tuple[float, int]] = {}  # failed -> (next try, failures)
        self._carry_failures = 0  # the new day's carry-over failed on a passing database error this often in a row

    # ---- thread ----
    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="risk", daemon=True)
        self._halts_thread = threading.Thread(target=self._run_halts, name="risk-halts", daemon=True)
        self._thread.start()
        self._halts_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._halt_wake.set()
        deadline = time.monotonic() + timeout
        for thread in (self._thread, self._halts_thread):
            if thread:
                thread.join(max(0.0, deadline - time.monotonic()))

    def wake(self, poll: bool = False) -> None:
        """Check now (prices or fills moved); with poll, read the broker's positions too."""
        self._force_poll = self._force_poll or poll
        self._wake.set()

    def wake_halts(self) -> None:
        """A command was stored: a halt may be waiting (the halts thread also looks every RISK_EVERY_S)."""
        self._halt_wake.set()
        self._wake.set()

    def _run_halts(self) -> None:
        """Halts and reduce-only only: a state write each, never behind a check or an exit-all's broker read."""
        while not self._stopping.is_set():
            self._halt_wake.wait(RISK_EVERY_S)  # (also found without a wake: stored by another process)
            self._halt_wake.clear()
            try:
                self.halts()
            except Exception:
                log.exception("risk: running a halt failed; trying again")
                self._stopping.wait(RISK_EVERY_S)

    def _run(self) -> None:
        last_check = 0.0
        while not self._stopping.is_set():
            self._wake.wait(RISK_EVERY_S)
            self._wake.clear()
            checked = True
            due = time.monotonic() - last_check >= RISK_EVERY_S  # a check reads every position: 4 a second at most
            jobs = (self.commands, self._beat_check, self.flatten_pending, self.escalate, self.follow_up)
            for job in jobs if due else (self.commands,):
                try:
                    if job() is False:  # the check was skipped: no heartbeat says risk evaluated
                        checked = False
                except Exception:  # one bad beat never stops risk: the next one tries again
                    checked = False
                    log.exception("risk: %s failed; trying again on the next beat", getattr(job, "__name__", job))
            if not due:
                self._wake.set()  # woken early (a command, a price): check once the quarter second is up
                self._stopping.wait(RISK_EVERY_S - (time.monotonic() - last_check))
                continue
            last_check = time.monotonic()
            mono = time.monotonic()
            if checked and mono - self._last_beat >= 1.0:  # /healthz: risk evaluated within the last seconds
                self._last_beat = mono
                try:  # a full disk is reported by /healthz; risk goes on
                    self.storage.write(lambda db: Storage.put_state(db, RISK_HEARTBEAT_KEY, utcnow()))
                except Exception as e:
                    log.error("risk: heartbeat not stored (%s)", e)

    # ---- the check ----
    def _beat_check(self) -> bool:
        """The beat's check; skipped (False: no heartbeat) while one runs on another thread (the engine's, after a
        login, may wait for a slow broker read: risk's commands, a halt, must not wait behind it)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._check()
            return True
        finally:
            self._lock.release()

    def check(self, poll: bool = False) -> None:
        """Poll the broker now and then (now, with poll); compare the day's PnL with the limits; act."""
        with self._lock:
            self._check(poll)

    def begin_day(self) -> None:
        """At start-up, before the broker's books are read: a new day begins now, valued at the prices stored
        before the stop (the day's trades made meanwhile, read next, count today; at the first check they were
        carried over with yesterday's)."""
        with self._lock:
            pnl, _ = views.pnl_by_strategy(self.storage)
            for action in self.gate.manager.begin_if_new(self.now(), pnl):
                self.act(action)

    def _check(self, poll: bool = False) -> None:
        """The check itself, under self._lock."""
        mono = time.monotonic()
        soon = self._force_poll or self.outside.unsure  # woken by an app fill, or a read to confirm
        since = mono - self._last_poll
        if poll or (soon and since >= WOKEN_POLL_MIN_S) or since >= self.risk_poll_s:
            self._force_poll, self._last_poll = False, mono
            self.outside.poll()
        now = self.now()
        pnl, by_strategy = views.pnl_by_strategy(self.storage)
        blind = self.outside.blind
        actions = self.gate.manager.check(now, pnl, blind, self._exposed, by_strategy, self._caps(by_strategy))
        self._record_pnl(now, pnl)
        for action in actions:
            self.act(action)
        self._halt_again_if_breached()

    def _halt_again_if_breached(self) -> None:
        """The halt is written after the day's breach, in a write of its own: one that failed (a disk error), or
        that a restart came before, is written on a later beat (entries are refused meanwhile: RiskGate.refusal)."""
        if self.gate.trading_state is TradingState.ACTIVE and self._breach_holds():
            self.storage.write(lambda db: self.gate.set_state_if(
                db, _active, TradingState.HALTED, "today's daily loss limit was breached (the halt is written again: "
                "the first write of it did not happen)", "risk"))

    def _exposed(self) -> bool:
        """Asked only after a breach: positions risk counts that no working exit covers, or that a working exit
        not moving towards the market does (one placed since, by a strategy or the trader)."""
        if self.storage.read(lambda db: _working_exits(db, None, None, self._left_alone)):
            return True
        return bool(self._to_flatten(self.storage.rows(  # what covers: orders other than entries that close it
            "select p.* from positions p where p.net_qty != 0 and abs(p.net_qty) > coalesce((select sum(o.qty - "
            "coalesce(o.filled_qty, 0)) from orders o where o.strategy = p.strategy and o.exchange = p.exchange and "
            "o.symbol = p.symbol and o.product = p.product and o.action != 'ENTRY' and (o.side = 'SELL') = "
            "(p.net_qty > 0) and o.status in ('NEW','SUBMITTED','UNKNOWN','OPEN','PARTIAL')), 0)")))

    def _to_flatten(self, rows: list[dict]) -> list[dict]:
        return [p for p in rows if self._left_alone(p) is None]

    def _caps(self, by_strategy: dict) -> dict[str, Decimal]:
        """Each strategy's own max_loss; a value that is not a number is said (quietly) and ignored."""
        caps = {}
        for name in by_strategy:
            raw = self.params(name).get("max_loss")
            if raw in (None, "", 0):
                continue
            try:
                caps[name] = Decimal(str(raw))
                if not caps[name].is_finite():
                    raise InvalidOperation
            except (InvalidOperation, ValueError):
                caps.pop(name, None)
                self._say(f"param:{name}", "risk_param", f"strategy {name}: params.max_loss {raw!r} is not a number "
                          f"of rupees; its own limit is off, the account's daily limit still applies", "error", name)
        return caps

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

    def _say(self, key: str, kind: str, message: str, severity: str, strategy: Optional[str] = None,
             data: Optional[dict] = None) -> None:
        """An event, at most once per QUIET_S for the same key."""
        mono = time.monotonic()
        if mono - self._said.get(key, -QUIET_S) < QUIET_S:
            return
        self._said[key] = mono
        self.storage.write(lambda db: Storage.add_event(db, kind, message, severity, strategy, data))

    def escalate(self) -> None:
        """Breach and square-off exits not filled after EXIT_REPRICE_S are moved towards the market, one
        protection step further each time (on the instrument's tick), until they fill."""
        self._stop_moving_oversized()
        self._triggered_stops()
        due = (datetime.now(timezone.utc) - timedelta(seconds=float(self.reprice_s))).isoformat(timespec="milliseconds")
        for o in self.storage.rows("select o.*, q.ltp from orders o left join quotes q on q.exchange = o.exchange and "
                                   "q.symbol = o.symbol where o.escalate >= 1 and o.status in ('OPEN', 'PARTIAL') and "
                                   "o.cancel_requested is null and "
                                   "o.broker_order_id is not null and coalesce(o.repriced_at, o.created_at) <= ?",
                                   (due,)):
            if not o["ltp"]:
                continue
            n = (o["reprices"] or 0) + 1
            master = self.decider.instruments() if self.decider.instruments is not None else None
            inst = master.get(o["exchange"], o["symbol"]) if master is not None else None
            price = protected_limit(Side(o["side"]), Decimal(o["ltp"]), self.protection_pct * (n + 1),
                                    inst.tick_size if inst else DEFAULT_TICK)
            self.storage.write(lambda db: db.execute("update orders set reprices = ?, repriced_at = ? where id = ?",
                                                     (n, utcnow(), o["id"])))
            self.reprice(o["id"], price)

    def _triggered_stops(self) -> None:
        """A stop-loss market exit rests at the broker as a protected stop-limit (pricing.protected_stop): once a
        price at or through its trigger is printed after the broker took it, it is moved towards the market until
        it fills (after EXIT_REPRICE_S, like any exit risk moves), as the market order it stands for would have
        filled; said once. Only an order that closes its strategy's position is (an add-on stop never is), and
        only on a print the broker can have seen (TRIGGER_SEEN_AFTER_S after it took the order: an older price,
        or one the tick check holds back, is not taken for a trigger)."""
        def crossed(db: Any) -> list[dict]:
            found = []
            for o in db.query(
                    f"select o.id, o.strategy, o.side, o.qty, o.exchange, o.symbol, o.trigger_price, q.ltp, q.at, "
                    f"coalesce(p.net_qty, 0) net, (select min(h.at) from order_history h where h.order_id = o.id and "
                    f"h.status = 'OPEN') open_at from orders o join quotes q on q.exchange = o.exchange and q.symbol = "
                    f"o.symbol left join positions p on p.strategy = o.strategy and p.exchange = o.exchange and "
                    f"p.symbol = o.symbol and p.product = o.product where o.status in "
                    f"({','.join('?' * len(flatten.WORKING))}) and o.order_type = 'SL-MKT' and o.action != 'ENTRY' "
                    f"and o.protection is null and o.escalate is null and o.cancel_requested is null and "
                    f"o.broker_order_id is not null and o.trigger_price is not null", flatten.WORKING):
                ltp, trigger, sell = dec(o["ltp"]), dec(o["trigger_price"]), o["side"] == Side.SELL.value
                if not ltp or not (o["net"] > 0 if sell else o["net"] < 0) or o["open_at"] is None or not o["at"]:
                    continue  # no price (or none dated); or it adds to the position (or there is none to close)
                seen = datetime.fromisoformat(o["open_at"]) + timedelta(seconds=TRIGGER_SEEN_AFTER_S)
                if datetime.fromisoformat(o["at"]) > seen and (ltp <= trigger if sell else ltp >= trigger):
                    found.append(o)
            return found

        def run(db: Any) -> None:
            for o in crossed(db):  # (read again in the write: one cancelled or moved meanwhile is left alone)
                db.execute("update orders set escalate = ?, repriced_at = ? where id = ?",
                           (EXIT_ALL_MARK, utcnow(), o["id"]))
                Storage.add_event(db, "stop_triggered", f"stop-loss exit {o['id']} ({o['strategy']}) {o['side']} "
                                  f"{o['qty']} {o['exchange']}:{o['symbol']} reached its trigger {o['trigger_price']} "
                                  f"at {o['ltp']}: it rests as a protected stop-limit, so unless it fills within "
                                  f"{self.reprice_s} s it is moved towards the market until it does", "warning",
                                  o["strategy"], {"order_id": o["id"], "ltp": o["ltp"]})
        if self.storage.read(crossed):
            self.storage.write(run)

    def exit_unmovable(self, order_id: str, reason: str) -> None:
        """The broker refused to move an exit towards the market (a stop it will not turn into a limit, say). Where
        risk heals it, it is cancelled and its position exited at the broker's net once the cancel has ended
        (follow_up), within what it held now; else it is left where it is, moved no further, said."""
        healed = self._breach_holds()
        why = f"risk: exit {order_id} could not be moved towards the market"

        def run(db: Any) -> list[str]:
            o = db.execute(
                f"select o.id, o.strategy, o.exchange, o.symbol, o.product, o.side, o.qty - coalesce(o.filled_qty, 0) "
                f"as remaining, o.status, o.broker_order_id, o.escalate, coalesce(p.net_qty, 0) as net_qty from "
                f"orders o left join positions p on p.strategy = o.strategy and p.exchange = o.exchange and p.symbol = "
                f"o.symbol and p.product = o.product where o.id = ? and o.escalate is not null and o.cancel_requested "
                f"is null and o.status in ({','.join('?' * len(flatten.WORKING))})", (order_id, *flatten.WORKING))
            row = dict(zip([c[0] for c in o.description], o.fetchone() or ()))
            if not row:
                return []  # filled, cancelled or ended meanwhile
            db.execute("update orders set escalate = null where id = ?", (order_id,))
            where = (f"exit {order_id} ({row['strategy']}) {row['side']} {row['remaining']} {row['exchange']}:"
                     f"{row['symbol']}: the broker refused to move it towards the market ({reason})")
            if not (healed or row["escalate"] == EXIT_ALL_MARK):  # a breach exit after an override: the trader's
                Storage.add_event(db, "exit_not_moved", f"{where}; it is left where it is, moved no further: check "
                                  f"it at the broker (it may have filled meanwhile) before you exit the rest",
                                  "error", row["strategy"], {"order_id": order_id})
                return []
            cancels = flatten.stop(db, [row], why).working
            _follow_up_later(db, [row], why)
            Storage.add_event(db, "exit_not_moved", f"{where}, so it is cancelled; once the cancel is confirmed, "
                              f"risk exits the position at its net", "error", row["strategy"], {"order_id": order_id})
            return cancels
        cancels = self.storage.write(run)
        if cancels:
            self.dispatch(Decision(AlertStatus.ACCEPTED, why, (), tuple(cancels)), why)

    def _stop_moving_oversized(self) -> None:
        """An exit being moved that now works for more than its position holds (the trader sold part in the
        broker's app meanwhile) is moved no further: moved, it would fill past zero. See _stop_oversized."""
        moving = lambda db: [o for o in _oversized_exits(db, None, None, self._left_alone) if o["escalate"]]  # noqa
        if not self.storage.read(moving):
            return
        why = "risk: an exit being moved towards the market"
        healed = self._breach_holds()

        def run(db: Any) -> tuple[list[str], list[str]]:
            told, cancels, stopped = self._stop_oversized(db, moving(db), why, healed)
            # exit-all's, and any cancelled while the breach stands: the follow-up exits the rest (an override
            # may come before the cancel ends, and the check after the breach then no longer acts)
            ours = [o for o in stopped if healed or o["escalate"] == EXIT_ALL_MARK]
            if ours:
                _follow_up_later(db, ours, why)
            return told, cancels
        told, cancels = self.storage.write(run)
        self._oversize_told.update(told)
        if cancels:
            self.dispatch(Decision(AlertStatus.ACCEPTED, why, (), tuple(cancels)), why)

    # ---- control commands ----
    def halt(self, args: dict) -> dict:
        """halted | reduce_only | active; after today's breach, active needs override_breach. A resume takes the
        check's lock: a check on another thread (the engine's, after a login) must not store a day read before the
        override. It waits for it RESUME_WAIT_S at most, then is refused (the commands behind it, a halt or an
        exit-all, must not wait for a slow broker read); a halt never waits for a check."""
        if args.get("mode") != TradingState.ACTIVE.value:
            return self._halt(args)
        if not self._lock.acquire(timeout=RESUME_WAIT_S):
            raise Conflict(f"risk is checking the positions (a broker read still under way after {RESUME_WAIT_S:g} "
                           f"s): nothing was changed; resume again in a few seconds")
        try:
            return self._halt(args)
        finally:
            self._lock.release()

    def _begin_day(self, db: Any, halt_ends: Optional[str]) -> bool:
        """A new day, in the transaction that stores it: yesterday's realised PnL is carried over, the strategies'
        MTM limits rebased, and risk's breach halt ends (a death in between left yesterday's profit in today's PnL,
        hiding today's losses). False if the carry-over failed: today's limit then starts from the PnL as it is."""
        carried = all([_alone(db, "carry over the positions", carry_over, self),
                       _alone(db, "rebase the strategies' MTM limits", protect.rebase_limits, self)])
        if halt_ends is not None:
            self.gate.end_breach_halt(db, halt_ends)
        return carried

    def _halt(self, args: dict) -> dict:
        state, by, command = TradingState(args["mode"]), str(args.get("by") or "api"), args.get("command_id")
        if by == "risk":  # a command is never taken for risk's own halt (a new day would lift it)
            by = "a command naming itself risk"
        overriding, today = False, self.gate.clock.day(self.now())
        current = self.gate.manager.trading_state()
        if _done_before(current, command):
            return {"state": current.get("state"), "note": DONE_BEFORE}
        if state is TradingState.ACTIVE:
            self._not_overtaken(current, command)
            self.gate.manager.repair(today)  # an explicit resume also replaces an unreadable risk record
            day = self.gate.manager.load_day(today)
            if day.halted_by_breach and not args.get("override_breach"):
                at = datetime.fromisoformat(day.breached_at).astimezone(IST).strftime("%H:%M") if day.breached_at \
                    else "earlier"
                raise Conflict(f"today's daily loss limit was breached at {at} (PnL {day.last_pnl}, limit "
                               f"{day.limit}): to trade again today resume with override_breach=true; the limit then "
                               f"starts again from the current PnL")
            overriding = day.halted_by_breach

        def write(db: Any) -> bool:  # the override, its event and the state: all, or (overtaken, done) none
            now = self.gate.manager.trading_state(db)  # read again in the write: a halt may have come meanwhile
            if _done_before(now, command):
                return False
            if state is TradingState.ACTIVE:
                self._not_overtaken(now, command)
            if overriding:
                new = self.gate.manager.override(today, by, db)
                Storage.add_event(db, "risk_override", f"today's breach overridden by {by}: trading resumes, and the "
                                  f"daily limit starts again from PnL {new.last_pnl} (new limit {new.limit})", "warning",
                                  None, {"by": by, "pnl": str(new.last_pnl), "limit": str(new.limit)})
            self.gate.set_state(db, state, args.get("reason") or "set by the user", by, command)
            return True
        if not self.storage.write(write, durable=overriding):
            return {"state": self.gate.manager.trading_state().get("state"), "note": DONE_BEFORE}
        return {"state": state.value}

    @staticmethod
    def _not_overtaken(current: dict, command: Optional[int]) -> None:
        """A resume run after a halt sent later (halts run at once, a resume waits its turn) does nothing."""
        if command is not None and (command_id(current) or 0) > command:
            raise Conflict(f"a halt sent after this resume has been done (trading is {current['state']}): nothing "
                           f"was changed; resume again to trade")

    def exit_all(self, args: dict) -> dict:
        """The trader's exit-all: every position in the book, every adding order; its exits, and the exits already
        working for what it exits, move towards the market until they fill, and an exit working for more than its
        position holds is cancelled, the position exited at its net once the cancel is confirmed (follow_up)."""
        return self.flatten(f"exit-all by {args.get('by') or 'api'}", everything=True)

    def follow_up(self) -> None:
        """Positions whose oversized exits risk was cancelling (an exit-all's, a breach's, a strategy's stop's, the
        square-off's): once a position's own cancels have ended (whatever the exits did meanwhile), it is exited at
        the broker's net, once, within its Bound (what it held then; if the exit filled past zero, what it
        overfilled). A cancel that has not ended within FOLLOW_UP_MAX_S of its request is dropped with its
        position, said (never exited hours later)."""
        raw = self.storage.get_state(EXIT_ALL_AFTER_KEY)
        if not raw:
            return
        try:
            why, entries, older = _follow_ups(raw)
        except (ValueError, KeyError, TypeError, AttributeError):
            self._drop_follow_up(f"it is unreadable ({raw[:200]!r})", lambda e: True)
            return
        if older:  # an earlier release's form: stored again as read, so its clock runs from now, not from each read
            self.storage.write(lambda db: _store_follow_ups(db, why, entries))
        ids = [e["id"] for e in entries if e["id"]]
        working = {r["id"] for r in self.storage.rows(
            f"select id from orders where id in ({','.join('?' * len(ids))}) and status in "
            f"({','.join('?' * len(flatten.OPEN_STATUSES))})", (*ids, *flatten.OPEN_STATUSES))}
        now = datetime.now(timezone.utc)
        late = [e for e in entries if e["id"] in working and (now - e["at"]).total_seconds() > FOLLOW_UP_MAX_S]
        if late:
            gone = {e["key"] for e in late if e["key"]}
            if any(e["key"] is None for e in late):  # an earlier release's id: its positions are all those without one
                gone |= {e["key"] for e in entries if e["id"] is None}
            self._drop_follow_up(
                f"the cancel of {', '.join(e['id'] for e in late)} did not end within {FOLLOW_UP_MAX_S:g} s"
                + (f"; positions not exited: {'; '.join(_words(k) for k in sorted(gone))}" if gone else ""),
                lambda e: e in late or e["key"] in gone)
            return
        # a position waits for its own cancels only (an earlier release's ids, with no position, for all of its)
        waiting = {e["key"] for e in entries if e["id"] in working}
        ready = [e for e in entries if e["key"] not in waiting and not (e["key"] is None and e["id"] in working)
                 and not (e["id"] is None and None in waiting)]
        if not ready:
            return
        bounds = _bounds([e for e in ready if e["key"]])
        if not bounds:
            self.storage.write(lambda db: _keep_follow_ups(db, lambda e: e in ready))
            return
        self.flatten(f"{why}: the positions of its oversized exits, now cancelled", everything=True, only=bounds,
                     done_with=ready)

    def _drop_follow_up(self, why: str, which: Callable[[dict], bool]) -> None:
        def run(db: Any) -> None:
            _keep_follow_ups(db, which)
            Storage.add_event(db, "exit_all_dropped", f"risk's follow-up dropped: {why}; check these positions at the "
                              f"broker", "error", None, None)
        self.storage.write(run)

    # ---- acting ----
    def act(self, action: Action) -> None:
        if action.kind == "fail_closed":  # (the state is read in the write: a halt sent meanwhile stands)
            self.storage.write(lambda db: self.gate.set_state_if(db, _active, TradingState.REDUCE_ONLY,
                                                                 action.message, "risk"))
            return  # said once, through the state change
        if action.kind == "violation":
            self._say("violation", "risk_violation", action.message, action.severity, None, action.data)
            self.flatten("risk: positions after the breach", quiet=True)
            return
        self.storage.write(lambda db: Storage.add_event(db, f"risk_{action.kind}", action.message, action.severity,
                                                        action.data.get("strategy"), action.data or None))
        if action.kind == "breach":  # (a halt the trader had set stays underneath: the new day brings it back)
            self.storage.write(lambda db: self.gate.halt_for_breach(db, action.message))
            self.flatten("risk: daily max loss breached")
        elif action.kind == "resume":  # the new trading day: only risk's own breach halt ends
            self.storage.write(lambda db: self.gate.end_breach_halt(db, action.message))
        elif action.kind in ("strategy_breach", "square_off"):  # stored with the stop's mark: done now, once
            self._flatten_pending()
        # (a new day's carry-over, and the end of the breach halt, were done with the day's record: _begin_day)

    def flatten_pending(self) -> Optional[bool]:
        """Each beat: the flattens decided and not yet done (a strategy's stop, the square-off, a strategy's MTM
        stop), unless a check on another thread holds the lock (it does them itself)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            self._flatten_pending()
        finally:
            self._lock.release()
        return None

    def _flatten_pending(self) -> None:
        """Do each flatten waiting, once: it is taken off in the flatten's own transaction, so one that fails (a
        full disk) or that a death interrupts (during its broker read) is done on a later beat or after the restart.
        One from an earlier day is dropped, said: the trader decides what to do with those positions now."""
        try:
            waiting = self.storage.read(pending_flattens.read)
        except pending_flattens.Unreadable as e:
            self.storage.write(lambda db: (pending_flattens.clear(db), Storage.add_event(
                db, "risk_flatten_dropped", f"risk's flattens to do are unreadable ({e}): none was done; check the "
                f"positions of any strategy stopped today, and the MIS positions after the square-off", "error")))
            return
        today = self.gate.clock.day(self.now()).isoformat()
        for p in waiting:  # each on its own: one that fails holds up neither the others nor the check's actions
            if time.monotonic() < self._flatten_retry.get(p, (0.0, 0))[0]:
                continue
            try:
                if p.day != today:
                    self.storage.write(lambda db, p=p: (pending_flattens.done(db, p), Storage.add_event(
                        db, "risk_flatten_dropped", f"{p.why} (decided on {p.day}) was not done that day: it is "
                        f"dropped; check those positions", "error", p.strategy)))
                else:
                    failed = self.flatten(p.why, strategy=p.strategy, product=p.product, everything=p.everything,
                                          pending=p)["failed"]
                    if failed:  # the rest are exited; it stays, for those
                        raise FlattenIncomplete("; ".join(failed))
                self._flatten_retry.pop(p, None)
            except Exception as e:
                self._flatten_failed(p, e)

    def _flatten_failed(self, p: pending_flattens.Pending, e: Exception) -> None:
        """A flatten to do failed: it stays, tried again after 1, 2, 4 ... 60 s; the first failure is said."""
        failures = self._flatten_retry.get(p, (0.0, 0))[1] + 1
        wait = min(2.0 ** (failures - 1), BACKOFF_MAX_S)
        self._flatten_retry[p] = (time.monotonic() + wait, failures)
        if failures > 1:
            log.warning("risk: %s failed again (%s: %s); tried again in %g s", p.why, type(e).__name__, e, wait)
            return
        log.exception("risk: %s failed; it stays to do, tried again in %g s", p.why, wait)
        try:
            self.storage.write(lambda db: Storage.add_event(
                db, "risk_flatten_failed", f"{p.why} failed ({type(e).__name__}: {e}): risk tries again (after 1, 2, "
                f"4 ... 60 s) until it is done today; check those positions meanwhile", "error", p.strategy))
        except Exception:  # (a full disk): the log has it
            log.exception("risk: the failure of %s could not be recorded", p.why)

    def flatten(self, why: str, strategy: Optional[str] = None, product: Optional[str] = None,
                quiet: bool = False, everything: bool = False,
                only: Optional[dict[tuple[str, str, str, str], flatten.Bound]] = None,
                done_with: Optional[list[dict]] = None, pending: Optional[pending_flattens.Pending] = None) -> dict:
        """Stop adding orders and exit what risk counts (everything, for the trader's exit-all; `only` those
        positions, for its follow-up); these exits, and the exits already working for those positions, escalate
        until they fill."""
        view = self.outside.read_for_exits()  # the broker's net now: nothing closed outside is sold again
        if view is None:
            log.warning("%s: the broker's positions are unreadable (%s); exits are capped by our own book only", why,
                        self.outside.blind)
        skip = (lambda p: None) if everything else self._left_alone
        cancels: list[str] = []
        told: list[str] = []
        # an oversized exit is cancelled, and what it leaves exited after by risk's follow-up: always for exit-all,
        # a strategy's max loss and the square-off (acted on once: nothing else would exit the position), while
        # the day's breach stands for its own
        scoped = strategy is not None or product is not None
        healed = everything or scoped or self._breach_holds()

        def run(db: Any) -> flatten.Flattened:
            done = flatten.flatten(db, why, lambda d, name, intents: self.decider.evaluate(d, name, intents,
                                                                                            alert_id=None),
                                   flatten.closing_room(db, view), strategy, product, skip, quiet, only)
            # in the same transaction: a death cannot leave them unmarked, nor the follow-up lost or made twice
            if pending is not None and not done.failed:  # else it stays, and is done again (what is done is
                pending_flattens.done(db, pending)  # covered by its exits then: nothing is sold twice)
            if only is not None:  # the follow-up: what it acted on goes (what came meanwhile stays)
                _keep_follow_ups(db, lambda e: e in (done_with or []))
                flatten.mark_escalate(db, list(done.orders), EXIT_ALL_MARK)
                return done
            told[:], cancels[:], stopped = self._escalate(db, done.orders, strategy, product, why, healed, skip,
                                                          EXIT_ALL_MARK if everything or scoped else 1)
            if healed and stopped:  # what they leave is exited once their cancels end, whatever comes meanwhile
                _follow_up_later(db, stopped, why)
            return done
        done = self.storage.write(run)
        self._oversize_told.update(told)
        if pending is None:  # a position whose exit failed is tried again, backing off (_left_alone): the breach's
            for key, _ in done.failed:  # check after the breach, the next exit-all or stop
                _, n = self._backoff.get(key, (0.0, 0))
                self._backoff[key] = (time.monotonic() + min(2.0 ** n, BACKOFF_MAX_S), n + 1)
        self.dispatch(Decision(AlertStatus.ACCEPTED, why, done.orders, tuple(dict.fromkeys([*done.cancels, *cancels]))),
                      why)
        return {"orders": list(done.orders), "cancelled": done.cancelled_new, "cancelling": list(done.cancels),
                "left": list(done.left), "failed": [w for _, w in done.failed]}

    def _escalate(self, db: Any, created: tuple[str, ...], strategy: Optional[str], product: Optional[str], why: str,
                  healed: bool, left_alone: Callable[[dict], Optional[str]],
                  mark: int = 1) -> tuple[list[str], list[str], list[dict]]:
        """Mark risk's exits, and the limit exits already working for the positions it exits (they count as
        covering their part), to move towards the market until they fill; stop those working for more than
        their position holds (_stop_oversized). Returns (exits left and said, cancels to send, exits stopped)."""
        fit = _working_exits(db, strategy, product, left_alone)
        flatten.mark_escalate(db, list(created) + [i for i in fit if i not in created], mark)
        if mark == EXIT_ALL_MARK:  # exits a breach was moving, where this acts (not what it leaves alone), are healed
            flatten.mark_escalate(db, [o["id"] for o in db.query(  # now too
                f"select o.id, o.strategy, o.exchange, o.symbol, o.product, p.updated_at from orders o left join "
                f"positions p on p.strategy = o.strategy and p.exchange = o.exchange and p.symbol = o.symbol and "
                f"p.product = o.product where o.escalate = 1 and o.cancel_requested is null and o.protection is null "
                f"and o.status in ({','.join('?' * len(flatten.OPEN_STATUSES))}) and (? is null or o.strategy = ?) "
                f"and (? is null or o.product = ?)", (*flatten.OPEN_STATUSES, strategy, strategy, product, product))
                if left_alone(o) is None], mark)
        return self._stop_oversized(db, _oversized_exits(db, strategy, product, left_alone), why, healed)

    def _stop_oversized(self, db: Any, over: list[dict], why: str,
                        healed: bool) -> tuple[list[str], list[str], list[dict]]:
        """Exits working for more than their position holds on the side they close (after a sale in the broker's
        app, say, at the breach or while they were being moved; a position closed or reversed holds nothing) are
        never moved: filled, they would take the account past zero. Each is cancelled where risk heals it
        (`healed`, or marked EXIT_ALL_MARK: the follow-up then exits its position at its net), and in any case
        once it has been moved from where it was placed; the mark is stored in this transaction, so a restart
        neither loses nor repeats it, and the engine sends the cancel again while it works. Otherwise (a day's
        breach exit not yet moved, after the breach was overridden: the trader's again) it is left where it was
        placed, said once. Returns (exits left and said, cancels to send, exits cancelled or being cancelled)."""
        told: list[str] = []
        cancels: list[str] = []
        stopped: list[dict] = []
        for o in over:
            if o["escalate"]:
                db.execute("update orders set escalate = null where id = ?", (o["id"],))
            if o["order_cancel_requested"]:
                stopped.append(o)
                continue  # cancelled already: the engine sends it again while it works (every 5 s)
            where = (f"exit {o['id']} ({o['strategy']}) {o['side']} {o['remaining']} {o['exchange']}:{o['symbol']} "
                     f"is working for more than the position holds ({o['net_qty']:+d}, less its other exits)")
            if not (healed or o["escalate"] == EXIT_ALL_MARK) and not o["reprices"]:
                if o["id"] not in self._oversize_told:
                    told.append(o["id"])
                    Storage.add_event(db, "exit_not_moved", f"{where}: it is not moved towards the market, as filled "
                                      f"it would take the account past zero; cancel it, then send the EXIT for the "
                                      f"position", "error", o["strategy"], {"order_id": o["id"]})
                continue
            row = {"id": o["id"], "status": o["order_status"], "broker_order_id": o["order_broker_id"]}
            cancels += flatten.stop(db, [row], f"{why}: it works for more than the position holds").working
            stopped.append(o)
            after = ("once the cancel is confirmed, risk exits the position at its net"
                     if healed or o["escalate"] == EXIT_ALL_MARK else
                     "it had been moved towards the market; send the EXIT for the position")
            Storage.add_event(db, "exit_not_moved", f"{where}: moved towards the market it would take the account "
                              f"past zero, so it is cancelled; {after}", "error", o["strategy"], {"order_id": o["id"]})
        return told, cancels, stopped

    def _left_alone(self, p: dict) -> Optional[str]:
        """Why risk leaves a position alone: CNC, manual positions out of scope, an exit backing off."""
        if p["product"] == "C":
            return "CNC holdings are outside risk (not in the PnL, never sold by it)"
        if p["strategy"] == "manual" and self.scope == "strategies":
            return "manual positions are outside RISK_FLATTEN_SCOPE=strategies"
        if p["strategy"] == "manual" and not _touched_today(p):
            return "a manual position from an earlier day is outside the risk scope"
        key = (p["strategy"], p["exchange"], p["symbol"], p["product"])
        wait, _ = self._backoff.get(key, (0.0, 0))
        if time.monotonic() < wait:
            return f"its last exit was rejected or failed: tried again in {wait - time.monotonic():.0f} s"
        return None

    def exit_rejected(self, row: dict) -> None:
        """An exit was rejected: while today's breach holds, risk flattens again, backing off for that position
        (said once); any other exit (a trader's, a strategy's, a stop's or target's, a square-off) is not
        retried, and the event says so."""
        if row["id"] in self._rejections_told:  # the sender's answer, then the broker's update of the same order
            return
        self._rejections_told.add(row["id"])
        key = (row["strategy"], row["exchange"], row["symbol"], row["product"])
        if not (row.get("escalate") and self._breach_holds()):
            self.storage.write(lambda db: Storage.add_event(
                db, "exit_rejected", f"EXIT {row['id']} of {row['strategy']} {row['exchange']}:{row['symbol']} was "
                f"rejected by the broker ({row.get('reason')}); it is NOT retried: send it again once the cause is "
                f"fixed", "error", row["strategy"], {"order_id": row["id"]}))
            return
        _, n = self._backoff.get(key, (0.0, 0))
        delay = min(2.0 ** n, BACKOFF_MAX_S)
        self._backoff[key] = (time.monotonic() + delay, n + 1)
        self._say(f"rejected:{key}", "exit_rejected", f"exits of {row['strategy']} {row['exchange']}:{row['symbol']} "
                  f"({row['product']}) are rejected by the broker ({row.get('reason')}); retrying with back-off, up "
                  f"to every {BACKOFF_MAX_S:g} s: check the broker terminal", "error", row["strategy"],
                  {"order_id": row["id"]})

    def _breach_holds(self) -> bool:
        """Today's breach stands (not overridden): the only state in which risk sends exits again by itself."""
        try:
            return self.gate.manager.load_day(self.gate.clock.day(self.now())).halted_by_breach
        except CorruptState:
            return False

    def exit_filled(self, row: dict) -> None:
        self._backoff.pop((row["strategy"], row["exchange"], row["symbol"], row["product"]), None)


def _working_exits(db: Any, strategy: Optional[str], product: Optional[str],
                   left_alone: Callable[[dict], Optional[str]]) -> list[str]:
    """The unfinished non-stop exits of the positions risk exits, oldest first, not yet marked to escalate, that
    fit within the position (less the exits before them)."""
    fit, room = [], {}
    for o in db.query(
            "select o.id, o.side, o.qty - coalesce(o.filled_qty, 0) remaining, o.escalate, o.cancel_requested "
            "order_cancel_requested, p.* from orders o join "
            "positions p on p.strategy = o.strategy and p.exchange = o.exchange and p.symbol = o.symbol and "
            "p.product = o.product where o.status in ('NEW', 'SUBMITTED', 'UNKNOWN', 'OPEN', 'PARTIAL') and "
            "o.action != 'ENTRY' and o.protection is null and p.net_qty != 0 and (o.side = 'SELL') = (p.net_qty > 0) "
            "and (? is null or o.strategy = ?) and (? is null or o.product = ?) order by o.rowid",
            (strategy, strategy, product, product)):
        if left_alone(o) is not None:
            continue
        key = (o["strategy"], o["exchange"], o["symbol"], o["product"])
        room.setdefault(key, abs(o["net_qty"]))
        if o["remaining"] <= room[key]:
            room[key] -= o["remaining"]
            if not o["escalate"] and not o["order_cancel_requested"]:  # never moved while its cancel works
                fit.append(o["id"])
    return fit


def _follow_ups(raw: str) -> tuple[str, list[dict], bool]:
    """The stored follow-up: why, its entries {id, key, side, held, over, at} (an exit being cancelled and its
    position's Bound), and whether it was in an earlier release's form (`after` ids and `keys`; `cap`), read too."""
    data = json.loads(raw)
    why = str(data["why"])
    if "entries" in data:
        return why, [{"id": e["id"], "key": tuple(e["key"]) if e["key"] else None, "side": e.get("side"),
                      "held": _int_or_none(e.get("held", e.get("cap"))), "over": _int_or_none(e.get("over")),
                      "at": datetime.fromisoformat(e["at"])} for e in data["entries"]], \
            any("held" not in e for e in data["entries"])
    at = datetime.fromisoformat(data["at"]) if data.get("at") else datetime.now(timezone.utc)
    return why, ([{"id": str(i), "key": None, "side": None, "held": None, "over": None, "at": at}
                  for i in data["after"]]
                 + [{"id": None, "key": tuple(k[:4]), "side": None, "held": int(k[4]) if len(k) > 4 else None,
                     "over": None, "at": at} for k in data["keys"]]), True


def _int_or_none(v: Any) -> Optional[int]:
    return None if v is None else int(v)


def _bounds(entries: list[dict]) -> dict[tuple[str, str, str, str], flatten.Bound]:
    """Each position's Bound: what it held at its latest cancel, on that exit's side; what its exits overfill."""
    out: dict[tuple[str, str, str, str], flatten.Bound] = {}
    for e in sorted(entries, key=lambda e: e["at"]):
        was = out.get(e["key"])
        over = None if e["over"] is None or (was is not None and was.over is None) else \
            e["over"] + (was.over if was is not None else 0)
        out[e["key"]] = flatten.Bound(e["side"], e["held"], over)
    return out


def _store_follow_ups(db: Any, why: str, entries: list[dict]) -> None:
    if not entries:
        db.execute("delete from state where key = ?", (EXIT_ALL_AFTER_KEY,))
        return
    Storage.put_state(db, EXIT_ALL_AFTER_KEY, json.dumps({"why": why, "entries": [
        {"id": e["id"], "key": list(e["key"]) if e["key"] else None, "side": e["side"], "held": e["held"],
         "over": e["over"], "at": e["at"].isoformat(timespec="milliseconds")} for e in entries]}))


def _stored_follow_ups(db: Any) -> tuple[Optional[str], list[dict]]:
    row = db.execute("select value from state where key = ?", (EXIT_ALL_AFTER_KEY,)).fetchone()
    if not row:
        return None, []
    try:
        why, entries, _ = _follow_ups(row[0])
        return why, entries
    except (ValueError, KeyError, TypeError, AttributeError):
        log.error("risk: the stored follow-up is unreadable (%.200r); replaced", row[0])
        return None, []


def _keep_follow_ups(db: Any, drop: Callable[[dict], bool]) -> None:
    """Take these entries off the stored follow-up (read again in this transaction: what came meanwhile stays)."""
    why, entries = _stored_follow_ups(db)
    _store_follow_ups(db, why or "risk", [e for e in entries if not drop(e)])


def _follow_up_later(db: Any, stopped: list[dict], why: str) -> None:
    """Add to the stored follow-up the exits being cancelled and their positions, each with what it holds now: the
    most the follow-up exits (what is bought or sold since is the trader's). An exit already in it keeps its time."""
    _, entries = _stored_follow_ups(db)
    known = {e["id"] for e in entries if e["id"]}
    now = datetime.now(timezone.utc)
    entries += [{"id": o["id"], "key": (o["strategy"], o["exchange"], o["symbol"], o["product"]), "side": o["side"],
                 "held": _held(o), "over": max(o["remaining"] - o.get("room", _held(o)), 0), "at": now}
                for o in stopped if o["id"] not in known]
    _store_follow_ups(db, why, entries)


def _held(o: dict) -> int:
    """What the position holds on the side its exit closes (nothing if flat or reversed)."""
    net = o["net_qty"]
    return abs(net) if (net > 0 if o["side"] == "SELL" else net < 0) else 0


def _words(key: tuple[str, str, str, str]) -> str:
    s, e, y, p = key
    return f"{s} {e}:{y} ({p})"


def _oversized_exits(db: Any, strategy: Optional[str], product: Optional[str],
                     left_alone: Callable[[dict], Optional[str]]) -> list[dict]:
    """Unfinished non-stop orders other than entries that work for more than their position holds on the side
    they close, less the closing ones before them (oldest first); those for a position missing or flat, and
    those risk moves for a position since reversed, hold nothing. Those risk is moving are counted whatever the
    position (a back-off, a scope); others only where risk acts. Each comes with its `room`: what the exits that
    fit (and the oversized ones before it) leave of the position."""
    over, room = [], {}
    for o in db.query(
            "select o.id, o.strategy, o.exchange, o.symbol, o.product, o.side, o.reprices, o.escalate, "
            "o.qty - coalesce(o.filled_qty, 0) remaining, o.status order_status, o.broker_order_id order_broker_id, "
            "o.cancel_requested order_cancel_requested, coalesce(p.net_qty, 0) net_qty, p.updated_at from orders o "
            "left join positions p on p.strategy = o.strategy and p.exchange = o.exchange and p.symbol = o.symbol and "
            "p.product = o.product where o.status in ('NEW', 'SUBMITTED', 'UNKNOWN', 'OPEN', 'PARTIAL') and "
            "o.action != 'ENTRY' and o.protection is null and (? is null or o.strategy = ?) and "
            "(? is null or o.product = ?) order by o.rowid", (strategy, strategy, product, product)):
        if not o["escalate"] and left_alone(o) is not None:
            continue
        key = (o["strategy"], o["exchange"], o["symbol"], o["product"])
        net = o["net_qty"]
        if (net > 0 if o["side"] == "SELL" else net < 0):  # it closes: the position's net is the room
            room.setdefault(key, abs(net))
            if o["remaining"] <= room[key]:
                room[key] -= o["remaining"]
                continue
            over.append({**o, "closes": True})
        elif net == 0 or o["escalate"]:  # nothing to close, or an exit risk moves that would now add
            over.append({**o, "closes": False})
        # (an order adding to a position neither sets nor uses the room; a breach cancels it as adding)
    for o in over:  # the room an oversized exit has is what the exits that fit leave (they stay, it is cancelled):
        key = (o["strategy"], o["exchange"], o["symbol"], o["product"])  # filled anyway, it overfills by the rest
        o["room"] = min(o["remaining"], room.get(key, 0)) if o.pop("closes") else 0
        room[key] = room.get(key, 0) - o["room"]
    return over


NEW_DAY_TRIES = 3  # a carry-over failing on a passing database error is tried with its whole day this often


def _alone(db: Any, what: str, step: Callable[[Any], None], loop: Any) -> bool:
    """One step of a new day in a savepoint of its own: True if done. One that fails on something in the book is
    rolled back alone and said (the day must begin, or no limit is watched today); one failing on a passing database
    error (a full disk, a lock) fails the whole day, tried again on the next beat, NEW_DAY_TRIES times at most."""
    db.execute("savepoint new_day")
    try:
        step(db)
    except Exception as e:
        if not db.conn.in_transaction:  # SQLite rolled the whole transaction back (a full disk): say that
            raise
        db.execute("rollback to new_day")
        db.execute("release new_day")
        passing = isinstance(e, sqlite3.OperationalError) and _passing(e)
        if passing and loop._carry_failures < NEW_DAY_TRIES - 1:
            loop._carry_failures += 1
            raise
        log.exception("risk: the new day could not %s", what)
        Storage.add_event(db, "risk_carry_over_failed", f"the new day could not {what} ({type(e).__name__}: {e}): "
                          f"today's loss limit starts from the PnL the day began with, yesterday's included (check "
                          f"/api/risk and the positions); risk goes on checking it", "error")
        return False
    db.execute("release new_day")
    loop._carry_failures = 0
    return True


def _passing(e: sqlite3.OperationalError) -> bool:
    """A database error that the next try may not meet (a full disk, a lock, an I/O error)."""
    text = str(e).lower()
    return any(w in text for w in ("database or disk is full", "database is locked", "database is busy",
                                    "disk i/o error"))


def _active(state: dict) -> bool:
    return state["state"] == TradingState.ACTIVE.value


def _touched_today(p: dict) -> bool:
    """A manual position changed today (Asia/Kolkata)."""
    stamp = p.get("updated_at")
    if not stamp:
        return False
    return datetime.fromisoformat(stamp).astimezone(IST).date() == datetime.now(timezone.utc).astimezone(IST).date()


def carry_over(db: Any) -> None:
    """A new day: realised PnL starts again, and each carried position is valued from the previous close
    (the last price stored before the day began), so yesterday's gain or loss is not counted today."""
    db.execute("delete from positions where net_qty = 0")
    for p in list(db.query("select p.*, q.ltp from positions p left join quotes q on q.exchange = p.exchange and "
                           "q.symbol = p.symbol")):
        close = p["ltp"] or p["avg_price"]
        db.execute("update positions set realized_pnl = '0', carried_qty = ?, carried_from = coalesce(carried_from, "
                   "avg_price), avg_price = ? where strategy = ? and exchange = ? and symbol = ? and product = ?",
                   (p["net_qty"], str(close), p["strategy"], p["exchange"], p["symbol"], p["product"]))
