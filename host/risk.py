"""Risk gate: the persisted trading state (active, reduce_only, halted) decides what may trade."""
from __future__ import annotations

import json
from typing import Optional

import sqlite_utils

from .models import TradingState
from .storage import Storage, utcnow

STATE_KEY = "trading_state"


class RiskGate:
    """Refuses intents the trading state forbids; the state survives restarts."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def state(self) -> dict:
        raw = self.storage.get_state(STATE_KEY)
        if raw:
            return json.loads(raw)
        return {"state": TradingState.ACTIVE.value, "reason": None, "by": None, "at": None}

    @property
    def trading_state(self) -> TradingState:
        return TradingState(self.state()["state"])

    def refusal(self, reducing: bool) -> Optional[str]:
        """Why an intent may not trade now, or None when it may."""
        st = self.state()
        if reducing or st["state"] == TradingState.ACTIVE.value:
            return None
        why = f" ({st['reason']})" if st.get("reason") else ""
        return f"trading is {st['state']}{why}: only exits and reductions are allowed"

    def set_state(self, db: sqlite_utils.Database, state: TradingState, reason: str, by: str) -> None:
        Storage.put_state(db, STATE_KEY, json.dumps({"state": state.value, "reason": reason, "by": by, "at": utcnow()}))
        Storage.add_event(db, "trading_state", f"trading state set to {state.value} by {by}: {reason}",
                          severity="warning" if state is not TradingState.ACTIVE else "info",
                          data={"state": state.value, "by": by})
