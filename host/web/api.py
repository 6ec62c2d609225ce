"""JSON API: status, orders, positions, alerts, risk, events; halt, exit-all, paper ticks; /healthz."""
from __future__ import annotations

import hmac
import json
from decimal import Decimal, InvalidOperation
from typing import Any, Optional

from flask import Blueprint, Response, abort, current_app, jsonify, request

from .. import __version__, views
from . import control, security
from ..models import TradingState
from ..storage import StorageFull
from ..validation import EXCHANGES, SYMBOL_RE, shown

bp = Blueprint("api", __name__)
ORDER_FILTERS = ("status", "strategy", "symbol", "exchange", "alert_id")
ALERT_FILTERS = ("status", "strategy")


def _rt() -> Any:
    return current_app.extensions["host"]


def _error(code: int, message: str, **fields: Any) -> tuple[Response, int]:
    return jsonify({"status": "error", "error": message, **fields}), code


@bp.errorhandler(StorageFull)
def storage_full(e: StorageFull) -> tuple[Response, int]:
    """A full disk: the command was not stored (rolled back); 507, never a generic 500."""
    return _error(507, str(e))


def _by_session() -> bool:
    return not request.headers.get("Authorization")


@bp.before_request
def require_token() -> Optional[tuple[Response, int]]:
    """The Bearer API token, or a dashboard session (with its CSRF token for anything that changes state)."""
    if request.endpoint == "api.healthz":
        return None
    header = request.headers.get("Authorization", "")
    if not header and security.logged_in():
        problem = security.csrf_problem() if request.method not in ("GET", "HEAD", "OPTIONS") else None
        return _error(403, problem) if problem else None
    token = header[7:].strip() if header.startswith("Bearer ") else ""
    if not token or not hmac.compare_digest(token.encode(), _rt().settings.API_TOKEN.encode()):
        return _error(401, "missing or wrong token: send the header 'Authorization: Bearer <API_TOKEN>' "
                           "(or log in to the dashboard)")
    return None


@bp.get("/healthz")
def healthz():
    """200 only while the engine steps, risk evaluates, the database takes writes and the disk has room."""
    rt = _rt()
    alive = views.engine_alive(rt.storage, rt.engine_running)
    problems = views.health_problems(rt.storage, rt.settings) if alive else ["the engine is not running"]
    body = {"status": "ok" if not problems else "unavailable", "engine": "running" if alive else "stopped",
            "broker": rt.settings.BROKER, "version": __version__, "problems": problems}
    return jsonify(body), 200 if not problems else 503


MAX_ROW = 2 ** 63 - 1  # SQLite's largest integer: a larger one is no row id or offset


def _whole(name: str, default: int, low: int, high: int, what: str = "a whole number") -> int:
    """A query argument that must be a whole number in [low, high]; 422 naming it and the value found otherwise."""
    raw = request.args.get(name)
    try:
        n = default if raw is None else int(raw)
    except ValueError:
        n = low - 1
    if not low <= n <= high:
        abort(422, f"{name}: expected {what} from {low} to {high}, found {shown(raw)}")
    return n


def _paging() -> tuple[int, int]:
    return _whole("limit", 100, 1, 1000), _whole("offset", 0, 0, MAX_ROW)


def _filters(allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(k, request.args[k]) for k in allowed if request.args.get(k)]


@bp.get("/api/status")
def status():
    rt = _rt()
    counts = {r["status"]: r["n"] for r in rt.storage.rows("select status, count(*) n from orders group by status")}
    return jsonify({"status": "ok", "version": __version__, "mode": rt.settings.BROKER,
                    "engine": "running" if views.engine_alive(rt.storage, rt.engine_running) else "stopped",
                    "trading_state": rt.gate.trading_state.value, "orders_by_status": counts,
                    "open_positions": len(views.positions(rt.storage, include_flat=False)),
                    "day_pnl": views.day_pnl(rt.storage)})


def _listing(table: str, filters: tuple[str, ...], record: Any) -> Response:
    """A filtered, paginated list of one table's records, newest first."""
    limit, offset = _paging()
    rows, total = views.page(_rt().storage, table, _filters(filters), limit, offset)
    return jsonify({"items": [record(r) for r in rows], "total": total, "limit": limit, "offset": offset})


@bp.get("/api/orders")
def orders():
    return _listing("orders", ORDER_FILTERS, views.order_record)


@bp.get("/api/orders/<order_id>")
def order(order_id: str):
    st = _rt().storage
    row = st.one("select * from orders where id = ?", (order_id,))
    if row is None:
        return _error(404, f"no order with id {order_id!r}")
    return jsonify({**views.order_record(row),
                    "history": st.rows("select at, status, detail from order_history where order_id = ? order by id", (order_id,)),
                    "fills": st.rows("select fill_id, qty, price, at from fills where order_id = ? order by at", (order_id,))})


@bp.get("/api/positions")
def positions():
    storage = _rt().storage
    return jsonify({"items": views.positions(storage), "alerts_add_up_to": views.alerts_add_up_to(storage)})


@bp.get("/api/alerts")
def alerts():
    return _listing("alerts", ALERT_FILTERS, views.alert_record)


