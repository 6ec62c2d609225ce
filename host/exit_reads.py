"""The broker's books read for EXIT and POSITION alerts on a thread of their own.

An exit is capped at the broker's net (flatten.closing_room), read after the alert arrived. A slow book
holds only the alerts waiting for that read, and the later alerts of their strategies, never the engine:
other strategies' alerts, fills and ticks go on. One read serves every alert asked for before it began.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from .models import BrokerView

log = logging.getLogger(__name__)
FRESH_S = 1.0  # a view not taken within this long (its strategy was busy in a call) is read again
KEPT_S = 60.0  # a view never taken (what asked for it was decided otherwise meanwhile) is dropped after this long


class ReadFailed(Exception):
    """Reading the broker's books for an exit raised: the alert fails, never runs uncapped as if blind."""


class ExitReads:
    """One read of the books at a time; each serves the alerts asked for before it began."""

    def __init__(self, read: Callable[[], Optional[BrokerView]], ready: Callable[[], None]):
        self._read = read    # OutsideTrades.read_for_exits: None while the positions are unreadable (blind)
        self._ready = ready  # wakes the engine
        self._lock = threading.Lock()
        self._asked: set[str] = set()    # waiting for the next read
        self._reading: set[str] = set()  # served by the read under way
        self._views: dict[str, tuple[float, Optional[BrokerView] | ReadFailed]] = {}  # with when it was read
        self._running = False

    def take(self, alert_id: str, fresh_s: Optional[float] = FRESH_S) -> tuple[bool, Optional[BrokerView]]:
        """(True, the view) once a read begun after the alert was asked for has ended, and ended within fresh_s
        (None: whenever); else ask for one. Raises ReadFailed if that read raised."""
        with self._lock:
            if alert_id in self._views:
                at, view = self._views.pop(alert_id)
                if isinstance(view, ReadFailed):
                    raise view
                if fresh_s is None or time.monotonic() - at <= fresh_s:
                    return True, view
        self.ask(alert_id)
        return False, None

    def done(self, alert_id: str) -> bool:
        """A read for this key has ended (take would answer now, unless its view is too old)."""
        with self._lock:
            return alert_id in self._views

    def ask(self, alert_id: str) -> None:
        """A read for this alert (or hook's intents), unless one is asked for, under way or done."""
        with self._lock:
            if alert_id in self._views or alert_id in self._asked or alert_id in self._reading:
                return
            self._asked.add(alert_id)
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._run, name="exit-reads", daemon=True).start()

    def forget(self, alert_id: str) -> None:
        """The alert was decided without its view (stale, or the engine gave up on it)."""
        with self._lock:
            self._asked.discard(alert_id)
            self._reading.discard(alert_id)  # the read under way keeps no view for it
            self._views.pop(alert_id, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._asked:
                    self._running = False
                    return
                self._reading, self._asked = self._asked, set()
            try:
                view: Optional[BrokerView] | ReadFailed = self._read()
            except Exception as e:  # never left waiting, never uncapped: the alerts fail, saying why
                log.exception("reading the broker's books for exits failed")
                view = ReadFailed(f"reading the broker's books for the exit failed ({type(e).__name__}: {e})")
            with self._lock:
                at = time.monotonic()
                self._views = {k: v for k, v in self._views.items() if at - v[0] < KEPT_S}
                self._views.update((a, (at, view)) for a in self._reading)
                self._reading = set()
            self._ready()
