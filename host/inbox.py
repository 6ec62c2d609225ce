"""The inbox between the web layer and the engine: alerts and commands, stored before they are answered."""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Optional

import sqlite_utils

from .ids import new_id
from .models import AlertRequest, AlertStatus, ExecutionType, Problem
from .storage import Storage, utcnow
from .protect import to_json
from .validation import NAME_RE, client_alert_key

log = logging.getLogger(__name__)
POLL_START_S = 0.002
POLL_MAX_S = 0.05
RUNS = (AlertStatus.RECEIVED.value, AlertStatus.ACCEPTED.value)  # an alert that ran, or will: a copy is a duplicate
# the alert_id of one the guard blocked is held too: a retry later, once the position is closed, would act on an old
# signal (a refused, rejected or failed one did nothing for a cause that can be fixed: sent again, it runs)
HOLDS_ID = (*RUNS, AlertStatus.BLOCKED.value)
SAME_BODY_SQL = (f"select * from alerts where body_hash = ? and received_at >= ? and status in "
                 f"({','.join('?' * len(RUNS))}) order by rowid desc limit 1")  # the latest that ran, or will


@dataclass(frozen=True)
class AlertRecord:
    """An alert as stored, with its decision once the engine has made it."""

    id: str
    status: str
    reason: Optional[str]
    orders: tuple[str, ...]
    duplicate_of: Optional[str] = None
    problems: tuple[dict, ...] = ()
    client_alert_id: Optional[str] = None
    notes: tuple[str, ...] = ()


