"""The dashboard: login, pages made of live panels, and the controls (every one CSRF-checked)."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Callable, Optional
from urllib.parse import urlencode

from flask import (Blueprint, Response, current_app, flash, redirect, render_template, request,
                   url_for)
from markupsafe import Markup

from .. import __version__, backup, views
from ..broker_session import session_state
from ..market import IST
from ..models import OrderStatus, TradingState
from ..risk import _day_start_utc, warning_level
from ..display import inr
from ..storage import dec
from . import broker as broker_login, charts, control, security
from .lockout import LoginThrottle
from .webhook import client_ip

bp = Blueprint("dashboard", __name__)
PAGE_SIZE = 50
ORDER_STATUSES = [s.value for s in OrderStatus]
ALERT_STATUSES = ("accepted", "duplicate", "rejected", "blocked", "refused", "failed", "queued", "received")
RISK_EVENT_KINDS = ("risk_breach", "risk_violation", "risk_strategy_breach", "risk_cooldown", "risk_warning",
                    "trading_state", "exit_all")
ACCESS_EVENT_KINDS = ("login", "login_failed", "logout_all", "login_unlocked")  # dashboard logins: their own category
NAV = (("dashboard.overview", "Overview"), ("dashboard.orders", "Orders"), ("dashboard.positions", "Positions"),
       ("dashboard.alerts", "Alerts"), ("dashboard.strategies", "Strategies"), ("dashboard.risk", "Risk"),
       ("dashboard.broker", "Broker"))


def _rt() -> Any:
    return current_app.extensions["host"]


@bp.before_request
def require_session() -> Optional[Response]:
    """Pages need a login; every POST (login included) needs the page's CSRF token."""
    if request.method == "POST":
        problem = security.csrf_problem()
        if problem:
            return _refused(403, problem)
    if request.endpoint == "dashboard.panel" and security.logged_in():
        limiter = current_app.extensions["panel_limiter"]
        if not limiter.allow(security.csrf_token()):
            return Response("too many refreshes from this session: slow down", 429, mimetype="text/plain",
                            headers={"Retry-After": "1"})
        return None
    if request.endpoint == "dashboard.login" or security.logged_in():
        return None
    if request.endpoint == "dashboard.panel":
        return Response("your session has ended: log in again", 401, mimetype="text/plain")
    return redirect(url_for("dashboard.login", next=request.full_path.rstrip("?")))


def _refused(code: int, message: str) -> Response:
    return Response(render_template("refused.html", title="Refused", message=message), code)


# ---- login ----
@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    address = client_ip()
    error, code, retry_after = None, 200, 0
    if request.method == "POST":
        throttle, device = LoginThrottle(_rt().storage, _rt().settings), security.known_device()
        verdict = throttle.begin(address, device)
        if verdict.attempt is None:
            error, code, retry_after = verdict.message, 429, verdict.wait_s
        elif security.password_ok(request.form.get("password", ""), _rt().settings.DASHBOARD_PASSWORD):
            throttle.succeeded(verdict, address)
            security.start_session(address)
            return security.remember_device(redirect(_safe_next(request.args.get("next"))))
        else:
            failure = throttle.failed(address, device)
            error, code, retry_after = failure.message, failure.code, failure.retry_after
    response = Response(render_template("login.html", title="Log in", error=error), code)
    if retry_after:
        response.headers["Retry-After"] = str(retry_after)
    return response


@bp.post("/logout")
def logout() -> Response:
    security.end_session()
    return redirect(url_for("dashboard.login"))


@bp.post("/logout-everywhere")
def logout_everywhere() -> Response:
    """Every session ends, in every browser (a stolen cookie too); this one logs in again."""
    n = security.end_every_session(client_ip())
    flash(f"Logged out everywhere: {n} session{'s' if n != 1 else ''} ended.", "ok")
    return redirect(url_for("dashboard.login"))


