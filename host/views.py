"""Read models shared by the API, the dashboard and notifiers: records in the contract's shape."""
from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Optional

from .models import OrderStatus
from .plugins.reloader import missing_folders
from .risk import DAY_KEY, CorruptState, RiskGate, _day_start_utc, trailing_limit, warning_level
from .storage import HEARTBEAT_KEY, Storage, dec

ORDER_FIELDS = ("id", "alert_id", "strategy", "action", "exchange", "symbol", "side", "qty", "order_type", "price",
                "trigger_price", "product", "status", "filled_qty", "avg_price", "broker_order_id", "reason",
                "created_at", "updated_at", "strategy_version")
UNFINISHED = tuple(st.value for st in OrderStatus if not st.terminal)  # named: the status index finds them


def order_record(row: dict) -> dict:
    return {k: row[k] for k in ORDER_FIELDS}


def alert_record(row: dict) -> dict:
    return {"id": row["id"], "received_at": row["received_at"], "strategy": row["strategy"],
            "execution_type": row["execution_type"], "alert_key": row["client_alert_id"], "status": row["status"],
            "reason": row["reason"], "orders": json.loads(row["orders"] or "[]"),
            "problems": json.loads(row["problems"] or "[]"), "duplicate_of": row["duplicate_of"],
            "decided_at": row["decided_at"], "source_ip": row["source_ip"]}


def positions(storage: Storage, include_flat: bool = True, protections: bool = True) -> list[dict]:
    rows = storage.rows("select p.*, q.ltp from positions p left join quotes q on q.exchange = p.exchange "
                        "and q.symbol = p.symbol order by p.strategy, p.exchange, p.symbol")
    from .protect import position_fields
    guards = position_fields(storage) if protections else {}  # the stop, target, trail level and resting stop order of each position
    none = {"stop_loss": None, "target": None, "trailing": None, "protection_status": None, "stop_orders": []}
    out = []
    for r in rows:
        if not include_flat and r["net_qty"] == 0:
            continue
        avg, ltp = dec(r["avg_price"]), dec(r["ltp"])
        unrealized = (ltp - avg) * r["net_qty"] + 0 if ltp is not None and r["net_qty"] else Decimal("0")  # (no -0)
        out.append({"strategy": r["strategy"], "exchange": r["exchange"], "symbol": r["symbol"],
                    "product": r["product"], "net_qty": r["net_qty"], "avg_price": avg, "ltp": ltp,
                    "realized_pnl": dec(r["realized_pnl"]), "unrealized_pnl": unrealized,
                    "updated_at": r["updated_at"],
                    **guards.get((r["strategy"], r["exchange"], r["symbol"], r["product"]), none)})
    return out


def alerts_add_up_to(storage: Storage) -> list[dict]:
    """What each strategy's alerts add up to per instrument, every product together (alert_positions.py): what
    TradingView believes it holds, where an ADJUST is cut to."""
    return storage.rows("select strategy, exchange, symbol, believed qty, updated_at from alert_positions "
                        "order by strategy, exchange, symbol")


def traded_symbols(storage: Storage) -> set[tuple[str, str]]:
    """(exchange, symbol) of every open position and every unfinished order (the live feed's subscriptions).

    The statuses are named, not "not finished": the status index finds them however many orders have ended."""
    held = storage.rows("select distinct exchange, symbol from positions where net_qty != 0")
    working = storage.rows(f"select distinct exchange, symbol from orders where status in "
                           f"({', '.join('?' * len(UNFINISHED))})", UNFINISHED)
    return {(r["exchange"], r["symbol"]) for r in held + working}


def pnl_by_strategy(storage: Storage) -> tuple[Decimal, dict[str, Decimal]]:
    """The day's realised plus unrealised PnL, in total and per strategy; CNC holdings excluded."""
    # the risk loop asks 4 times a second: only the columns it adds up, as tuples (a dict per row of every
    # position, with its Decimals, took a tenth of the worker's time on a day of 2,000 positions)
    rows = storage.read(lambda db: db.conn.execute(
        "select p.strategy, p.net_qty, p.avg_price, p.realized_pnl, q.ltp from positions p left join quotes q "
        "on q.exchange = p.exchange and q.symbol = p.symbol where p.product != 'C'").fetchall())
    by: dict[str, Decimal] = {}
    for strategy, net_qty, avg, realized, ltp in rows:
        pnl = dec(realized) or Decimal("0")
        if net_qty and ltp is not None:
            pnl += (dec(ltp) - dec(avg)) * net_qty
        by[strategy] = by.get(strategy, Decimal("0")) + pnl
    return sum(by.values(), Decimal("0")), by