def body_hash(body: dict) -> str:
    """A hash of the alert's meaning: the same keys and values in any order or spacing."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _text(v: Any) -> Optional[str]:
    return None if v is None else str(v)


def request_to_json(req: AlertRequest) -> str:
    """The validated request as stored in the inbox (never the secret)."""
    return json.dumps({
        "strategy_name": req.strategy, "execution_type": req.execution_type.value, "alert_id": req.client_alert_id,
        "legs": [{"exchange": l.exchange, "tradingsymbol": l.symbol, "direction": l.side.value, "qty": l.qty,
                  "order_type": l.order_type.value, "product_type": l.product.value,
                  "price": _text(l.price), "trigger_price": _text(l.trigger_price),
                  "protection": to_json(getattr(l, "protection", None))} for l in req.legs],
        "targets": [{"exchange": t.exchange, "tradingsymbol": t.symbol, "product_type": t.product.value,
                     "order_type": t.order_type.value, "position": t.target, "price": _text(t.price)}
                    for t in req.targets],
        "notes": list(req.notes),
    })


def record_from_row(row: dict) -> AlertRecord:
    try:
        notes = tuple(json.loads(row["body"] or "{}").get("notes") or ())
    except (ValueError, AttributeError):
        notes = ()
    return AlertRecord(row["id"], row["status"], row["reason"], tuple(json.loads(row["orders"] or "[]")),
                       row.get("duplicate_of"), tuple(json.loads(row.get("problems") or "[]")),
                       row.get("client_alert_id"), notes)


def dedupe_key(strategy: str, client_alert_id: str) -> str:
    """An alert_id is unique per strategy (names have no ':', so the key is unambiguous)."""
    return f"id:{strategy}:{client_alert_id}"


class Inbox:
    """Stores alerts and commands durably, wakes the engine, and waits for its answers."""

    def __init__(self, storage: Storage, dedupe_window_s: int, alert_id_ttl_s: int = 86400):
        self.storage = storage
        self.dedupe_window_s = dedupe_window_s
        self.alert_id_ttl_s = alert_id_ttl_s
        self._waiters: dict[str, threading.Event] = {}
        self._posted: dict[str, dict] = {}  # a local engine's committed decision, handed to its waiter
        self._waiters_lock = threading.Lock()
        self.wake: Optional[Callable[[], None]] = None  # set while an engine runs in this process
        self.hand: Optional[Callable[[dict], None]] = None  # the same engine's: a new alert row, in commit order
        self.tell: Optional[Callable[[str, str], None]] = None  # no engine here: tell the engine's process (wakeups)
        self.answered: Optional[Callable[[str, str], None]] = None  # the engine is here: tell the process that asked

    # ---- alerts ----
    def store_rejected(self, body: dict, problems: list[Problem], source_ip: str) -> str:
        """Keep a failed-validation alert so its trail is visible; return its id."""
        aid = new_id("a")
        reason = "; ".join(str(p) for p in problems)
        strategy = _name_or_none(body.get("strategy_name"))

        def run(db: sqlite_utils.Database) -> None:
            db["alerts"].insert({
                "id": aid, "received_at": utcnow(), "strategy": strategy,
                "client_alert_id": client_alert_key(body.get("alert_id")),
                "execution_type": _name_or_none(body.get("execution_type")),
                "body": json.dumps(body, default=str)[:65536], "source_ip": source_ip,
                "status": AlertStatus.REJECTED.value, "reason": reason,
                "problems": json.dumps([p.as_dict() for p in problems]), "orders": "[]", "decided_at": utcnow()})
            Storage.add_event(db, "alert_rejected", f"alert {aid} ({strategy or 'no strategy'}) rejected: {reason}",
                              "warning", strategy, {"alert_id": aid})
        self.storage.write(run, durable=True)
        return aid

    def store(self, req: AlertRequest, digest: str, source_ip: str) -> AlertRecord:
        """Store a valid alert, or a duplicate of an earlier one, in one transaction.

        A new alert is handed to a local engine as soon as it is committed (it decides while the commit is
        synced; the order it makes waits for a later durable commit). The caller then waits with wait_alert.
        """
        aid = new_id("a")
        self._expect("alerts", aid)  # before the commit: the engine may decide before this thread goes on
        stored: dict = {}

        def run(db: sqlite_utils.Database) -> AlertRecord:
            now = utcnow()
            original = self._find_original(db, req, digest, now)
            row = {"id": aid, "received_at": now, "strategy": req.strategy, "execution_type": req.execution_type.value,
                   "client_alert_id": req.client_alert_id, "body_hash": digest, "body": request_to_json(req),
                   "source_ip": source_ip, "orders": "[]"}
            if original is None:
                row.update(status=AlertStatus.RECEIVED.value, dedupe_key=None if req.client_alert_id is None
                           else dedupe_key(req.strategy, req.client_alert_id))
                stored.update(row, seq=Storage.insert(db, "alerts", row))
                return AlertRecord(aid, AlertStatus.RECEIVED.value, None, (), None, (), req.client_alert_id, req.notes)
            why = (f"same alert_id {req.client_alert_id!r} as alert {original['id']}"
                   if req.client_alert_id is not None and original["client_alert_id"] == req.client_alert_id
                   else f"same body as alert {original['id']} within {self.dedupe_window_s} s")
            row.update(status=AlertStatus.DUPLICATE.value, reason=f"duplicate: {why}; not executed again",
                       duplicate_of=original["id"], decided_at=now, orders=original["orders"])
            Storage.insert(db, "alerts", row)
            Storage.add_event(db, "alert_duplicate", f"alert {aid} ({req.strategy} {req.execution_type.value}) "
                              f"{row['reason']}", "info", req.strategy, {"alert_id": aid, "duplicate_of": original["id"]})
            return AlertRecord(aid, AlertStatus.DUPLICATE.value, row["reason"],
                               tuple(json.loads(original["orders"] or "[]")), original["id"], (), req.client_alert_id,
                               req.notes)
        def handed(record: AlertRecord) -> None:
            hand = self.hand
            if hand is not None and stored:
                try:
                    hand(dict(stored))
                except Exception:  # the engine's poll finds it anyway
                    log.exception("handing alert %s to the engine failed", aid)
        try:
            record = self.storage.write(run, durable=True, on_commit=handed)  # stored durably before it is answered
        except BaseException:
            self._forget("alerts", aid)
            raise
        if record.status != AlertStatus.RECEIVED.value:
            self._forget("alerts", aid)
        return record

    def _find_original(self, db: sqlite_utils.Database, req: AlertRequest, digest: str, now: str) -> Optional[dict]:
        if req.client_alert_id is not None:
            key = dedupe_key(req.strategy, req.client_alert_id)
            rows = list(db.query("select * from alerts where dedupe_key = ?", (key,)))
            expired = _ago(now, self.alert_id_ttl_s)
            if rows and rows[0]["received_at"] >= expired and rows[0]["status"] in HOLDS_ID:
                return rows[0]
            if rows:  # older than ALERT_ID_TTL_S, or it did nothing (refused, rejected, failed): the id is free again
                db.execute("update alerts set dedupe_key = null where id = ?", (rows[0]["id"],))  # (its trail stays)
        if self.dedupe_window_s <= 0 or req.execution_type is ExecutionType.POSITION:
            return None  # a repeated target is harmless (already at target); 75, 0, 75 in 10 s must all run
        since = _ago(now, self.dedupe_window_s)
        # only an alert that runs (or will) makes a copy a duplicate: a refused one may be sent again
        rows = list(db.query(SAME_BODY_SQL, (digest, since, *RUNS)))
        return rows[0] if rows else None

    def wait_alert(self, alert_id: str, timeout_s: float) -> AlertRecord:
        """The alert once decided, or as it stands when the timeout ends."""
        row = self._wait("alerts", alert_id, timeout_s, lambda r: r["status"] != AlertStatus.RECEIVED.value)
        return record_from_row(row)

    # ---- commands (halt, exit-all, ticks) ----
    def command(self, kind: str, args: Any, timeout_s: float) -> Optional[dict]:
        """Store a command for the engine and wait for its result (None if it did not finish in time)."""
        cid = self.storage.write(lambda db: db["commands"].insert(
            {"at": utcnow(), "kind": kind, "args": json.dumps(args, default=str), "status": "pending"}).last_pk)
        row = self._wait("commands", str(cid), timeout_s, lambda r: r["status"] != "pending")
        return json.loads(row["result"]) if row["status"] != "pending" else None

    # ---- waiting ----
    def _expect(self, table: str, key: str) -> threading.Event:
        """The event a decision on this key will set (made once, before the key is stored)."""
        with self._waiters_lock:
            return self._waiters.setdefault(f"{table}:{key}", threading.Event())

    def _forget(self, table: str, key: str) -> None:
        with self._waiters_lock:
            self._waiters.pop(f"{table}:{key}", None)
            self._posted.pop(f"{table}:{key}", None)

    def _take_posted(self, table: str, key: str) -> Optional[dict]:
        with self._waiters_lock:
            return self._posted.pop(f"{table}:{key}", None)

    def _wait(self, table: str, key: str, timeout_s: float, done: Callable[[dict], bool]) -> dict:
        """Wait for the engine's decision on a stored key."""
        with self._waiters_lock:  # an event made before the key was stored (store) cannot miss the decision
            expected = f"{table}:{key}" in self._waiters
        event = self._expect(table, key)
        try:
            local = self.wake is not None
            if local and not expected:  # it may have been decided before this event existed
                row = self.storage.one(f"select * from {table} where id = ?", (key,))
                if done(row) or timeout_s <= 0:
                    return row
            if self.wake and not (expected and self.hand):  # a handed alert needs no wake
                self.wake()
            elif not local and self.tell and timeout_s > 0:  # the engine runs in another process
                self.tell(table, key)
            deadline = time.monotonic() + timeout_s
            pause = POLL_START_S
            if local and timeout_s > 0:  # a local engine sets the event when it has decided
                event.wait(timeout_s)
                posted = self._take_posted(table, key)
                if posted is not None:  # the row as it committed it: no read needed
                    return posted
            while True:
                row = self.storage.one(f"select * from {table} where id = ?", (key,))
                left = deadline - time.monotonic()
                if done(row) or left <= 0:
                    return row
                # an engine in another process is found by polling
                if event.wait(min(left, pause)):
                    event.clear()
                pause = min(pause * 2, POLL_MAX_S)
        finally:
            self._forget(table, key)

    def decided(self, table: str, key: str, row: Optional[dict] = None) -> None:
        """Called by the engine after it commits a decision (and by wake-ups, for one made elsewhere); `row`,
        if given, is the decided row as committed, handed to a waiter in this process instead of a read."""
        with self._waiters_lock:
            event = self._waiters.get(f"{table}:{key}")
            if event and row is not None:
                self._posted[f"{table}:{key}"] = row
        if event:
            event.set()
        answered = self.answered
        if answered is not None:
            answered(table, key)


def _ago(now: str, seconds: int) -> str:
    """The stored-timestamp form of `seconds` before `now`."""
    return (datetime.fromisoformat(now) - timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def _name_or_none(v: Any) -> Optional[str]:
    """A name fit for logs and messages (ASCII, no control characters), or None: a hostile one forges no lines."""
    return v if isinstance(v, str) and NAME_RE.fullmatch(v) else None
