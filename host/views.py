"""Read models shared by the API, the dashboard and notifiers: records in the contract's shape."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from .config import Settings
from .engine import HEARTBEAT_KEY
from .risk import RiskGate
from .storage import Storage, dec

ORDER_FIELDS = ("id", "alert_id", "strategy", "action", "exchange", "symbol", "side", "qty", "order_type", "price",
                "trigger_price", "product", "status", "filled_qty", "avg_price", "broker_order_id", "reason",
                "created_at", "updated_at", "strategy_version")


def order_record(row: dict) -> dict:
    return {k: row[k] for k in ORDER_FIELDS}


def alert_record(row: dict) -> dict:
    return {"id": row["id"], "received_at": row["received_at"], "strategy": row["strategy"],
            "execution_type": row["execution_type"], "alert_key": row["client_alert_id"], "status": row["status"],
            "reason": row["reason"], "orders": json.loads(row["orders"] or "[]"),
            "problems": json.loads(row["problems"] or "[]"), "duplicate_of": row["duplicate_of"],
            "decided_at": row["decided_at"], "source_ip": row["source_ip"]}


def positions(storage: Storage, include_flat: bool = True) -> list[dict]:
    rows = storage.rows("select p.*, q.ltp from positions p left join quotes q on q.exchange = p.exchange "
                        "and q.symbol = p.symbol order by p.strategy, p.exchange, p.symbol")
    out = []
    for r in rows:
        if not include_flat and r["net_qty"] == 0:
            continue
        avg, ltp = dec(r["avg_price"]), dec(r["ltp"])
        unrealized = (ltp - avg) * r["net_qty"] if ltp is not None and r["net_qty"] else Decimal("0")
        out.append({"strategy": r["strategy"], "exchange": r["exchange"], "symbol": r["symbol"],
                    "product": r["product"], "net_qty": r["net_qty"], "avg_price": avg, "ltp": ltp,
                    "realized_pnl": dec(r["realized_pnl"]), "unrealized_pnl": unrealized,
                    "updated_at": r["updated_at"]})
    return out


def day_pnl(storage: Storage) -> Decimal:
    """Realised plus unrealised PnL of the positions, CNC holdings excluded."""
    return sum((p["realized_pnl"] + p["unrealized_pnl"] for p in positions(storage) if p["product"] != "C"),
               Decimal("0"))


def risk(storage: Storage, settings: Settings) -> dict:
    st = RiskGate(storage).state()
    pnl = day_pnl(storage)
    base: Decimal = settings.RISK_BASE_MAX_LOSS
    warn_at = base * settings.RISK_WARNING_THRESHOLD
    return {"state": st["state"], "state_reason": st.get("reason"), "state_by": st.get("by"),
            "state_at": st.get("at"), "day_pnl": pnl, "max_loss": base, "peak_pnl": max(pnl, Decimal("0")),
            "breached": pnl <= base, "warning": pnl <= warn_at, "consecutive_loss_days": 0, "cooldown_until": None}


def engine_alive(storage: Storage, local_running: bool, max_age_s: float = 3.0) -> bool:
    """True when this process runs the engine, or another process's heartbeat is fresh."""
    if local_running:
        return True
    beat = storage.get_state(HEARTBEAT_KEY)
    if not beat:
        return False
    return datetime.now(timezone.utc) - datetime.fromisoformat(beat) < timedelta(seconds=max_age_s)


def page(storage: Storage, table: str, where: list[tuple[str, Any]], limit: int, offset: int,
         order: str = "rowid desc") -> tuple[list[dict], int]:
    """Rows of a table filtered by equality on whitelisted columns, newest first, with the total."""
    clause = " and ".join(f"{col} = ?" for col, _ in where) or "1"
    params = tuple(v for _, v in where)
    total = storage.one(f"select count(*) n from {table} where {clause}", params)["n"]
    rows = storage.rows(f"select * from {table} where {clause} order by {order} limit ? offset ?",
                        (*params, limit, offset))
    return rows, total