def day_pnl(storage: Storage) -> Decimal:
    return pnl_by_strategy(storage)[0]


def risk(storage: Storage, gate: RiskGate) -> dict:
    """The contract's risk record, plus blind mode and per-strategy usage."""
    st = gate.state()
    pnl, by_strategy = pnl_by_strategy(storage)
    m, limits = gate.manager, gate.limits
    today = gate.clock.day(gate.now())
    record = {"state": st["state"], "state_reason": st.get("reason"), "state_by": st.get("by"), "state_at": st.get("at"),
              "day_pnl": pnl, "base_max_loss": limits.base, "trail_step": limits.step}
    try:
        day = m.load_day(today)
        streak, until = m.streak(today), m.cooldown_until(today)
    except CorruptState as e:
        return {**record, "max_loss": limits.base, "peak_pnl": None, "breached": None, "warning": None,
                "consecutive_loss_days": None, "cooldown_until": None, "blind": None, "error": str(e)}
    limit = max(day.limit, day.anchor + trailing_limit(limits.base, limits.step, max(day.peak, pnl) - day.anchor))
    carried = storage.rows("select carried_qty, carried_from, avg_price from positions where net_qty != 0 and "
                           "carried_qty is not null and product != 'C'")
    counts = {r["strategy"]: r["n"] for r in storage.rows(
        "select strategy, count(*) n from orders indexed by idx_orders_created_at where created_at >= ? and "
        "action != 'EXIT' group by strategy",
        (_day_start_utc(today),))}
    return {**record, "day": day.day, "max_loss": limit, "peak_pnl": max(day.peak, pnl), "breached": day.breached,
            "warning": pnl <= warning_level(limit, limits.base, limits.threshold), "consecutive_loss_days": streak,
            "cooldown_until": until.isoformat() if until else None, "blind": day.blind,
            "breached_at": day.breached_at, "breach_overridden_by": day.overridden_by, "estimated": day.estimated,
            "carried": {"positions": len(carried), "excluded_pnl": sum(  # gained or lost by the previous close
                ((Decimal(r["avg_price"]) - Decimal(r["carried_from"])) * r["carried_qty"] for r in carried),
                Decimal("0"))},
            "ticks_held": int(storage.get_state("ticks_held") or 0),
            "strategies": {name: {"pnl": by_strategy.get(name, Decimal("0")), "orders_today": counts.get(name, 0),
                                  "stopped_today": name in day.strategy_stops,
                                  "max_orders_per_day": limits.max_orders_per_day or None}
                           for name in sorted(set(by_strategy) | set(counts))}}


def order_counts(storage: Storage, since: str) -> dict[str, int]:
    """Orders made since `since` (ISO UTC), by status: read by their time, whatever the history holds."""
    return {r["status"]: r["n"] for r in storage.rows(
        "select status, count(*) n from orders indexed by idx_orders_created_at where created_at >= ? group by "
        "status", (since,))}


def day_summary(storage: Storage, gate: RiskGate) -> dict:
    """Today's numbers: PnL (and per strategy), orders by status, alerts by decision, the trading state."""
    today = gate.clock.day(gate.now())
    since = _day_start_utc(today)
    pnl, by = pnl_by_strategy(storage)
    orders = order_counts(storage, since)
    alerts = {r["status"]: r["n"] for r in storage.rows(
        "select status, count(*) n from alerts where received_at >= ? group by status", (since,))}
    return {"day": today.isoformat(), "pnl": pnl, "by_strategy": by, "orders": orders, "alerts": alerts,
            "state": gate.state()["state"]}