def _safe_next(target: Optional[str]) -> str:
    """Only a path on this site: never an open redirect."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("dashboard.overview")


# ---- panels: each is a template and the function that gathers its data ----
PANELS: dict[str, Callable[[dict], dict]] = {}


def panel_data(name: str) -> Callable[[Callable[[dict], dict]], Callable[[dict], dict]]:
    def register(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
        PANELS[name] = fn
        return fn
    return register


def render_panel(name: str, args: dict) -> Markup:
    """A panel wrapped in the section that live.js refreshes from /panel/<name>."""
    args = {k: v for k, v in args.items() if v not in (None, "")}
    url = url_for("dashboard.panel", name=name) + ("?" + urlencode(args) if args else "")
    body = render_template(f"panels/{name}.html", **PANELS[name](args), args=args)
    return Markup(f'<section class="panel panel-{name}" data-live="{Markup.escape(url)}">{body}</section>')


@bp.get("/panel/<name>")
def panel(name: str) -> Any:
    if name not in PANELS:
        return Response(f"no panel named {name!r}", 404, mimetype="text/plain")
    return render_template(f"panels/{name}.html", **PANELS[name](request.args.to_dict()),
                           args=request.args.to_dict())


def _page_number(args: dict) -> int:
    try:
        return max(1, int(args.get("page", 1)))
    except ValueError:
        return 1


def _limit(args: dict, default: int = PAGE_SIZE) -> int:
    try:
        return min(max(1, int(args.get("limit", default))), 200)
    except ValueError:
        return default


def _today_start() -> str:
    gate = _rt().gate
    return _day_start_utc(gate.clock.day(gate.now()))


def _paging(args: dict, total: int, limit: int) -> dict:
    number = _page_number(args)
    pages = max(1, (total + limit - 1) // limit)
    link = lambda n: "?" + urlencode({**{k: v for k, v in args.items() if k != "limit"}, "page": n})  # noqa: E731
    return {"number": number, "pages": pages, "total": total,
            "prev": link(number - 1) if number > 1 else None, "next": link(number + 1) if number < pages else None}


@panel_data("status")
def _status(args: dict) -> dict:
    rt = _rt()
    state = rt.gate.state()
    r = views.risk(rt.storage, rt.gate)
    broker = {"state": "paper", "why": "simulated broker: no session needed"} if rt.settings.paper \
        else session_state(rt.storage)
    counts = views.order_counts(rt.storage, _today_start())
    working = sum(counts.get(s, 0) for s in ("NEW", "SUBMITTED", "OPEN", "PARTIAL", "UNKNOWN"))
    return {"orders_today": sum(counts.values()), "filled_today": counts.get("FILLED", 0), "working": working,
            "rejected_today": counts.get("REJECTED", 0),
            "open_positions": len(views.positions(rt.storage, include_flat=False)),
            "trading": state["state"], "trading_reason": state.get("reason"), "trading_by": state.get("by"),
            "trading_at": state.get("at"), "blind": r.get("blind"), "broker": broker, "mode": rt.settings.BROKER,
            "engine": views.engine_alive(rt.storage, rt.engine_running), "version": __version__,
            "cooldown_until": r.get("cooldown_until")}


@panel_data("pnl")
def _pnl(args: dict) -> dict:
    rt = _rt()
    r = views.risk(rt.storage, rt.gate)
    pnl, limit, peak = r["day_pnl"], r["max_loss"], r.get("peak_pnl") or Decimal(0)
    warn = warning_level(limit, rt.gate.limits.base, rt.gate.limits.threshold)
    day = rt.gate.clock.day(rt.gate.now()).isoformat()
    points = [(datetime.fromisoformat(p["at"]), dec(p["pnl"]))
              for p in rt.storage.rows("select at, pnl from pnl_points where day = ? order by id", (day,))]
    points.append((datetime.now(timezone.utc), pnl))  # the curve always ends at the PnL of this moment
    g = charts.gauge(pnl, limit, warn, peak)
    labels = charts.gauge_labels([("limit", f"limit {inr(limit)}", g.limit_x),
                                  ("warning", f"warning {inr(warn)}", g.warning_x if warn is not None else None),
                                  ("zero", "₹0", g.zero_x)])
    now_label = charts.gauge_labels([("now", f"now {inr(pnl, True)}", g.pnl_x)])[0]
    return {"risk": r, "gauge": g, "labels": labels, "now_label": now_label, "warning_level": warn,
            "chart": charts.line(points, limit), "width": charts.WIDTH, "height": charts.HEIGHT,
            "breach": _breach(r)}


def _breach(r: dict) -> Optional[str]:
    """What today's breach means now, in the panel's words; None when there was none."""
    if not r.get("breached"):
        return None
    at = datetime.fromisoformat(r["breached_at"]).astimezone(IST).strftime("%H:%M") if r.get("breached_at") else "—"
    now = {"halted": "trading halted", "reduce_only": "trading reduce-only: exits only"}.get(r["state"],
                                                                                          f"trading {r['state']}")
    if r.get("breach_overridden_by"):
        return f"Daily loss limit breached at {at} — overridden by {r['breach_overridden_by']}; {now}"
    return f"Daily loss limit breached at {at} — {now}"


@panel_data("positions")
def _positions(args: dict) -> dict:
    rows = views.positions(_rt().storage, include_flat=not args.get("open"))
    totals: dict[str, dict[str, Decimal]] = {}
    for p in rows:
        p["pnl"] = p["realized_pnl"] + p["unrealized_pnl"]
        for sums in (totals.setdefault(p["strategy"], _zero_sums()), totals.setdefault("", _zero_sums())):
            for k in sums:
                sums[k] += p[k]
    return {"positions": rows, "totals": {k: v for k, v in totals.items() if k}, "total": totals.get("", _zero_sums()),
            "day_pnl": views.day_pnl(_rt().storage) if args.get("open") else None,
            "believed": _believed_otherwise(rows)}


def _believed_otherwise(rows: list[dict]) -> list[dict]:
    """Where what a strategy's alerts add up to (what TradingView believes) is not what it holds: the belief a
    reducing ADJUST is cut to (alert_positions.py), shown where the trader looks."""
    held: dict[tuple, int] = {}
    for p in rows:
        key = (p["strategy"], p["exchange"], p["symbol"])
        held[key] = held.get(key, 0) + p["net_qty"]
    return [{**b, "held": held.get((b["strategy"], b["exchange"], b["symbol"]), 0)}
            for b in views.alerts_add_up_to(_rt().storage)
            if b["qty"] != held.get((b["strategy"], b["exchange"], b["symbol"]), 0)]


def _zero_sums() -> dict[str, Decimal]:
    return {"realized_pnl": Decimal(0), "unrealized_pnl": Decimal(0), "pnl": Decimal(0)}


@panel_data("orders")
def _orders(args: dict) -> dict:
    st, limit = _rt().storage, _limit(args)
    where = [(k, args[k]) for k in ("strategy", "status", "alert_id", "symbol") if args.get(k)]
    since = ("created_at", _today_start()) if args.get("today") else None
    rows, total = views.page(st, "orders", where, limit, (_page_number(args) - 1) * limit, since=since)
    ids = [r["id"] for r in rows]
    marks = ",".join("?" * len(ids))
    history: dict[str, list] = {i: [] for i in ids}
    fills: dict[str, list] = {i: [] for i in ids}
    if ids:
        for h in st.rows(f"select order_id, at, status, detail from order_history where order_id in ({marks}) "
                         "order by id", tuple(ids)):
            history[h["order_id"]].append(h)
        for f in st.rows(f"select order_id, fill_id, qty, price, at from fills where order_id in ({marks}) "
                         "order by at", tuple(ids)):
            fills[f["order_id"]].append(f)
    return {"orders": [views.order_record(r) for r in rows], "history": history, "fills": fills,
            "paging": _paging(args, total, limit), "compact": bool(args.get("compact")), "today": bool(since),
            "total": total}


@panel_data("alerts")
def _alerts(args: dict) -> dict:
    limit = _limit(args)
    where = [(k, args[k]) for k in ("strategy", "status") if args.get(k)]
    rows, total = views.page(_rt().storage, "alerts", where, limit, (_page_number(args) - 1) * limit)
    return {"alerts": [views.alert_record(r) for r in rows], "paging": _paging(args, total, limit)}


@panel_data("events")
def _events(args: dict) -> dict:
    limit, st = _limit(args, 20), _rt().storage
    access = ",".join("?" * len(ACCESS_EVENT_KINDS))
    hidden = 0
    if args.get("risk"):
        marks = ",".join("?" * len(RISK_EVENT_KINDS))
        rows = st.rows(f"select * from events where kind in ({marks}) order by id desc limit ?",
                       (*RISK_EVENT_KINDS, limit))
    elif args.get("logins"):
        rows = st.rows("select * from events order by id desc limit ?", (limit,))
    else:  # dashboard logins are their own category, left out of the latest events unless asked for
        rows = st.rows(f"select * from events where kind not in ({access}) order by id desc limit ?",
                       (*ACCESS_EVENT_KINDS, limit))
        oldest = rows[-1]["id"] if len(rows) == limit else 0  # among the span shown: the rowid range is cheap
        hidden = st.one(f"select count(*) n from events where kind in ({access}) and id > ?",
                        (*ACCESS_EVENT_KINDS, oldest))["n"]
    for e in rows:
        e["category"] = "login" if e["kind"] in ACCESS_EVENT_KINDS else None
    return {"events": rows, "heading": args.get("heading") or "Latest events", "hidden_logins": hidden,
            "logins": bool(args.get("logins")), "toggle": not args.get("risk")}


@panel_data("plugins")
def _plugins(args: dict) -> dict:
    kind = "notifier" if args.get("kind") == "notifier" else "strategy"
    return {"kind": kind, "plugins": views.plugin_records(_rt().storage, kind)}


@panel_data("risk")
def _risk(args: dict) -> dict:
    rt = _rt()
    r = views.risk(rt.storage, rt.gate)
    days = rt.storage.rows("select * from risk_days order by day desc limit 10")
    return {"risk": r, "limits": rt.gate.limits, "days": days,
            "warning_level": warning_level(r["max_loss"], rt.gate.limits.base, rt.gate.limits.threshold)}


@panel_data("broker")
def _broker(args: dict) -> dict:
    s = _rt().settings
    shown = [("API_TOKEN", s.API_TOKEN), ("WEBHOOK_SECRET", s.WEBHOOK_SECRET), ("DASHBOARD_PASSWORD", s.DASHBOARD_PASSWORD)]
    if not s.paper:
        shown += [("OAUTH_SECRET", s.OAUTH_SECRET), ("SHOONYA_ACCESS_TOKEN", s.SHOONYA_ACCESS_TOKEN)]
    shown.append(("TELEGRAM_BOT_TOKEN", s.TELEGRAM_BOT_TOKEN))
    return {"paper": s.paper, "session": None if s.paper else session_state(_rt().storage),
            "oauth": not s.paper and s.SHOONYA_AUTH == "oauth", "user_id": s.USER_ID, "api_url": s.SHOONYA_API_URL,
            "login_problem": broker_login.redirect_problem(s.SHOONYA_OAUTH_URL, request.host_url),
            "login_hint": broker_login.redirect_hint(s.SHOONYA_OAUTH_URL, request.host_url, s.PUBLIC_URL),
            "secrets": [(name, security.mask(value)) for name, value in shown], "backups": _backups(s)}


def _backups(s: Any) -> dict:
    """The newest database backup, and whether it is too old (none in more than 36 h)."""
    folder = backup.folder_of(s.data_dir)
    last = backup.newest(folder)
    age_h = (datetime.now(timezone.utc) - last.at).total_seconds() / 3600 if last else None
    return {"folder": folder, "last": last, "age_h": age_h, "stale": last is None or last.at <
            datetime.now(timezone.utc) - backup.STALE, "stale_h": backup.STALE.total_seconds() / 3600}


# ---- pages ----
def _page(template: str, title: str, **context: Any) -> str:
    return render_template(template, title=title, nav=NAV, panel=render_panel, args=request.args.to_dict(),
                           paper=_rt().settings.paper, **context)


@bp.get("/")
def overview() -> str:
    return _page("overview.html", "Overview", logins="1" if request.args.get("logins") else "")


@bp.get("/orders")
def orders() -> str:
    strategies = [r["strategy"] for r in _rt().storage.rows("select distinct strategy from orders order by 1")]
    return _page("orders.html", "Orders", statuses=ORDER_STATUSES, strategies=strategies)


@bp.get("/positions")
def positions() -> str:
    return _page("positions.html", "Positions")


@bp.get("/alerts")
def alerts() -> str:
    strategies = [r["strategy"] for r in _rt().storage.rows("select distinct strategy from alerts "
                                                            "where strategy is not null order by 1")]
    return _page("alerts.html", "Alerts", statuses=ALERT_STATUSES, strategies=strategies)


@bp.get("/strategies")
def strategies() -> str:
    return _page("strategies.html", "Strategies")


@bp.get("/risk")
def risk() -> str:
    return _page("risk.html", "Risk", modes=[m.value for m in TradingState])


@bp.get("/broker")
def broker() -> str:
    return _page("broker.html", "Broker", algo_id=_rt().settings.ALGO_ID)


# ---- controls ----
def _after(outcome: control.Outcome, done: str, back: str) -> Response:
    if outcome.ok:
        flash(done, "ok")
    else:
        flash(f"Not done: {outcome.error}", "error")
    return redirect(url_for(back))


@bp.post("/risk/state")
def set_state() -> Response:
    modes = [m.value for m in TradingState]
    mode = request.form.get("mode")
    if mode not in modes:
        flash(f"Not done: mode: expected {' | '.join(modes)}, found {mode!r}", "error")
        return redirect(url_for("dashboard.risk"))
    reason = (request.form.get("reason") or "").strip()[:200] or "set from the dashboard"
    override = request.form.get("override_breach") == "true"
    return _after(control.send("halt", {"mode": mode, "reason": reason, "by": "dashboard", "override_breach": override}),
                  f"Trading state set to {mode}.", "dashboard.risk")


@bp.route("/risk/exit-all", methods=["GET", "POST"])
def exit_all() -> Any:
    """Exit every position: a second, explicit step confirms it."""
    if request.method == "GET" or request.form.get("confirm") != "yes":
        open_positions = views.positions(_rt().storage, include_flat=False)
        return _page("confirm_exit.html", "Exit all", positions=open_positions)
    out = control.send("exit_all", {"by": "dashboard"})
    n = len(out.result.get("orders", [])) if out.ok else 0
    return _after(out, f"Exit all: {n} exit order{'s' if n != 1 else ''} sent, "
                       f"{out.result.get('cancelled', 0) if out.ok else 0} unsent orders cancelled.",
                  "dashboard.risk")


@bp.post("/strategies/<kind>/<name>/<any(enable, disable, reload):action>")
def plugin_control(kind: str, name: str, action: str) -> Response:
    if kind not in ("strategy", "notifier"):
        return _refused(404, f"kind: expected strategy or notifier, found {kind!r}")
    out = control.send("plugin", {"kind": kind, "name": name, "action": action, "by": "dashboard"})
    return _after(out, f"{kind.capitalize()} {name}: {action}d." if action != "reload" else
                  f"{kind.capitalize()} {name}: reloaded.", "dashboard.strategies")


def init_app(app: Any) -> None:
    app.register_blueprint(bp)
    app.extensions["panel_limiter"] = security.RefreshLimiter()
    app.jinja_env.globals["json_dumps"] = lambda v: json.dumps(v, default=str)
