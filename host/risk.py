"""Risk: the trading state, the daily loss limit with trailing, warnings, breaches, the loss-streak
cooldown, blind mode and per-strategy limits. The manager decides; the engine acts on its decisions."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from decimal import ROUND_FLOOR, Decimal
from typing import Any, Callable, Optional

import sqlite_utils

from .broker_session import EXPIRED, STATE_KEY as SESSION_KEY
from .day_counts import day_start_utc, orders_on
from .market import MarketClock, session_of
from .models import Intent, TradingState
from . import pending_flattens
from .storage import BREACH_ROWS, Storage, utcnow

STATE_KEY = "trading_state"
DAY_KEY = "risk_day"
ZERO = Decimal("0")


@dataclass(frozen=True)
class Limits:
    base: Decimal = Decimal("-5000")
    step: Decimal = ZERO
    threshold: Decimal = Decimal("0.8")
    max_consecutive: int = 3
    status_every_min: int = 30
    cooldown_days: int = 0
    max_orders_per_day: int = 0
    max_qty_per_order: int = 0
    max_qty_per_symbol: int = 0
    strategy_max_loss: Decimal = ZERO
    square_off: Optional[time] = time(15, 15)
    market_hours: bool = False  # live: entries only in their exchange's session ...
    allow_amo: bool = False     # ... or, outside it, as after-market orders

    @classmethod
    def from_settings(cls, s: Any) -> "Limits":
        return cls(s.RISK_BASE_MAX_LOSS, s.RISK_TRAIL_STEP, s.RISK_WARNING_THRESHOLD, s.RISK_MAX_CONSECUTIVE_LOSS_DAYS,
                   s.RISK_STATUS_UPDATE_MIN, s.RISK_COOLDOWN_DAYS, s.RISK_MAX_ORDERS_PER_DAY, s.RISK_MAX_QTY_PER_ORDER,
                   s.RISK_MAX_QTY_PER_SYMBOL, s.RISK_STRATEGY_MAX_LOSS, s.SQUARE_OFF_TIME,
                   market_hours=not s.paper, allow_amo=s.ALLOW_AMO)


def trailing_limit(base: Decimal, step: Decimal, peak: Decimal) -> Decimal:
    """limit = base + floor(peak / step) × step; it rises with the peak and can lock in profit."""
    if step <= 0 or peak <= 0:
        return base
    return base + (peak / step).to_integral_value(rounding=ROUND_FLOOR) * step


def warning_level(limit: Decimal, base: Decimal, threshold: Decimal) -> Decimal:
    """The PnL at which a warning goes out: (1 − threshold) × |base| above the limit."""
    return limit + (1 - threshold) * abs(base)


class CorruptState(Exception):
    """Stored risk state that cannot be read; risk fails closed."""


@dataclass
class RiskDay:
    """Today's risk record, stored as one JSON row and rewritten atomically on every change."""

    day: str
    limit: Decimal
    peak: Decimal = ZERO
    last_pnl: Decimal = ZERO
    warned: list = field(default_factory=list)
    breached: bool = False
    breached_at: Optional[str] = None
    blind: Optional[str] = None
    last_status: Optional[str] = None
    squared_off: bool = False
    strategy_stops: list = field(default_factory=list)
    anchor: Decimal = ZERO  # the PnL the limit is measured from: 0, or the PnL when a breach was overridden
    overridden_at: Optional[str] = None  # the trader resumed after today's breach (override_breach)
    overridden_by: Optional[str] = None
    estimated: bool = False  # the last PnL came from our own book while the broker's positions were unreadable
    clock_behind: Optional[str] = None  # the clock's date last said to be behind this day's (said once per date)

    @property
    def halted_by_breach(self) -> bool:
        """A breach today that the trader has not overridden."""
        return self.breached and self.overridden_at is None

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RiskDay":
        try:
            d = json.loads(text)
            day = cls(**d)
            day.limit, day.peak, day.last_pnl = Decimal(d["limit"]), Decimal(d["peak"]), Decimal(d["last_pnl"])
            day.anchor = Decimal(d.get("anchor", "0"))
            date.fromisoformat(day.day)
            if not isinstance(day.breached, bool) or not isinstance(day.warned, list):
                raise ValueError("bad field types")
            return day
        except (ValueError, TypeError, KeyError, ArithmeticError) as e:
            raise CorruptState(f"stored risk day is unreadable ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class Action:
    """A risk decision for the engine: kind, words for people, and details."""

    kind: str
    message: str
    severity: str = "info"
    data: dict = field(default_factory=dict)


_day_start_utc = day_start_utc  # where a risk day starts, as stored timestamps (views use it too)


UNREADABLE_BY = "risk: unreadable state"  # a state risk keeps failing closed: only the trader's resume lifts it


def command_id(state: dict) -> Optional[int]:
    """The id of the trader's last command a stored state carries (None: none, or not a number)."""
    try:
        return int(state["command"])
    except (KeyError, TypeError, ValueError):
        return None


class RiskManager:
    """Watches the day's PnL against the trailing limit; everything it knows is in SQLite."""

    def __init__(self, storage: Storage, limits: Limits, clock: MarketClock):
        self.storage, self.limits, self.clock = storage, limits, clock
        # what a new day does to the rest of the book (set by risk's loop): run in the transaction that stores the
        # day, with the end of the breach halt's reason, or None
        self.begin_day: Callable[[sqlite_utils.Database, Optional[str]], bool] = lambda db, halt_ends: True

    # ---- stored state ----
    def stored(self, db: Optional[sqlite_utils.Database], *keys: str) -> dict[str, Optional[str]]:
        """These state keys' stored values (None: not stored), in one statement; inside `db`'s transaction when
        given."""
        sql = f"select key, value from state where key in ({','.join('?' * len(keys))})"
        rows = db.execute(sql, keys).fetchall() if db is not None else \
            self.storage.read(lambda reader: reader.execute(sql, keys).fetchall())
        found = dict(rows)
        return {k: found.get(k) for k in keys}

    def trading_state(self, db: Optional[sqlite_utils.Database] = None) -> dict:
        """The stored trading state; read inside `db`'s transaction when given (a write that depends on it)."""
        return self.state_from(self.stored(db, STATE_KEY)[STATE_KEY])

    @staticmethod
    def state_from(raw: Optional[str]) -> dict:
        """A stored trading state's text as a dict; an unreadable one fails closed (reduce-only)."""
        if not raw:
            return {"state": TradingState.ACTIVE.value, "reason": None, "by": None, "at": None}
        try:
            st = json.loads(raw)
            TradingState(st["state"])
            return st
        except (ValueError, KeyError, TypeError):
            return {"state": TradingState.REDUCE_ONLY.value, "by": "risk", "at": None, "unreadable": True,
                    "reason": "the stored trading state is unreadable: failing closed until POST /api/halt active"}

    def load_day(self, today: date) -> RiskDay:
        """Today's record; a new one on a later day (a clock stepped back keeps the day it had reached: only a
        later date begins a day). Raises CorruptState when the stored one is unreadable."""
        return self.day_from(self.storage.get_state(DAY_KEY), today)

    def day_from(self, raw: Optional[str], today: date) -> RiskDay:
        """load_day, from the stored text."""
        if raw:
            day = RiskDay.from_json(raw)
            if day.day >= today.isoformat():
                return day
        return RiskDay(today.isoformat(), self.limits.base)

    def breach_days(self, db: Optional[sqlite_utils.Database] = None, breached_only: bool = False) -> dict[date, bool]:
        """Recorded trading days and whether each breached (inside `db`'s transaction when given); a corrupt row
        raises CorruptState. breached_only: the days that breached and the rows that cannot say (a breached value
        other than 0 or 1, a day that is not a plain date), not the clean ones, which grow by one each trading day
        (read through a partial index, migration 16)."""
        out = {}
        sql = "select day, breached from risk_days" + (f" where {BREACH_ROWS}" if breached_only else "")
        for r in (list(db.query(sql)) if db is not None else self.storage.rows(sql)):
            try:
                if r["breached"] not in (0, 1):
                    raise ValueError(r["breached"])
                day = date.fromisoformat(r["day"])
                if day.isoformat() != r["day"]:  # ('20261119' is a date to Python, not to SQLite's date())
                    raise ValueError(r["day"])
                out[day] = bool(r["breached"])
            except (ValueError, TypeError):
                raise CorruptState(f"risk_days row {r['day']!r} is unreadable") from None
        return out

    def streak(self, upto: date) -> int:
        """Consecutive breached trading days ending at `upto` (or the trading day before it)."""
        days = self.breach_days(breached_only=True)  # a day not in it did not breach: it ends the streak
        d = upto if days.get(upto) else self.clock.previous_trading_day(upto)
        n = 0
        while days.get(d):
            n += 1
            d = self.clock.previous_trading_day(d)
        return n

    def cooldown_until(self, today: date, db: Optional[sqlite_utils.Database] = None) -> Optional[date]:
        """The first day entries are allowed again after a loss streak, if that is after today."""
        n = self.limits.max_consecutive
        if n <= 0:
            return None
        # a streak is breached trading days one after the other: only the breached days are read and walked (the
        # clean days between them, one more each trading day, break a streak by not being next to each other)
        breached = sorted(d for d in self.breach_days(db, breached_only=True) if d <= today)
        until, run, last = None, 0, None
        for d in breached:
            if last is not None and not self.clock.is_trading_day(d):
                continue  # a breach recorded on a day the market was closed: no day of a streak (as it never was)
            run = run + 1 if last is not None and self.clock.next_trading_day(last) == d else 1
            last = d
            if run >= n:
                end = self.clock.first_trading_day_of_next_week(d)
                if self.limits.cooldown_days:
                    end = d
                    for _ in range(self.limits.cooldown_days + 1):
                        end = self.clock.next_trading_day(end)
                until = max(until or end, end)
        return until if until and today < until else None

    # ---- the check ----
    def check(self, now: datetime, pnl: Optional[Decimal], blind_reason: Optional[str] = None,
              exposed: Any = False, strategy_pnl: Optional[dict[str, Decimal]] = None,
              strategy_max_loss: Optional[dict[str, Decimal]] = None) -> list[Action]:
        """Compare the day's PnL with the limits at `now`; store the result; return what must be done.

        pnl is None when positions could not be read (blind). exposed (a bool, or a callable asked only
        after a breach): positions are open that no working exit covers. A breach, once recorded, is
        never cleared before the next trading day.
        """
        try:
            day, actions = self._day(now, pnl)
        except CorruptState as e:
            return [Action("fail_closed", f"{e}; trading is reduce_only until you check and resume", "error")]
        if actions:  # a new day: today's PnL is judged on the next check, from the carried positions
            return actions
        today, clock = date.fromisoformat(day.day), self.clock.day(now)
        if clock < today and day.clock_behind != clock.isoformat():  # the day goes on; said once per date
            day.clock_behind = clock.isoformat()
            actions.append(Action("clock_behind", f"the host's clock says {clock.isoformat()}, behind the trading day "
                                                  f"risk has begun ({day.day}): that day's record goes on (its PnL is "
                                                  f"not carried over again) until the clock passes it; check the "
                                                  f"machine's clock (NTP)", "error"))
        if blind_reason is not None and day.blind is None:
            day.blind = blind_reason
            actions.append(Action("blind", f"risk is blind: {day.blind}; new entries are refused, and the limits "
                                           f"are checked on a PnL estimated from our own book and the feed's prices",
                                  "error"))
        elif blind_reason is None and day.blind is not None:
            actions.append(Action("sighted", f"positions can be read again; PnL {pnl}", "info"))
            day.blind = None
        if pnl is None:  # no figure at all: keep the last one
            self._store(day)
            return actions
        day.estimated = blind_reason is not None
        day.last_pnl = pnl
        day.peak = max(day.peak, pnl)
        day.limit = max(day.limit, day.anchor + trailing_limit(self.limits.base, self.limits.step,
                                                               day.peak - day.anchor))
        data = {"pnl": str(pnl), "limit": str(day.limit), "peak": str(day.peak), "estimated": day.estimated}
        if not day.halted_by_breach and pnl <= day.limit:
            day.breached, day.breached_at, day.overridden_at, day.overridden_by = True, utcnow(), None, None
            self._record_day(today, True, day)
            actions.append(Action("breach", f"daily max loss breached: PnL {pnl} <= limit {day.limit}; trading "
                                            f"halted for the day; pending orders are being cancelled and positions "
                                            f"exited (each order's events say when it is done)", "error", data))
            streak = self.streak(today)
            until = self.cooldown_until(today)
            if until:
                actions.append(Action("cooldown", f"{streak} trading days in a row with a breach: entries are "
                                                  f"refused until {until.isoformat()}", "error",
                                      {"until": until.isoformat(), "streak": streak}))
        elif day.halted_by_breach and (exposed() if callable(exposed) else exposed):
            actions.append(Action("violation", f"positions open after today's breach (PnL {pnl}) with no exit on "
                                               f"its way to the market: flattening them again", "error", data))
        elif not day.halted_by_breach and pnl <= warning_level(day.limit, self.limits.base, self.limits.threshold) \
                and str(day.limit) not in day.warned:
            day.warned.append(str(day.limit))
            actions.append(Action("warning", f"PnL {pnl} is near the daily limit {day.limit}", "warning", data))
        flattens = []  # stored with the day's marks: done by risk's loop, once (pending_flattens)
        for name, spnl in (strategy_pnl or {}).items():
            cap = (strategy_max_loss or {}).get(name, self.limits.strategy_max_loss)
            if cap and spnl <= -abs(cap) and name not in day.strategy_stops:
                day.strategy_stops.append(name)
                flattens.append(pending_flattens.Pending(f"risk: strategy {name} max loss", day.day, strategy=name))
                actions.append(Action("strategy_breach", f"strategy {name} lost {spnl}, beyond its limit "
                                                         f"{-abs(cap)}: its positions are exited and it is stopped "
                                                         f"for the day", "error", {"strategy": name, "pnl": str(spnl)}))
        local = self.clock.local(now)
        if (self.limits.square_off is not None and not day.squared_off and self.clock.is_trading_day(today)
                and local.time() >= self.limits.square_off):
            day.squared_off = True
            flattens.append(pending_flattens.Pending("risk: intraday square-off", day.day, product="I"))
            actions.append(Action("square_off", f"intraday square-off at {self.limits.square_off:%H:%M}: "
                                                f"MIS positions are exited", "warning"))
        every = self.limits.status_every_min
        if every and (day.last_status is None or
                      datetime.fromisoformat(day.last_status) <= now - timedelta(minutes=every)):
            day.last_status = now.astimezone(timezone.utc).isoformat(timespec="seconds")
            actions.append(Action("status", f"risk status: PnL {pnl}, limit {day.limit}, peak {day.peak}", "info", data))
        self._store(day, flattens)
        return actions

    def begin_if_new(self, now: datetime, pnl: Optional[Decimal]) -> list[Action]:
        """Begin the day if `now` is in a later one than the stored record (at start-up, before anything is read
        from the broker: the day's trades made while the host was stopped count today); what was done."""
        try:
            return self._day(now, pnl)[1]
        except CorruptState:
            return []  # the check says so (fail closed)

    def _day(self, now: datetime, pnl: Optional[Decimal]) -> tuple[RiskDay, list[Action]]:
        """Today's record, and the actions of a new day if this call began it (in one transaction with its
        carry-over, the strategies' limit rebase and the end of risk's breach halt: never the day without them)."""
        today = self.clock.day(now)
        day = self.load_day(today)
        stored = self.storage.get_state(DAY_KEY)
        if not stored or json.loads(stored).get("day") == day.day:
            return day, []
        actions = self._new_day(today, json.loads(stored))
        ends = next((a.message for a in actions if a.kind == "resume"), None)

        def begin(db: sqlite_utils.Database) -> None:
            if not self.begin_day(db, ends) and pnl is not None:  # yesterday's PnL still counts: the limit
                day.anchor = day.peak = day.last_pnl = pnl  # starts from where the day began, as an override's
                day.limit = pnl + self.limits.base
            Storage.put_state(db, DAY_KEY, day.to_json())
        self.storage.write(begin, durable=True)
        return day, actions

    def override(self, today: date, by: str, db: Optional[sqlite_utils.Database] = None) -> RiskDay:
        """The trader resumes after today's breach: the limit starts again from the current PnL (written in `db`'s
        transaction when given: with the state the resume writes, or not at all)."""
        day = self.load_day(today)
        day.overridden_at, day.overridden_by = utcnow(), by
        day.anchor = day.peak = day.last_pnl
        day.limit = day.last_pnl + self.limits.base
        day.warned = []
        if db is not None:
            Storage.put_state(db, DAY_KEY, day.to_json())
        else:
            self._store(day)
        return day

    def repair(self, today: date) -> None:
        """Replace an unreadable day record (on an explicit resume); a breach recorded today is kept."""
        try:
            self.load_day(today)
            return
        except CorruptState:
            pass
        row = self.storage.one("select breached from risk_days where day = ?", (today.isoformat(),))
        day = RiskDay(today.isoformat(), self.limits.base, breached=bool(row and row["breached"] == 1))
        self.storage.write(lambda db: Storage.put_state(db, DAY_KEY, day.to_json()), durable=True)

    def _new_day(self, today: date, previous: dict) -> list[Action]:
        """Close yesterday's record; a breach halt ends on the next trading day."""
        try:
            prev_day = date.fromisoformat(previous["day"])
            self._record_day(prev_day, bool(previous.get("breached")), None, previous)
        except (KeyError, ValueError, TypeError):
            pass
        actions = [Action("new_day", f"new day {today.isoformat()}: yesterday closed at PnL "
                                     f"{previous.get('last_pnl')}", "info")]
        st = self.trading_state()
        if st["state"] == TradingState.HALTED.value and st.get("by") == "risk" and self.clock.is_trading_day(today):
            actions.append(Action("resume", f"new trading day {today.isoformat()}: the breach halt ends", "info"))
        return actions

    def _record_day(self, d: date, breached: bool, day: Optional[RiskDay], raw: Optional[dict] = None) -> None:
        src = asdict(day) if day else (raw or {})
        row = {"day": d.isoformat(), "breached": int(breached), "final_pnl": str(src.get("last_pnl")),
               "peak_pnl": str(src.get("peak")), "limit_at_end": str(src.get("limit")), "updated_at": utcnow()}
        if not breached:  # never turn a recorded breach back into a clean day
            existing = self.storage.one("select breached from risk_days where day = ?", (row["day"],))
            if existing and existing["breached"] == 1:
                return
        self.storage.write(lambda db: Storage.insert(db, "risk_days", row, upsert_pk=("day",)), durable=True)

    def _store(self, day: RiskDay, flattens: list[pending_flattens.Pending] = ()) -> None:
        """Write the day record if it differs from the stored one, with the flattens it decided (one atomic,
        durable write)."""
        text = day.to_json()
        if text != self.storage.get_state(DAY_KEY) or flattens:
            self.storage.write(lambda db: (Storage.put_state(db, DAY_KEY, text), pending_flattens.add(db, flattens)),
                               durable=True)


class RiskGate:
    """Refuses intents the trading state, the cooldown, blind mode or a strategy's limits forbid."""

    def __init__(self, storage: Storage, limits: Optional[Limits] = None, clock: Optional[MarketClock] = None):
        self.storage = storage
        self.limits = limits or Limits()
        self.clock = clock or MarketClock()
        self.manager = RiskManager(storage, self.limits, self.clock)
        self.now = lambda: datetime.now(timezone.utc)

    def state(self) -> dict:
        return self.manager.trading_state()

    @property
    def trading_state(self) -> TradingState:
        return TradingState(self.state()["state"])

    def refusal(self, reducing: bool, strategy: Optional[str] = None, intent: Optional[Intent] = None,
                db: Optional[sqlite_utils.Database] = None, params: Optional[dict] = None) -> Optional[str]:
        """Why an intent may not trade now, or None when it may. Exits and reductions always may."""
        if reducing:
            return None
        # one read of what the stored state says (inside the deciding transaction when given: the latest)
        raw = self.manager.stored(db, STATE_KEY, SESSION_KEY, DAY_KEY)
        st = self.manager.state_from(raw[STATE_KEY])
        if st["state"] != TradingState.ACTIVE.value:
            why = f" ({st['reason']})" if st.get("reason") else ""
            return f"trading is {st['state']}{why}: only exits and reductions are allowed"
        session = raw[SESSION_KEY]
        if session and json.loads(session).get("state") == "expired":
            return EXPIRED
        today = self.clock.day(self.now())
        try:
            day = self.manager.day_from(raw[DAY_KEY], today)
            until = self.manager.cooldown_until(today, db)
        except CorruptState as e:
            return f"risk state is unreadable ({e}); entries are refused until it is checked"
        if day.halted_by_breach:  # the state says so too, in a later write: the gap (or a failed write) takes none
            return (f"today's daily loss limit was breached (PnL {day.last_pnl}, limit {day.limit}): trading is "
                    f"halted for the day; only exits and reductions are allowed")
        if day.blind:
            return f"risk is blind ({day.blind}): new entries are refused until positions can be read"
        if until:
            return f"loss-streak cooldown: entries are refused until {until.isoformat()}"
        local = self.clock.local(self.now())
        if intent is not None and self.limits.market_hours and not self.limits.allow_amo \
                and not self.clock.is_open(intent.exchange, local):
            start, end = session_of(intent.exchange)
            return (f"{intent.exchange} is closed (now {local:%a %d %b %H:%M} Asia/Kolkata): entries are taken in its "
                    f"session {start:%H:%M}-{end:%H:%M} on trading days; exits are always sent. Set ALLOW_AMO=true "
                    f"to send entries outside the session as after-market orders")
        if (intent is not None and intent.product.value == "I" and self.limits.square_off is not None
                and self.clock.is_trading_day(today) and local.time() >= self.limits.square_off):
            return (f"MIS entries after the square-off time {self.limits.square_off:%H:%M} are refused: they would "
                    f"never be squared off today (use NRML or CNC)")
        if strategy and strategy in day.strategy_stops:
            return f"strategy {strategy} hit its max loss today: stopped until the next trading day"
        if intent is not None and db is not None:
            return self._strategy_limits(strategy, intent, db, today, params or {})
        return None

    def after_market(self, intent: Intent, reducing: bool) -> Optional[str]:
        """The note for an entry that goes as an after-market order (ALLOW_AMO, its exchange closed), or None."""
        if reducing or not (self.limits.market_hours and self.limits.allow_amo) \
                or self.clock.is_open(intent.exchange, self.now()):
            return None
        start, _ = session_of(intent.exchange)
        return f"{intent.exchange} is closed: sent as an after-market order (ALLOW_AMO), for the open at {start:%H:%M}"

    def _strategy_limits(self, strategy: Optional[str], intent: Intent, db: sqlite_utils.Database, today: date,
                         params: dict) -> Optional[str]:
        per_order = int(params.get("max_qty_per_order", self.limits.max_qty_per_order) or 0)
        if per_order and intent.qty > per_order:
            return f"qty {intent.qty} is over the max of {per_order} per order for strategy {strategy}"
        per_symbol = int(params.get("max_qty_per_symbol", self.limits.max_qty_per_symbol) or 0)
        if per_symbol:
            held = db.execute("select coalesce(sum(abs(net_qty)), 0) from positions where strategy = ? and "
                              "exchange = ? and symbol = ?", (strategy, intent.exchange, intent.symbol)).fetchone()[0]
            working = db.execute("select coalesce(sum(qty - filled_qty), 0) from orders where strategy = ? and "
                                 "exchange = ? and symbol = ? and status in ('NEW','SUBMITTED','UNKNOWN','OPEN',"
                                 "'PARTIAL') and action != 'EXIT'", (strategy, intent.exchange, intent.symbol)).fetchone()[0]
            if held + working + intent.qty > per_symbol:
                return (f"{intent.symbol}: {held} held + {working} working + {intent.qty} would exceed the max of "
                        f"{per_symbol} per symbol for strategy {strategy}")
        per_day = int(params.get("max_orders_per_day", self.limits.max_orders_per_day) or 0)
        if per_day:
            n = orders_on(db, strategy, today)  # a running count: one lookup however busy the day
            if n >= per_day:
                return f"strategy {strategy} reached its max of {per_day} orders today (RISK_MAX_ORDERS_PER_DAY)"
        return None

    def set_state_if(self, db: sqlite_utils.Database, when: Callable[[dict], bool], state: TradingState, reason: str,
                     by: str) -> bool:
        """Risk's own change of the state, decided on the state read in the same transaction: a halt the trader
        sent after risk looked is never written over (and the id of the trader's last command is kept)."""
        current = self.manager.trading_state(db)
        if not when(current):
            return False
        self.set_state(db, state, reason, by, command_id(current))
        return True

    def halt_for_breach(self, db: sqlite_utils.Database, reason: str) -> None:
        """Risk's halt at a breach. A halt or reduce-only the trader had set stays underneath (`under`): the end of
        the breach halt, the next trading day, brings it back, never `active` over it."""
        current = self.manager.trading_state(db)
        if current.get("unreadable"):  # it may have been the trader's halt: never lifted by a new day
            under = {"state": TradingState.REDUCE_ONLY.value, "reason": current["reason"], "by": UNREADABLE_BY}
        elif current.get("by") == "risk":
            under = current.get("under")  # (a breach again: what the trader had set before the first one)
        elif current["state"] != TradingState.ACTIVE.value:
            under = {k: current.get(k) for k in ("state", "reason", "by", "command")}
        else:
            under = None
        self.set_state(db, TradingState.HALTED, reason, "risk", command_id(current), under)

    def end_breach_halt(self, db: sqlite_utils.Database, reason: str) -> bool:
        """A new trading day ends risk's breach halt: back to what the trader had set under it, else `active`. Only
        a readable halt that risk itself wrote is ended."""
        current = self.manager.trading_state(db)
        if current["state"] != TradingState.HALTED.value or current.get("by") != "risk" or current.get("unreadable"):
            return False
        under = current.get("under")
        if under is not None and not isinstance(under, dict):
            under = {"reason": "what was set under the breach halt cannot be read", "by": UNREADABLE_BY}
        try:
            kept = TradingState(under["state"]) if under is not None else None
        except (KeyError, TypeError, ValueError):  # what the trader had set cannot be read: it stays halted, and
            kept, under = TradingState.HALTED, {**under, "by": UNREADABLE_BY}  # no new day lifts it
        if kept is None or kept is TradingState.ACTIVE:
            self.set_state(db, TradingState.ACTIVE, reason, "risk", command_id(current))
        else:
            self.set_state(db, kept, f"{under.get('reason') or 'set by the user'} (kept after {reason})",
                           str(under.get("by") or "api"), command_id(current))
        return True

    def set_state(self, db: sqlite_utils.Database, state: TradingState, reason: str, by: str,
                  command: Optional[int] = None, under: Optional[dict] = None) -> None:
        """Write the trading state; `command`: the id of the trader's last command about it (a resume sent before it
        never undoes it: RiskLoop.halt); `under`: the trader's state a breach halt covers (halt_for_breach)."""
        value: dict[str, Any] = {"state": state.value, "reason": reason, "by": by, "at": utcnow()}
        if command is not None:
            value["command"] = command
        if under is not None:
            value["under"] = under
        Storage.put_state(db, STATE_KEY, json.dumps(value))
        Storage.add_event(db, "trading_state", f"trading state set to {state.value} by {by}: {reason}",
                          severity="warning" if state is not TradingState.ACTIVE else "info",
                          data={"state": state.value, "by": by})