def plugin_records(storage: Storage, kind: str) -> list[dict]:
    rows = storage.rows("select * from plugins where kind = ? order by name", (kind,))
    return [{"name": r["name"], "version": r["version"], "generation": r["generation"], "status": r["status"],
             "reason": r["detail"] if r["status"] == "idle" else None,  # why an idle plugin does nothing
             "error": r["error"], "traceback": r["detail"] if r["status"] != "idle" else None,
             "file": r["file"], "digest": r["digest"],
             "updated_at": r["updated_at"], "history": json.loads(r["history"] or "[]")} for r in rows]


ENGINE_STEP_MAX_S, RISK_EVAL_MAX_S = 5.0, 10.0


def _age_s(storage: Storage, key: str) -> Optional[float]:
    beat = storage.get_state(key)
    return (datetime.now(timezone.utc) - datetime.fromisoformat(beat)).total_seconds() if beat else None


def _blind(storage: Storage) -> Optional[str]:
    raw = storage.get_state(DAY_KEY)
    try:
        return json.loads(raw).get("blind") if raw else None
    except ValueError:
        return None


def health_problems(storage: Storage, settings: Any) -> list[str]:
    """What makes the host unhealthy now: a stuck engine loop, risk not evaluating, no writes, a full disk."""
    problems = []
    age = _age_s(storage, HEARTBEAT_KEY)
    if age is None or age > ENGINE_STEP_MAX_S:
        problems.append(f"the engine loop has not completed a step for {age or 0:.0f} s")
    age = _age_s(storage, "risk_heartbeat")
    if age is None or age > RISK_EVAL_MAX_S:
        problems.append(f"risk has not evaluated for {age or 0:.0f} s" if age is not None else "risk has not evaluated yet")
    blind = _blind(storage)
    if blind:
        problems.append(f"risk is blind: the broker's positions cannot be read ({blind}); entries are refused and "
                        f"the limits act on a PnL estimated from our own book")
    if storage.low_space:
        problems.append(f"the disk of {storage.path.parent} is nearly full: the reserve kept for risk and exits "
                        f"is in use, and new entries are refused (507) until space is freed")
    if storage.full_since:
        problems.append(f"the database cannot be written: the disk has been full since {storage.full_since}")
    if storage.group is not None and storage.group.failed is not None:
        problems.append(f"the disk failed to confirm a write (fsync: {storage.group.failed}): nothing can be promised "
                        f"durable; alerts answer 503 and no order is sent until the host is restarted and the disk "
                        f"checked")
    free_mb = shutil.disk_usage(storage.path.parent).free / 1e6
    if free_mb < settings.DISK_MIN_FREE_MB:
        problems.append(f"the disk of {storage.path.parent} has {free_mb:.0f} MB free, below DISK_MIN_FREE_MB="
                        f"{settings.DISK_MIN_FREE_MB}")
    problems += [f"{said.get('message')} (since {said.get('since')})" for said in missing_folders(storage).values()]
    return problems


def engine_alive(storage: Storage, local_running: bool, max_age_s: float = 3.0) -> bool:
    """True when this process runs the engine, or another process's heartbeat is fresh."""
    if local_running:
        return True
    beat = storage.get_state(HEARTBEAT_KEY)
    if not beat:
        return False
    return datetime.now(timezone.utc) - datetime.fromisoformat(beat) < timedelta(seconds=max_age_s)


def page(storage: Storage, table: str, where: list[tuple[str, Any]], limit: int, offset: int,
         order: str = "rowid desc", since: Optional[tuple[str, str]] = None) -> tuple[list[dict], int]:
    """Rows of a table filtered by equality on whitelisted columns (and `column >= value`), newest first."""
    conditions = [(f"{col} = ?", v) for col, v in where] + ([(f"{since[0]} >= ?", since[1])] if since else [])
    clause = " and ".join(c for c, _ in conditions) or "1"
    params = tuple(v for _, v in conditions)
    total = storage.one(f"select count(*) n from {table} where {clause}", params)["n"]
    rows = storage.rows(f"select * from {table} where {clause} order by {order} limit ? offset ?",
                        (*params, limit, offset))
    return rows, total