@bp.get("/api/risk")
def risk():
    rt = _rt()
    return jsonify(views.risk(rt.storage, rt.gate))


@bp.get("/api/events")
def events():
    after = _whole("after", 0, 0, MAX_ROW, "an event id (a whole number)")
    limit, _ = _paging()
    rows = _rt().storage.rows("select * from events where id > ? order by id desc limit ?", (after, limit))
    return jsonify({"items": [{**r, "data": json.loads(r["data"]) if r["data"] else None} for r in rows]})


def _json_object() -> Any:
    body = request.get_json(silent=True, force=True)
    if body is None and request.get_data():
        abort(400, "body is not valid JSON")
    return body


def _command(kind: str, args: Any) -> tuple[Response, int]:
    if isinstance(args, dict) and "by" in args and _by_session():
        args = {**args, "by": "dashboard"}
    out = control.send(kind, args)
    if not out.ok:
        return _error(out.code, out.error)
    return jsonify({"status": "ok", **out.result}), 200


@bp.post("/api/halt")
def halt():
    body = _json_object() or {}
    modes = [m.value for m in TradingState]
    mode = body.get("mode") if isinstance(body, dict) else None
    if mode not in modes:
        return _error(422, "invalid mode", errors=[{"field": "mode", "expected": " | ".join(modes), "found": shown(mode)}])
    reason = body.get("reason")
    if not (reason is None or isinstance(reason, str)):
        return _error(422, "invalid reason", errors=[{"field": "reason", "expected": "text or null",
                                                      "found": shown(reason)}])
    override = body.get("override_breach", False)
    if not isinstance(override, bool):
        return _error(422, "invalid override_breach", errors=[{"field": "override_breach", "expected": "true or false",
                                                               "found": shown(override)}])
    return _command("halt", {"mode": mode, "reason": reason, "by": "api", "override_breach": override})


@bp.post("/api/exit-all")
def exit_all():
    return _command("exit_all", {"by": "api"})


@bp.post("/api/paper/faults")
def paper_faults():
    """Paper mode: rehearse a broker fault. {"positions_unreadable": "why"} (null clears it)."""
    if not _rt().settings.paper:
        abort(404, "paper faults exist only in paper mode (BROKER=paper)")
    body = _json_object()
    if not isinstance(body, dict):
        return _error(422, "invalid fault", errors=[{"field": "body", "expected": 'a JSON object such as '
                                                     '{"positions_unreadable": "why"} (null clears it)',
                                                     "found": shown(body)}])
    why = body.get("positions_unreadable")
    if not (why is None or isinstance(why, str)):
        return _error(422, "invalid fault", errors=[{"field": "positions_unreadable", "expected": "a reason or null",
                                                     "found": shown(why)}])
    return _command("paper_fault", {"positions_unreadable": why})


@bp.post("/api/paper/ticks")
def paper_ticks():
    if not _rt().settings.paper:
        abort(404, "paper ticks exist only in paper mode (BROKER=paper)")
    body = _json_object()
    if isinstance(body, dict):
        body = [body]
    if not isinstance(body, list) or not body:
        return _error(422, "invalid ticks", errors=[{"field": "body", "expected": 'a list of {"exchange","symbol","ltp"}',
                                                     "found": shown(body)}])
    ticks, errors = [], []
    for i, t in enumerate(body):
        t = {str(k).lower(): v for k, v in t.items()} if isinstance(t, dict) else {}
        ex, sym, ltp = t.get("exchange"), t.get("symbol") or t.get("tradingsymbol"), t.get("ltp")
        if ex not in EXCHANGES:
            errors.append({"field": f"[{i}].exchange", "expected": " | ".join(EXCHANGES), "found": shown(ex)})
        if not (isinstance(sym, str) and SYMBOL_RE.match(sym)):
            errors.append({"field": f"[{i}].symbol", "expected": "a trading symbol", "found": shown(sym)})
        try:
            price = Decimal(str(ltp)) if not isinstance(ltp, bool) and ltp is not None else None
        except InvalidOperation:
            price = None
        if price is None or not price.is_finite() or price <= 0:
            errors.append({"field": f"[{i}].ltp", "expected": "a price > 0", "found": shown(ltp)})
        else:
            ticks.append({"exchange": ex, "symbol": str(sym).upper(), "ltp": str(price)})
    if errors:
        return _error(422, "invalid ticks", errors=errors)
    return _command("ticks", {"ticks": ticks})


@bp.get("/api/strategies")
def strategies():
    return jsonify({"items": views.plugin_records(_rt().storage, "strategy")})


@bp.get("/api/notifiers")
def notifiers():
    return jsonify({"items": views.plugin_records(_rt().storage, "notifier")})


@bp.post("/api/strategies/<name>/<any(enable, disable, reload):action>")
def strategy_control(name: str, action: str):
    return _command("plugin", {"kind": "strategy", "name": name, "action": action, "by": "api"})


@bp.post("/api/notifiers/<name>/<any(enable, disable, reload):action>")
def notifier_control(name: str, action: str):
    return _command("plugin", {"kind": "notifier", "name": name, "action": action, "by": "api"})
