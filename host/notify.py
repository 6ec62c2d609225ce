"""Notifications: notifier plugins get every event, on their own thread, off the trading path."""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional

from .config import VARS, Settings
from .plugins.dispatch import CallResult
from .plugins.registry import Live, Registry
from .storage import Storage

log = logging.getLogger(__name__)
CURSOR_KEY = "notify_cursor"
GIVEN_SECRETS = {"telegram": ("TELEGRAM_BOT_TOKEN", "TELEGRAM_WEBHOOK_SECRET")}  # the only secrets a notifier is handed


@dataclass
class Baton:
    """Handed from each version of a notifier to the next within this process: a lock for a resource
    only one version may use at a time (a Telegram long poll), and values the versions share."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    values: dict = field(default_factory=dict)


@dataclass
class NotifierContext:
    """What a notifier gets at start: its settings, logger, state, the host's read models and
    controls (`host`, a HostAccess), and its baton."""

    name: str
    version: str
    settings: Mapping[str, Any]
    logger: logging.Logger
    state: dict
    host: Any = None
    baton: Baton = field(default_factory=Baton)


def notifier_settings(settings: Settings, name: str) -> Mapping[str, Any]:
    """Settings without secrets, except those this notifier needs."""
    given = GIVEN_SECRETS.get(name, ())
    return MappingProxyType({v.name: settings.values.get(v.name) for v in VARS if not v.secret or v.name in given})


class NotifierRegistry(Registry):
    kind = "notifier"

    def __init__(self, *args: Any, settings: Settings, access: Any = None, **kw: Any):
        self.settings = settings
        self.access = access
        self.batons: dict[str, Baton] = {}
        super().__init__(*args, **kw)

    def _start(self, live: Live, state: dict) -> CallResult:
        cand = live.candidate
        live.ctx = NotifierContext(cand.name, cand.version, notifier_settings(self.settings, cand.name),
                                   logging.getLogger(f"notifier.{cand.name}"), dict(state), self.access,
                                   self.batons.setdefault(cand.name, Baton()))
        fn = cand.hooks.get("notifier_start")
        live.started = fn is not None
        return live.caller.call("notifier_start", fn, {"ctx": live.ctx}) if fn else CallResult()

    def _stop(self, live: Live, reason: str) -> None:
        fn = live.candidate.hooks.get("notifier_stop")
        if fn is not None:
            r = live.caller.call("notifier_stop", fn, {"reason": reason})
            if not r.ok:
                log.warning("notifier %s: %s", live.label, r.error)

    def _snapshot(self, live: Live) -> Optional[dict]:
        return live.ctx.state if live.ctx is not None else None

    def _idle(self, result: CallResult) -> Optional[str]:
        """notifier_start returned {"idle": "why"}: it runs but sends nothing (Telegram without its token)."""
        value = result.value
        return str(value["idle"])[:300] if isinstance(value, dict) and value.get("idle") else None


class EventPump:
    """Reads new events from the database and hands each to every running notifier."""

    def __init__(self, storage: Storage, registry: NotifierRegistry, interval_s: float = 0.2):
        self.storage = storage
        self.registry = registry
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if self.storage.get_state(CURSOR_KEY) is None:  # first start: do not replay old history
            last = self.storage.one("select coalesce(max(id), 0) n from events")["n"]
            self.storage.write(lambda db: Storage.put_state(db, CURSOR_KEY, str(last)))
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.pump()
            except Exception:
                log.exception("notification pump failed; continuing")

    def pump(self) -> int:
        """Deliver the events after the cursor; return how many.

        At most once: the cursor is moved past an event, durably, before any notifier sees it. A crash
        while sending loses that message; it never sends one twice. When the cursor cannot be written
        (a full disk), this raises and nothing is sent.
        """
        cursor = int(self.storage.get_state(CURSOR_KEY) or 0)
        events = self.storage.rows("select * from events where id > ? order by id limit 200", (cursor,))
        if events and not any("notifier_send" in live.candidate.hooks for live in self.registry.running()):
            # nobody to tell: the cursor moves past them all in one write (nothing was sent, so none can repeat)
            self.storage.write(lambda db: Storage.put_state(db, CURSOR_KEY, str(events[-1]["id"])), durable=True)
            return len(events)
        for e in events:
            self.storage.write(lambda db, done=e["id"]: Storage.put_state(db, CURSOR_KEY, str(done)), durable=True)
            event = {**e, "data": json.loads(e["data"]) if e["data"] else None}
            for live in self.registry.running():
                fn = live.candidate.hooks.get("notifier_send")
                if fn is not None:
                    try:
                        result = live.caller.call("notifier_send", fn, {"event": event})
                    except RuntimeError:  # retired while we were delivering
                        continue
                    if not result.ok:
                        log.warning("notifier %s: %s", live.label, result.error)
                    self.registry.record_call(live, "notifier_send", result, quiet=True)
        return len(events)
