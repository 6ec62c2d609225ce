"""What a notifier plugin may read and do: the read models, control commands through the engine's
inbox (the same path as the API), and records in the event log. Never the broker, never a secret."""
from __future__ import annotations

import json
from decimal import Decimal
from typing import Callable, Optional

from . import views
from .broker_session import session_state
from .config import Settings
from .inbox import Inbox
from .risk import RiskGate, _day_start_utc
from .storage import Storage, utcnow

COMMANDS = ("halt", "exit_all", "plugin")  # what a notifier may ask the engine to do


class HostAccess:
    """Read models and control for notifiers; every call is safe from any thread."""

    def __init__(self, storage: Storage, inbox: Inbox, gate: RiskGate, settings: Settings,
                 engine_alive: Callable[[], bool]):
        self._storage, self._inbox, self._gate, self._settings = storage, inbox, gate, settings
        self._engine_alive = engine_alive

    # ---- reading ----
    def status(self) -> dict:
        state = self._gate.state()
        counts = views.order_counts(self._storage, self._today())
        return {"mode": self._settings.BROKER, "engine": self._engine_alive(), "trading_state": state["state"],
                "reason": state.get("reason"), "by": state.get("by"),
                "broker_session": "paper" if self._settings.paper else session_state(self._storage)["state"],
                "day_pnl": views.day_pnl(self._storage), "orders_today": counts,
                "open_positions": len(views.positions(self._storage, include_flat=False))}

    def pnl(self) -> tuple[Decimal, dict[str, Decimal]]:
        return views.pnl_by_strategy(self._storage)

    def positions(self, open_only: bool = True) -> list[dict]:
        return views.positions(self._storage, include_flat=not open_only)

    def orders(self, limit: int = 10) -> list[dict]:
        return [views.order_record(r) for r in self._storage.rows(
            "select * from orders order by rowid desc limit ?", (limit,))]

    def risk(self) -> dict:
        return views.risk(self._storage, self._gate)

    def strategies(self) -> list[dict]:
        return views.plugin_records(self._storage, "strategy")

    def day_summary(self) -> dict:
        return views.day_summary(self._storage, self._gate)

    def link(self, path: str) -> str:
        """An address people can open: PUBLIC_URL, or this server's own."""
        s = self._settings
        base = (s.PUBLIC_URL or f"http://{s.HOST}:{s.PORT}").rstrip("/")
        return base + path

    # ---- doing ----
    def command(self, kind: str, args: dict, timeout_s: float = 5.0) -> dict:
        """Ask the engine to do something, as the API does; {"ok": bool, "error"?: str, ...the result}."""
        if kind not in COMMANDS:
            return {"ok": False, "error": f"kind: expected one of {', '.join(COMMANDS)}, found {kind!r}"}
        if not self._engine_alive():
            return {"ok": False, "error": "the engine is not running"}
        result = self._inbox.command(kind, args, timeout_s)
        if result is None:
            return {"ok": False, "error": f"the engine did not finish {kind} within {timeout_s:g} s"}
        return result

    def inbox(self, notifier: str, limit: int = 50) -> list[dict]:
        """Updates the web layer stored for this notifier (a Telegram webhook), not yet handled, oldest first."""
        rows = self._storage.rows("select id, body from notifier_inbox where notifier = ? and handled_at is null "
                                  "order by id limit ?", (notifier, limit))
        return [{"id": r["id"], "body": json.loads(r["body"])} for r in rows]

    def inbox_done(self, row_id: int) -> None:
        self._storage.write(lambda db: db.execute("update notifier_inbox set handled_at = ? where id = ?",
                                                  (utcnow(), row_id)))

    def record(self, kind: str, message: str, severity: str = "info", data: Optional[dict] = None) -> None:
        """Write to the event log (shown on the dashboard, sent to notifiers)."""
        self._storage.write(lambda db: Storage.add_event(db, kind, message, severity, None, data))

    def _today(self) -> str:
        return _day_start_utc(self._gate.clock.day(self._gate.now()))
