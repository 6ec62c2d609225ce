"""Once a trading day: the pre-open check of the broker session, and the day's summary; daily: a backup."""
from __future__ import annotations

from datetime import date, datetime
from typing import Any, Callable, Optional

from . import views
from .broker_session import load_token
from .market import IST
from .risk import RiskGate
from .storage import Storage

SUMMARY_KEY = "daily_summary_day"


class Daily:
    """The day's two appointments, each kept once per trading day."""

    def __init__(self, storage: Storage, gate: RiskGate):
        self.storage, self.gate = storage, gate
        self.broker: Any = None  # the live broker (set by the runtime)
        self.preopen: Any = None  # live mode: the time of the daily session check
        self.summary_time: Any = None  # the time of the daily summary (DAILY_SUMMARY_TIME)
        self.gateway_call: Callable[..., Any] = lambda what, fn: fn()
        self.data_dir: Any = None
        self.backup: Any = None  # the daily database backup (backup.DailyBackup; set by the runtime)
        self._summary_day: Optional[str] = None  # the last day a summary went out
        self._preopen_day: Any = None

    def backup_if_due(self, now: datetime) -> None:
        """Start the daily database backup on its own thread when one is due (every day, trading or not)."""
        if self.backup is not None:
            self.backup.poll(any(self.gate.clock.is_open(ex, now) for ex in ("NSE", "MCX")))

    def preopen_check(self, now: datetime) -> None:
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
                                                        data={"valid": valid, "day": day.isoformat(),
                                                              "login": "/broker/login"}))
        opened = self._session_opened_on()
        if valid and opened is not None and opened < day:
            self.storage.write(lambda db: Storage.add_event(
                db, "broker_session_expiring", f"the broker session still answers but was opened on {opened}; "
                "Shoonya sessions end daily: log in again at /broker/login before the open", "warning",
                data={"opened": opened.isoformat(), "day": day.isoformat(), "login": "/broker/login"}))

    def _session_opened_on(self) -> Optional[date]:
        """The day (Asia/Kolkata) the saved broker token was obtained, if a token was saved by a login."""
        token = load_token(self.data_dir) if self.data_dir is not None else None
        try:
            return datetime.fromisoformat(token["saved_at"]).astimezone(IST).date() if token else None
        except (KeyError, TypeError, ValueError):
            return None

    def summary(self, now: datetime) -> None:
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

