"""The market clock: Asia/Kolkata sessions, trading days, holidays; the day boundary for risk."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

IST = ZoneInfo("Asia/Kolkata")
SESSIONS = {ex: (time(9, 15), time(15, 30)) for ex in ("NSE", "NFO", "BSE", "BFO", "CDS", "BCD")}
SESSIONS.update({ex: (time(9, 0), time(23, 30)) for ex in ("MCX", "NCO")})


def session_of(exchange: str) -> tuple[time, time]:
    """The exchange's regular session (Asia/Kolkata): open, close."""
    return SESSIONS.get(exchange, SESSIONS["NSE"])


@dataclass(frozen=True)
class MarketClock:
    """Which days trade and when; every answer is in Asia/Kolkata, whatever the machine's zone."""

    holidays: frozenset[date] = frozenset()

    @staticmethod
    def local(now: datetime) -> datetime:
        if now.tzinfo is None:
            raise ValueError("the market clock needs an aware datetime")
        return now.astimezone(IST)

    def day(self, now: datetime) -> date:
        """The calendar day in Asia/Kolkata: the risk day boundary."""
        return self.local(now).date()

    def is_trading_day(self, d: date) -> bool:
        return d.weekday() < 5 and d not in self.holidays

    def next_trading_day(self, d: date) -> date:
        d += timedelta(days=1)
        while not self.is_trading_day(d):
            d += timedelta(days=1)
        return d

    def previous_trading_day(self, d: date) -> date:
        d -= timedelta(days=1)
        while not self.is_trading_day(d):
            d -= timedelta(days=1)
        return d

    def first_trading_day_of_next_week(self, d: date) -> date:
        monday = d + timedelta(days=7 - d.weekday())
        return monday if self.is_trading_day(monday) else self.next_trading_day(monday)

    def is_open(self, exchange: str, now: datetime) -> bool:
        local = self.local(now)
        start, end = session_of(exchange)
        return self.is_trading_day(local.date()) and start <= local.time() < end
