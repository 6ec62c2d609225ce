"""Live plugin versions of one kind: start, atomic swap on the engine thread, stop, state handover."""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..storage import Storage, utcnow
from .dispatch import Breaker, Caller, CallResult
from .loader import Candidate, LoadError, digest_of, load, new_manager, plugin_name

START_HOOKS = frozenset({"strategy_start", "notifier_start"})  # a late one leaves a version started, never live

log = logging.getLogger(__name__)
HISTORY = 20


@dataclass
class Live:
    """One running plugin version with its own caller thread and breaker."""

    candidate: Candidate
    generation: int
    caller: Caller
    breaker: Breaker
    ctx: Any = None
    mail: Any = None  # strategies: the calls waiting for its thread (ticks coalesced per symbol)
    started: bool = False  # its start hook was called (what it started before failing is stopped)

    @property
    def label(self) -> str:
        return f"{self.candidate.name} v{self.candidate.version} (generation {self.generation})"


@dataclass
class Entry:
    """Everything the host knows about one plugin name."""

    name: str
    path: Optional[Path] = None
    live: Optional[Live] = None
    generation: int = 0
    disabled: bool = False
    error: Optional[str] = None
    detail: Optional[str] = None
    digest: Optional[str] = None  # of the last bytes tried, loaded or not
    history: list = field(default_factory=list)
    idle: Optional[str] = None  # why a live version does nothing (a notifier without its token)

    @property
    def status(self) -> str:
        if self.disabled:
            return "disabled"
        if self.live is not None:
            return "idle" if self.idle else "running"
        return "error" if self.error else "stopped"


