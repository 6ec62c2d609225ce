"""Failed dashboard logins: a slow-down shared by every address, and a lockout of one address after many.

Each attempt first reserves its row in `login_failures` inside one write transaction (so parallel guesses
cannot all pass the same check); the row is dropped when the password was right. After
DASHBOARD_LOGIN_ATTEMPTS failures (from any address) within DASHBOARD_LOCKOUT_S, the next attempt from
anywhere waits min(2^(n-k), DASHBOARD_LOGIN_DELAY_MAX_S) seconds after the last failure: rotating
addresses buys no extra guesses. One address is locked out only after DASHBOARD_ADDRESS_LOCK_ATTEMPTS
failures within a day; its failures then no longer slow the others.

What is guaranteed to the owner: a browser that logged in before (a signed cookie) is slowed only by its
own failures, so a stranger's guesses, however timed, never keep it out. A NEW browser shares the global
slow-down: each time the wait ends, the slot goes to whichever attempt arrives first, so an attacker who
keeps guessing (from rotating addresses) can keep a new browser out for as long as the attack lasts; its
wait is not bounded by DASHBOARD_LOGIN_DELAY_MAX_S then. The ways out are a known browser, or
`strategy-host unlock` on the server (it clears the slow-down; log in at once, as guesses start it again).
The refusal says so.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Optional

import sqlite_utils

from ..config import Settings
from ..storage import Storage
from .sessions import iso

ADDRESS_WINDOW_S = 86400
SHARED_WAY_OUT = ("While someone keeps guessing, a browser new to this dashboard may wait as long as the guessing "
                  "lasts: log in from a browser you logged in from before (others' guesses do not slow it), or "
                  "run `strategy-host unlock` on the server and log in at once.")


@dataclass(frozen=True)
class Verdict:
    """May this attempt check its password? `attempt` is its reserved row, or None with why it must wait."""

    attempt: Optional[int]
    wait_s: int = 0
    message: str = ""


@dataclass(frozen=True)
class Failure:
    """The answer to a wrong password."""

    code: int
    message: str
    retry_after: int = 0


def duration(seconds: int) -> str:
    return f"{seconds} s" if seconds < 120 else f"{(seconds + 59) // 60} min"


def _seconds_until(at: str, after_s: float, now: float) -> int:
    """Whole seconds (at least 1) until `after_s` past `at`; 0 when that moment has passed."""
    left = datetime.fromisoformat(at).timestamp() + after_s - now
    return max(1, math.ceil(left)) if left > 0 else 0


class LoginThrottle:
    """The slow-down and the lockout, shared by every gunicorn worker through the database."""

    def __init__(self, storage: Storage, settings: Settings):
        self.storage = storage
        self.free = settings.DASHBOARD_LOGIN_ATTEMPTS
        self.window_s = settings.DASHBOARD_LOCKOUT_S
        self.delay_max_s = settings.DASHBOARD_LOGIN_DELAY_MAX_S
        self.address_attempts = settings.DASHBOARD_ADDRESS_LOCK_ATTEMPTS

    # ---- counting ----
    def _address(self, db: sqlite_utils.Database, address: str, now: float) -> tuple[int, Optional[str]]:
        """Failures from this address (browsers not known) within a day, and the latest one."""
        n, last = db.execute("select count(*), max(at) from login_failures where address = ? and device is null "
                             "and at > ?", (address, iso(now - ADDRESS_WINDOW_S))).fetchone()
        return n, last

    def _shared(self, db: sqlite_utils.Database, device: Optional[str], now: float) -> tuple[int, Optional[str]]:
        """The failures that slow this attempt, within the window, and the latest one: a known browser's own;
        otherwise those of every address not locked out (rotating addresses changes nothing)."""
        if device:
            return db.execute("select count(*), max(at) from login_failures where device = ? and at > ?",
                              (device, iso(now - self.window_s))).fetchone()
        return db.execute(
            "select count(*), max(at) from login_failures where device is null and at > ? and address not in "
            "(select address from login_failures where device is null and at > ? group by address "
            "having count(*) >= ?)", (iso(now - self.window_s), iso(now - ADDRESS_WINDOW_S),
                                      self.address_attempts)).fetchone()

    def _delay(self, failures: int) -> int:
        """Seconds the next attempt waits after the latest of `failures` (0 while some are still free)."""
        if failures < self.free:
            return 0
        return min(2 ** min(failures - self.free, 30), self.delay_max_s)

    # ---- an attempt ----
    def _refusal(self, db: sqlite_utils.Database, address: str, device: Optional[str], now: float) -> Optional[Verdict]:
        """Why this attempt must wait now, or None when it may go ahead."""
        n, last = (0, None) if device else self._address(db, address, now)
        wait = _seconds_until(last, self.window_s, now) if n >= self.address_attempts else 0
        if wait:
            return Verdict(None, wait, f"Too many failed logins from {address}. Locked out: try again in "
                                       f"{duration(wait)} (or run `strategy-host unlock` on the server).")
        n, last = self._shared(db, device, now)
        wait = _seconds_until(last, self._delay(n), now) if last else 0
        if wait:
            if device:
                return Verdict(None, wait, f"Too many failed logins in this browser: logins are slowed down. "
                                           f"Try again in {duration(wait)}.")
            return Verdict(None, wait, f"Too many failed logins (from any address): logins are slowed down. "
                                       f"Try again in {duration(wait)}. {SHARED_WAY_OUT}")
        return None

    def begin(self, address: str, device: Optional[str] = None) -> Verdict:
        """Refuse the attempt (with the wait), or reserve its row: it counts as a failure unless it succeeds.

        `device` is a browser that logged in before (its signed cookie): it is slowed only by its own
        failures, so that strangers' guesses can neither lock nor slow the owner out.
        """
        refused = self.storage.read(lambda db: self._refusal(db, address, device, time.time()))
        if refused:  # a flood of refused attempts costs reads only, never the engine's write lock
            return refused

        def run(db: sqlite_utils.Database) -> Verdict:  # the check again, and the reservation, in one transaction
            now = time.time()
            refused = self._refusal(db, address, device, now)
            if refused:
                return refused
            db.execute("delete from login_failures where at <= ?", (iso(now - max(ADDRESS_WINDOW_S, self.window_s)),))
            return Verdict(Storage.insert(db, "login_failures", {"address": address, "at": iso(now), "device": device}))
        return self.storage.write(run)

    def succeeded(self, verdict: Verdict, address: str) -> None:
        """The password was right: this attempt is no failure."""
        self.storage.write(lambda db: (
            db.execute("delete from login_failures where id = ?", (verdict.attempt,)),
            Storage.add_event(db, "login", f"dashboard login from {address}", data={"address": address})))

    def failed(self, address: str, device: Optional[str] = None) -> Failure:
        """The password was wrong (its row stays): the answer, and an event naming the address."""
        def run(db: sqlite_utils.Database) -> Failure:
            now = time.time()
            from_address = 0 if device else self._address(db, address, now)[0]
            n = self._shared(db, device, now)[0]
            delay = self._delay(n)
            whose = "in this browser" if device else "from any address"
            data = {"address": address, "failures": n, "from_address": from_address, "wait_s": delay,
                    "known_browser": bool(device)}
            if from_address >= self.address_attempts:
                out = Failure(429, f"Wrong password. Too many failed logins from {address}: locked out for "
                                   f"{duration(self.window_s)}.", self.window_s)
                message = (f"dashboard login failed from {address}: {from_address} failures from it within a day, "
                           f"locked out for {duration(self.window_s)}")
                data["locked_s"] = self.window_s
            elif delay:
                out = Failure(401, f"Wrong password. Too many failed logins: the next attempt {whose} is possible "
                                   f"in {duration(delay)}.", delay)
                message = (f"dashboard login failed from {address}: {n} failures {whose}, "
                           f"logins now wait {duration(delay)}")
            else:
                left = self.free - n
                out = Failure(401, f"Wrong password. {left} attempt{'s' if left != 1 else ''} left before "
                                   f"logins slow down.")
                message = f"dashboard login failed from {address}"
            Storage.add_event(db, "login_failed", message, "warning", data=data)
            return out
        return self.storage.write(run)


def unlock(storage: Storage, by: str) -> int:
    """End every address lockout and the slow-down (`strategy-host unlock`); the failures forgotten."""
    def run(db: sqlite_utils.Database) -> int:
        n = db.execute("delete from login_failures").rowcount
        Storage.add_event(db, "login_unlocked", f"dashboard login lockout and slow-down cleared by {by} "
                                                f"({n} failed logins forgotten)", "warning", data={"failures": n})
        return n
    return storage.write(run)