class Registry:
    """The plugins of one kind; every change of a live version happens on the engine thread."""

    kind = ""

    def __init__(self, storage: Storage, folder: Path, budget_s: float, breaker_limit: int,
                 emit: Callable[[str, str, str, Optional[str], Optional[dict]], None]):
        self.storage = storage
        self.folder = Path(folder)
        self.budget_s = budget_s
        self.breaker_limit = breaker_limit
        self.emit = emit  # (kind, message, severity, strategy, data) -> event
        self.entries: dict[str, Entry] = {}
        self.pm = new_manager(self.kind)  # holds exactly the live versions of this kind
        self._load_lock = threading.Lock()
        self.submit: Callable[[Callable[[], None]], None] = lambda fn: fn()  # the engine sets its own
        for row in storage.rows("select name, status, generation from plugins where kind = ?", (self.kind,)):
            self.entries[row["name"]] = Entry(row["name"], generation=row["generation"] or 0,
                                              disabled=row["status"] == "disabled")

    # ---- kind hooks (overridden) ----
    def _start(self, live: Live, state: dict) -> CallResult:
        raise NotImplementedError

    def _stop(self, live: Live, reason: str) -> None:
        raise NotImplementedError

    def _snapshot(self, live: Live) -> Optional[dict]:
        return None

    def _idle(self, result: CallResult) -> Optional[str]:
        """Why a started version does nothing, from what its start hook returned; None when it works."""
        return None

    # ---- loading (any thread) ----
    def prepare(self, path: Path, force: bool = False) -> Optional[Candidate | LoadError]:
        """Read, hash and load a file; None when its bytes are the ones already tried."""
        name = plugin_name(path)
        if name is None:
            return None
        try:
            data = path.read_bytes()
        except OSError:
            return None  # gone again: the delete event will follow
        entry = self.entries.get(name)
        if entry is not None and entry.digest == digest_of(data) and not force:
            return None
        with self._load_lock:
            try:
                return load(self.kind, path, data, (entry.generation if entry else 0) + 1)
            except LoadError as e:
                e.name, e.digest, e.path = name, digest_of(data), path
                return e

    # ---- life cycle (engine thread) ----
    def apply(self, outcome: Candidate | LoadError) -> None:
        """Put a prepared version live, or record why it could not be; the old version runs on if so."""
        if isinstance(outcome, LoadError):
            entry = self.entries.setdefault(outcome.name, Entry(outcome.name))
            entry.path, entry.digest = outcome.path, outcome.digest
            self._failed(entry, str(outcome), outcome.detail, "load")
            return
        cand = outcome
        entry = self.entries.setdefault(cand.name, Entry(cand.name))
        entry.path, entry.digest = cand.path, cand.digest
        if entry.disabled:  # the file is read again when the plugin is enabled
            cand.retire()
            self._save(entry, "file changed while disabled")
            return
        self._go_live(entry, cand)

    def _go_live(self, entry: Entry, cand: Candidate) -> None:
        generation = entry.generation + 1
        live = Live(cand, generation, Caller(f"{cand.name}.g{generation}", self.budget_s), Breaker(self.breaker_limit))
        live.caller.on_slow = lambda hook, result: self.record_call(live, hook, result)
        live.caller.on_late = lambda hook, result: self.report_late(live, hook, result)
        old = entry.live
        state = (self._snapshot(old) if old else None)
        if state is None:
            state = self.saved_state(cand.name)
        result = self._start(live, state)
        if not result.ok:
            late = result.slow and not result.busy  # a start past its budget still runs: see report_late
            if live.started and not late and not result.busy:  # it raised: what it started before is stopped
                self._stop_quietly(live, f"its start failed ({result.error}): it never went live")
            live.caller.close()
            if not late:
                cand.retire()
            self._failed(entry, f"{cand.name} v{cand.version}: start failed: {result.error}", result.detail, "start")
            return
        entry.live, entry.generation, entry.error, entry.detail = live, generation, None, None  # the swap
        entry.idle = self._idle(result)
        self.pm.register(cand.module, name=f"{cand.name}.g{generation}")
        if old is not None:
            self._retire(old, "reload")
        # the event first: whoever sees the new status also finds its event
        doing = f"idle: {entry.idle}" if entry.idle else "running"
        self.emit("plugin_loaded", f"{self.kind} {live.label} is {doing}", "info",
                  cand.name if self.kind == "strategy" else None, {"version": cand.version, "generation": generation,
                                                                   "idle": entry.idle})
        self._save(entry, f"v{cand.version} {doing}" + (" (reloaded)" if old else ""))

    def _failed(self, entry: Entry, error: str, detail: Optional[str], stage: str) -> None:
        entry.error, entry.detail = error, detail
        still = f"; {entry.live.label} keeps running" if entry.live else ""
        self.emit("plugin_failed", f"{self.kind} {entry.name}: {error}{still}", "error",
                  entry.name if self.kind == "strategy" else None, {"digest": entry.digest, "stage": stage})
        self._save(entry, f"{stage} failed")

    def _retire(self, live: Live, reason: str) -> None:
        self._stop(live, reason)
        self.persist_state(live)  # after its stop hook, so what the plugin saved while stopping is kept
        live.caller.close()
        if self.pm.is_registered(live.candidate.module):
            self.pm.unregister(live.candidate.module)
        live.candidate.retire()

    def remove(self, name: str) -> None:
        """The file is gone: stop the plugin, keep its last state for a re-added file."""
        entry = self.entries.get(name)
        if entry is None:
            return
        if entry.live is not None:
            label = entry.live.label
            self._retire(entry.live, "deleted")
            entry.live = None
            self.emit("plugin_removed", f"{self.kind} {label} stopped: its file was deleted", "warning",
                      name if self.kind == "strategy" else None, None)
        entry.error, entry.detail, entry.digest, entry.path = None, None, None, None
        entry.disabled = False
        # the file is gone, so it is no longer listed; its state stays for a file added again
        self.storage.write(lambda db: db.execute("delete from plugins where kind = ? and name = ?", (self.kind, name)))

    def set_disabled(self, name: str, disabled: bool, why: str) -> None:
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(name)
        if disabled == entry.disabled:
            return
        entry.disabled = disabled
        if disabled and entry.live is not None:
            self._retire(entry.live, "disabled")
            entry.live, entry.idle = None, None
        self.emit("plugin_" + ("disabled" if disabled else "enabled"), f"{self.kind} {name} {why}",
                  "warning" if disabled else "info", name if self.kind == "strategy" else None, None)
        self._save(entry, why)
        if not disabled and entry.path is not None and entry.path.exists():
            entry.digest = None  # load the file as it is now
            outcome = self.prepare(entry.path)
            if outcome is not None:
                self.apply(outcome)

    def report_late(self, live: Live, hook: str, result: CallResult) -> None:
        """An abandoned call ended (any thread): its result is dropped; say what was dropped. A start that ended so
        was counted failed, and its version never went live: what it started (a thread polling Telegram) is stopped."""
        message = (f"{self.kind} {live.label}: {hook} ended after {result.duration_s:.2f} s, past its "
                   f"{live.caller.budget_s:g} s budget; {self.dropped(result)} dropped")
        entry = self.entries.get(live.candidate.name)
        never_live = entry is None or entry.live is not live  # its start (or validation) overran: counted failed
        if never_live and hook in START_HOOKS:
            message += "; it never went live, and is stopped"
        if self.kind != "strategy":  # a notifier's events would come back to it
            log.warning("%s", message)
        else:
            self.emit("plugin_late", message, "warning", live.candidate.name,
                      {"hook": hook, "duration_s": round(result.duration_s, 3), "version": live.candidate.version,
                       "error": result.error})
        if never_live and hook in START_HOOKS:
            self._stop_abandoned(live)
        elif never_live:
            live.candidate.retire()  # kept for its late call (_go_live)

    def _stop_abandoned(self, live: Live) -> None:
        """Stop a version whose start ended past its budget (its own caller is closed: a new one, as guarded)."""
        live.caller = Caller(f"{live.label}.stop", self.budget_s)
        try:
            self._stop_quietly(live, f"its start took longer than its {self.budget_s:g} s budget: it never went live")
        finally:
            live.caller.close()
            live.candidate.retire()

    def _stop_quietly(self, live: Live, reason: str) -> None:
        """The stop hook of a version that never went live (through its caller, as every call); errors logged."""
        try:
            self._stop(live, reason)
        except Exception:
            log.exception("%s %s: stopping it after its start failed", self.kind, live.label)

    @staticmethod
    def dropped(result: CallResult) -> str:
        if not result.ok:
            return f"its error ({result.error}) was"
        return f"its result ({result.value!r:.200}) was"

    def record_call(self, live: Live, hook: str, result: CallResult, quiet: bool = False) -> None:
        """Attribute a call's failure to its plugin version; trip the breaker after repeated failures.

        quiet: record without an event per failure (notifiers: their events would come back to them).
        """
        if result.busy:
            return  # never called: the overrun that keeps it busy was recorded already
        if result.slow and not quiet:
            self.emit("plugin_slow", f"{self.kind} {live.label}: {result.error}", "warning",
                      live.candidate.name if self.kind == "strategy" else None,
                      {"hook": hook, "duration_s": round(result.duration_s, 3)})
        if not result.ok:
            entry = self.entries[live.candidate.name]
            entry.error, entry.detail = f"{live.label}: {result.error}", result.detail
            if not result.slow and not quiet:
                self.emit("plugin_error", f"{self.kind} {live.label}: {result.error}", "error",
                          live.candidate.name if self.kind == "strategy" else None,
                          {"hook": hook, "version": live.candidate.version})
            self._save(entry, None)
        if live.breaker.record(result.ok):
            why = f"disabled by the circuit breaker after {live.breaker.limit} failures in a row (last: {result.error})"
            self.submit(lambda: self.entries[live.candidate.name].live is live
                        and self.set_disabled(live.candidate.name, True, why))

    def shutdown(self) -> None:
        for entry in self.entries.values():
            if entry.live is not None:
                self._retire(entry.live, "shutdown")
                entry.live = None

    def running(self) -> list[Live]:
        return [e.live for e in list(self.entries.values()) if e.live is not None]

    # ---- persistence ----
    def saved_state(self, name: str) -> dict:
        row = self.storage.one("select state from plugin_state where kind = ? and name = ?", (self.kind, name))
        try:
            state = json.loads(row["state"]) if row else {}
        except ValueError:
            state = {}
        return state if isinstance(state, dict) else {"value": state}

    def persist_state(self, live: Live, state: Optional[dict] = None) -> None:
        """Store the plugin's state: `state` as given, else its snapshot (on the engine thread)."""
        state = self._snapshot(live) if state is None else state
        if state is None:
            return
        try:
            text = json.dumps(state, default=str)
        except (TypeError, ValueError) as e:
            self.emit("plugin_error", f"{self.kind} {live.label}: state is not JSON-able: {e}", "error", None, None)
            return
        self.storage.write(lambda db: Storage.insert(db, "plugin_state", {
            "kind": self.kind, "name": live.candidate.name, "state": text, "version": live.candidate.version,
            "updated_at": utcnow()}, upsert_pk=("kind", "name")))

    def _save(self, entry: Entry, change: Optional[str]) -> None:
        if change:
            entry.history = ([{"at": utcnow(), "change": change, "digest": (entry.digest or "")[:12],
                               "generation": entry.generation}] + entry.history)[:HISTORY]
        live = entry.live
        row = {"kind": self.kind, "name": entry.name, "version": live.candidate.version if live else None,
               "generation": entry.generation, "status": entry.status, "error": entry.error,
               "detail": entry.idle if entry.status == "idle" else entry.detail,  # an idle plugin: why it is idle
               "file": str(entry.path) if entry.path else None, "digest": entry.digest, "updated_at": utcnow(),
               "history": json.dumps(entry.history)}
        self.storage.write(lambda db: Storage.insert(db, "plugins", row, upsert_pk=("kind", "name")))
