"""Dashboard without a browser: login and lockout, sessions, CSRF, headers, formatting, charts, no secrets."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from conftest import SECRET, TOKEN, alert, make_settings, wait_for
from host.config import ConfigError
from host.web import charts, create_app, security
from host.display import group_indian, inr, ist, number, qty, tone

PASSWORD = "test-dashboard-pw"
PAGES = ("/", "/orders", "/positions", "/alerts", "/strategies", "/risk", "/broker", "/risk/exit-all")


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def login(client, password: str = PASSWORD):
    token = csrf_of(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"password": password, "csrf_token": token})


@pytest.fixture
def dash(host):
    assert login(host.client).status_code == 302
    return host


# ---- formatting ----
def test_indian_grouping_rupees_and_signs():
    assert group_indian(12345678) == "1,23,45,678" and group_indian(999) == "999" and group_indian(1000) == "1,000"
    assert inr(Decimal("1234567.5")) == "₹12,34,567.50"
    assert inr("-1234.005") == "−₹1,234.01"          # half up, real minus sign
    assert inr(Decimal("250"), signed=True) == "+₹250.00" and inr(0, signed=True) == "₹0.00"
    assert inr(Decimal("-0.001")) == "₹0.00"           # no "minus zero"
    assert inr(None) == "—" and inr("nan") == "—" and number("x") == "—"
    assert qty(-150000) == "−1,50,000"
    assert (tone("-1"), tone("0"), tone(Decimal("0.5")), tone(None)) == ("loss", "flat", "gain", "flat")


def test_times_are_shown_in_asia_kolkata():
    assert ist("2026-11-24T04:00:00.000+00:00") == "09:30:00"
    assert ist("2026-11-24T20:00:00+00:00", with_date=True) == "25 Nov 01:30:00"
    assert ist(None) == "—"


# ---- charts ----
def test_gauge_places_pnl_zero_and_warning_between_limit_and_peak():
    g = charts.gauge(Decimal("-1000"), Decimal("-5000"), Decimal("-4000"), Decimal("0"))
    # scale: -5000 .. 1250 (a quarter of the limit above zero)
    assert (g.lo, g.hi) == (Decimal("-5000"), Decimal("1250"))
    assert g.zero_x == 80.0 and g.pnl_x == 64.0 and g.warning_x == 16.0
    beyond = charts.gauge(Decimal("-6000"), Decimal("-5000"), Decimal("-4000"), Decimal("0"))
    assert beyond.pnl_x == 0.0 and beyond.lo == Decimal("-6000")


def test_pnl_line_follows_the_points_and_changes_with_the_last_one():
    t0 = datetime(2026, 11, 24, 4, 0, tzinfo=timezone.utc)
    pts = [(t0, Decimal(0)), (t0 + timedelta(minutes=1), Decimal(100)), (t0 + timedelta(minutes=2), Decimal(-100))]
    a = charts.line(pts)
    assert a.path.startswith("M0.0,") and a.path.count("H") == 2 and a.last_x == charts.WIDTH
    b = charts.line(pts[:-1] + [(pts[-1][0], Decimal(-50))])
    assert a.path != b.path
    assert (a.last_y - a.zero_y) / charts.HEIGHT > (b.last_y - b.zero_y) / charts.HEIGHT > 0  # deeper is lower
    assert charts.line([]).path == ""


# ---- login, lockout, sessions ----
def test_pages_need_a_login_and_the_panel_feed_says_401(host):
    for path in PAGES:
        r = host.client.get(path)
        assert r.status_code == 302 and "/login?next=" in r.headers["Location"], path
    assert host.client.get("/panel/orders").status_code == 401


def test_session_cookie_flags_and_expiry(host_factory, monkeypatch):
    h = host_factory(DASHBOARD_SESSION_HOURS=1, DASHBOARD_COOKIE_SECURE="true")
    r = login(h.client)
    cookie = [c for c in r.headers.getlist("Set-Cookie") if c.startswith("strategy_host_session=")][-1]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" in cookie and "Expires=" in cookie
    assert h.client.get("/").status_code == 200
    later = security.time.time() + 3601
    monkeypatch.setattr(security.time, "time", lambda: later)
    assert h.client.get("/").status_code == 302  # an hour later the signed session is refused


def test_next_is_never_an_open_redirect(host):
    token = csrf_of(host.client.get("/login").get_data(as_text=True))
    r = host.client.post("/login?next=//evil.example/x", data={"password": PASSWORD, "csrf_token": token})
    assert r.headers["Location"] == "/"


# ---- CSRF ----
def test_every_dashboard_post_needs_the_csrf_token(dash):
    for path, data in (("/risk/state", {"mode": "halted"}), ("/risk/exit-all", {"confirm": "yes"}),
                       ("/strategies/strategy/passthrough/disable", {}), ("/logout", {})):
        r = dash.client.post(path, data=data)
        assert r.status_code == 403 and "CSRF token" in r.get_data(as_text=True), path
    assert dash.api("/api/risk").get_json()["state"] == "active"


def test_api_with_a_session_needs_the_csrf_header_and_a_same_origin(dash):
    token = csrf_of(dash.client.get("/risk").get_data(as_text=True))
    assert dash.client.get("/api/status").status_code == 200  # reading needs only the session
    r = dash.client.post("/api/halt", json={"mode": "halted"})
    assert r.status_code == 403 and "X-CSRF-Token" in r.get_json()["error"]
    r = dash.client.post("/api/halt", json={"mode": "halted"}, headers={"X-CSRF-Token": token,
                                                                       "Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-site" in r.get_json()["error"]
    assert dash.api("/api/risk").get_json()["state"] == "active"
    r = dash.client.post("/api/halt", json={"mode": "halted"}, headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and dash.api("/api/risk").get_json()["state_by"] == "dashboard"


def test_login_form_itself_needs_its_token(host):
    r = host.client.post("/login", data={"password": PASSWORD})
    assert r.status_code == 403 and host.client.get("/").status_code == 302


# ---- controls ----
def test_halt_resume_and_exit_all_from_the_risk_page(dash):
    token = csrf_of(dash.client.get("/risk").get_data(as_text=True))
    r = dash.client.post("/risk/state", data={"mode": "halted", "reason": "lunch", "csrf_token": token},
                         follow_redirects=True)
    assert "Trading state set to halted" in r.get_data(as_text=True)
    assert dash.post(alert()).status_code == 423
    assert dash.api("/api/risk").get_json()["state_reason"] == "lunch"
    r = dash.client.post("/risk/state", data={"mode": "sideways", "csrf_token": token}, follow_redirects=True)
    assert "mode: expected active | reduce_only | halted, found &#39;sideways&#39;" in r.get_data(as_text=True)
    dash.client.post("/risk/state", data={"mode": "active", "csrf_token": token})
    assert dash.post(alert()).status_code == 200
    dash.settle()
    page = dash.client.get("/risk/exit-all").get_data(as_text=True)
    assert "Exit all positions?" in page and "NIFTY" in page and dash.net() == -75  # asking changes nothing
    r = dash.client.post("/risk/exit-all", data={"confirm": "yes", "csrf_token": token}, follow_redirects=True)
    assert "Exit all: 1 exit order sent" in r.get_data(as_text=True)
    dash.settle()
    assert dash.net() == 0


# ---- pages ----
def test_the_risk_page_says_what_halt_does_and_a_halt_lets_exits_through(dash):
    assert dash.post(alert()).status_code == 200
    dash.settle()
    assert dash.net() == -75
    token = csrf_of(dash.client.get("/risk").get_data(as_text=True))
    dash.client.post("/risk/state", data={"mode": "halted", "csrf_token": token})
    page = dash.client.get("/risk").get_data(as_text=True)
    assert "exits included" not in page and "still let exits and reductions through" in page
    assert dash.post(alert(strategy="s2")).status_code == 423  # an entry is refused
    r = dash.post(alert("EXIT", direction="BUY", order_type="MKT", price="0"))
    assert r.status_code == 200 and r.get_json()["orders"], r.get_json()  # what the page says: exits go through
    dash.settle()
    assert dash.net() == 0


def test_the_header_says_paper_and_calls_the_refresh_updating_not_live(dash):
    html = dash.client.get("/").get_data(as_text=True)
    header = html.split("<header", 1)[1].split("</header>", 1)[0]
    assert re.search(r'class="mode mode-paper"[^>]*>paper</strong>', header), header
    assert re.search(r'id="live-status"[^>]*>updating</span>', header) and ">live<" not in header
    js = (Path(__file__).resolve().parent.parent / "host/web/static/live.js").read_text()
    assert '"live · "' not in js and '"updated "' in js


def test_an_order_the_host_cancelled_shows_the_host_s_reason_and_keeps_the_broker_s_in_its_history(host):
    host.tick("30")  # a SELL at 42.5 rests
    r = host.post(alert())
    assert r.status_code == 200, r.get_json()
    oid = r.get_json()["orders"][0]["id"]
    wait_for(lambda: host.api(f"/api/orders/{oid}").get_json()["status"] == "OPEN")
    assert host.api("/api/exit-all", method="POST", json={}).status_code == 200
    order = wait_for(lambda: (o := host.api(f"/api/orders/{oid}").get_json())["status"] == "CANCELLED" and o)
    assert order["reason"].startswith("cancelled by the host: exit-all"), order["reason"]
    assert "cancelled by user" in [h["detail"] for h in order["history"]]  # the broker's words, kept
    login(host.client)
    page = host.client.get("/orders").get_data(as_text=True)
    assert '<small class="reason">cancelled by the host: exit-all' in page
    assert '<small class="reason">cancelled by user' not in page  # only in the order's history
    [event] = [e for e in host.api("/api/events").get_json()["items"] if oid in e["message"] and "cancelled" in e["message"]]
    assert "cancelled by the host: exit-all" in event["message"]


def test_every_page_renders_with_headers_and_no_secret(dash):
    dash.post(alert())
    dash.settle()
    for path in PAGES:
        r = dash.client.get(path)
        html = r.get_data(as_text=True)
        assert r.status_code == 200, path
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
        assert "<script>" not in html and " style=" not in html and " on" + "click=" not in html
        for secret in (SECRET, TOKEN, PASSWORD):
            assert secret not in html, (path, secret)
    broker = dash.client.get("/broker").get_data(as_text=True)
    assert "API_TOKEN" in broker and "••••••••" in broker
    assert dash.client.get("/healthz").headers["X-Frame-Options"] == "DENY"


def test_panels_filter_and_paginate(dash):
    for i in range(3):
        dash.post(alert(strategy=f"p{i}"))
    dash.settle()
    html = dash.client.get("/panel/orders?strategy=p1").get_data(as_text=True)
    assert html.count('data-order="') == 1 and ">p1<" in html
    html = dash.client.get("/panel/orders?limit=2").get_data(as_text=True)
    assert html.count('data-order="') == 2 and "page 1 of 2" in html and 'rel="next"' in html
    html = dash.client.get("/panel/orders?limit=2&page=2").get_data(as_text=True)
    assert html.count('data-order="') == 1 and 'rel="prev"' in html
    assert dash.client.get("/panel/nothing").status_code == 404


def test_a_runaway_client_is_slowed_but_an_open_page_is_not(dash, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(security.time, "monotonic", lambda: clock[0])
    limiter = security.RefreshLimiter(rate_per_s=20, burst=40)
    assert all(limiter.allow("s") for _ in range(40)) and not limiter.allow("s")  # a burst of 40, then none
    assert limiter.allow("other")  # each session has its own bucket
    clock[0] += 0.5
    assert sum(limiter.allow("s") for _ in range(20)) == 10  # 20 a second come back
    clock[0] += 1.0
    assert sum(limiter.allow("s") for _ in range(5)) == 5  # an open page (~3 a second) is never slowed
    dash.app.extensions["panel_limiter"] = security.RefreshLimiter(rate_per_s=1, burst=2)
    codes = [dash.client.get("/panel/events").status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def test_alert_decision_trail_names_the_reason(dash):
    dash.post(alert(strategy="trail"))
    dash.settle()
    dash.post(alert(strategy="trail"))  # the same body again: a duplicate
    dash.post(alert(strategy="trail", price="43"))  # another ENTRY on an open position: blocked by the guard
    dash.post(alert(strategy="trail", qty="x"))
    html = dash.client.get("/panel/alerts?strategy=trail").get_data(as_text=True)
    for decision in ("accepted", "duplicate", "blocked", "rejected"):
        assert f"badge-{decision}" in html, decision
    assert "legs[0].qty" in html and "1 order made" in html and "duplicate ENTRY" in html


def test_flask_debug_is_refused_off_loopback(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASK_DEBUG", "1")
    with pytest.raises(ConfigError) as e:
        create_app(make_settings(tmp_path / "var", HOST="0.0.0.0"))
    assert "HOST: expected a loopback address" in str(e.value) and "found 0.0.0.0" in str(e.value)
    app = create_app(make_settings(tmp_path / "var2", HOST="127.0.0.1"))
    with pytest.raises(ConfigError):
        app.run(host="0.0.0.0")


def test_pnl_points_are_stored_as_the_pnl_moves(host):
    host.post(alert())
    host.settle()
    host.tick("40")
    wait_for(lambda: host.runtime.storage.rows("select pnl from pnl_points where pnl != '0'"), timeout=10)
    html = host.client.get("/panel/pnl")
    assert html.status_code == 401  # the panel feed needs the session like the pages


def test_the_broker_page_says_what_the_static_ip_rule_needs(host_factory):
    h = host_factory(ALGO_ID="ALGO-42")
    login(h.client)
    page = h.client.get("/broker").get_data(as_text=True)
    assert "static IP registered for your account" in page and "ALGO-42" in page


# ---- issue 16: numbers a trader can read at a glance, status that tells the truth ----
def test_money_in_reasons_and_events_reads_as_rupees_but_counts_and_times_do_not():
    from host.display import money_text
    assert money_text("daily max loss breached: PnL -123456.5 <= limit -100000; trading halted") == \
        "daily max loss breached: PnL −₹1,23,456.50 <= limit −₹1,00,000.00; trading halted"
    assert money_text("SELL 75 NFO:X @ 42.5 manual") == "SELL 75 NFO:X @ ₹42.50 manual"
    assert money_text("SL-LMT trigger 95 limit 94.5 being placed") == "SL-LMT trigger ₹95.00 limit ₹94.50 being placed"
    assert money_text("trailing stop of X moved from 95.5 to 97.25") == "trailing stop of X moved from ₹95.50 to ₹97.25"
    for untouched in ("NFO:X: from +75 to flat", "already at target +75", "square-off at 15:15: exits",
                      "expected a price from 0.01 to 10,000,000", "limit 20 orders", "retry in 5 s", None):
        assert money_text(untouched) == (untouched or "")


def test_on_a_page_an_amount_never_wraps_away_from_its_minus_sign_and_text_is_escaped():
    from host.web.format import money_html
    html = str(money_html("PnL -5000 <= limit -5000 <b>"))
    assert html == ('PnL <span class="money">−₹5,000.00</span> &lt;= limit <span class="money">−₹5,000.00</span> '
                    '&lt;b&gt;')
    css = (Path(__file__).resolve().parent.parent / "host/web/static/dashboard.css").read_text()
    assert re.search(r"\.money \{[^}]*white-space: nowrap", css) and re.search(r"\.net-qty small \{[^}]*nowrap", css)


def test_a_closed_position_shows_no_average_price(dash):
    assert dash.post(alert()).status_code == 200
    dash.settle()
    assert dash.post(alert("EXIT", direction="BUY", order_type="MKT", price="0")).status_code == 200
    dash.settle()
    assert dash.net() == 0
    html = dash.client.get("/positions").get_data(as_text=True)
    assert '<td class="num" data-label="Avg">—</td>' in html and "Avg\">₹0.00" not in html


def test_order_prices_name_the_trigger_of_stop_orders():
    from host.display import order_price
    assert order_price({"order_type": "SL-LMT", "price": "94.5", "trigger_price": "95"}) == "trigger ₹95.00 · limit ₹94.50"
    assert order_price({"order_type": "SL-MKT", "price": None, "trigger_price": "1234.5"}) == "trigger ₹1,234.50 · MKT"
    assert order_price({"order_type": "LMT", "price": "42.5", "trigger_price": None}) == "₹42.50"
    assert order_price({"order_type": "MKT", "price": "0", "trigger_price": "0"}) == "MKT"


def test_gauge_labels_never_overlap_and_stay_inside():
    marks = [("limit", "limit −₹5,000.00", 0.0), ("warning", "warning −₹4,000.00", 16.0), ("zero", "₹0", 80.0)]
    labels = charts.gauge_labels(marks)
    assert [(lb.name, lb.anchor) for lb in labels] == [("limit", "start"), ("warning", "start"), ("zero", "middle")]
    assert labels[0].row != labels[1].row  # 16 % apart is too close for two long labels on a phone
    assert labels[2].row == 0
    right = charts.gauge_labels([("now", "now +₹12,000.00", 99.0)])[0]
    assert right.anchor == "end"


def test_the_day_chart_scale_includes_the_limit_line():
    t0 = datetime(2026, 11, 24, 4, 0, tzinfo=timezone.utc)
    c = charts.line([(t0, Decimal(0)), (t0 + timedelta(minutes=1), Decimal(100))], Decimal(-5000))
    assert c.limit_y is not None and c.zero_y < c.limit_y <= charts.HEIGHT  # below zero, inside the picture
    assert charts.line([], Decimal(-5000)).limit_y is not None


def test_pnl_panel_labels_zero_warning_limit_and_now(dash):
    html = dash.client.get("/panel/pnl").get_data(as_text=True)
    for name, text in (("limit", "limit −₹5,000.00"), ("warning", "warning −₹4,000.00"), ("zero", "₹0"),
                       ("now", "now ₹0.00")):
        assert re.search(rf'class="label label-{name}[^"]*"[^>]*>{text}</text>', html), name
    assert 'id="pnl-chart-limit"' in html


@pytest.mark.parametrize("step,trails", [("0", False), ("100", True)])
def test_trailing_wording_shows_only_when_the_limit_trails(host_factory, step, trails):
    h = host_factory(RISK_TRAIL_STEP=step)
    login(h.client)
    pnl = h.client.get("/panel/pnl").get_data(as_text=True)
    limits = h.client.get("/panel/risk").get_data(as_text=True)
    assert ("trails up with the peak" in pnl) is trails and ("the limit is fixed" in pnl) is not trails
    assert ("Current limit (trailing)" in limits) is trails and ("Current limit</th>" in limits) is not trails


def test_after_a_breach_the_panel_says_breached_at_and_halted(host_factory):
    h = host_factory(RISK_BASE_MAX_LOSS="-1000", RISK_TRAIL_STEP="0")
    h.runtime.engine.risk_poll_s = 0.05
    login(h.client)
    h.tick("100")
    assert h.post(alert(direction="BUY", qty=100, price="100")).status_code == 200
    h.settle()
    h.tick("89.9")  # -1010 <= -1000
    wait_for(lambda: h.api("/api/risk").get_json()["breached"] and h.api("/api/risk").get_json()["state"] == "halted")
    html = h.client.get("/panel/pnl").get_data(as_text=True)
    m = re.search(r"Daily loss limit breached at (\d\d:\d\d) — trading halted", html)
    assert m, html
    assert m.group(1) == ist(h.api("/api/risk").get_json()["breached_at"])[:5]
    assert "near the limit" not in html
    assert h.api("/api/halt", "POST", json={"mode": "reduce_only"}).status_code == 200
    html = h.client.get("/panel/pnl").get_data(as_text=True)  # the words follow the state: never a stale "halted"
    assert f"breached at {m.group(1)} — trading reduce-only: exits only" in html
    events = h.client.get("/panel/events?risk=1").get_data(as_text=True)
    assert 'PnL <span class="money">−₹1,010.00</span> &lt;= limit <span class="money">−₹1,000.00</span>' in events  # ₹ in the event, the stored text unchanged
    assert any("PnL -1010" in e["message"] for e in h.api("/api/events").get_json()["items"])


def test_positions_subtotals_sit_under_their_columns_and_the_overview_total_says_what_it_covers(dash):
    dash.post(alert(strategy="a"))
    dash.settle()
    dash.tick("40")
    html = dash.client.get("/panel/positions?open=1").get_data(as_text=True)
    head = re.findall(r"<th[^>]*>([^<]+)</th>", html.split("<tbody>")[0])
    foot = html.split("<tfoot>")[1]
    row = re.search(r'<tr class="subtotal grand"[^>]*>(.*?)</tr>', foot, re.S).group(1)
    span = int(re.search(r'colspan="(\d+)"', row).group(1))
    cells = re.findall(r'<td class="num[^"]*" data-label="([^"]+)">([^<]+)</td>', row)
    assert [head[span + i] for i in range(3)] == [label for label, _ in cells] == ["Realised", "Unrealised", "PnL"]
    assert cells[2][1] == "+₹187.50"  # a short 75 from 42.50 to 40
    assert "Total of these 1 open position" in row
    assert "Day PnL +₹187.50 also counts positions closed today" in html


def test_overview_says_how_many_of_todays_orders_it_lists(dash):
    for i in range(12):
        dash.post(alert(strategy=f"n{i}"))
    dash.settle()
    html = dash.client.get("/").get_data(as_text=True)
    assert "10 of 12 orders today" in html and 'href="/orders?today=1"' in html
    today = dash.client.get("/orders?today=1").get_data(as_text=True)
    assert today.count('data-order="') == 12 and "Today's orders" in today


def test_net_quantity_has_its_own_colours(dash):
    dash.post(alert())
    dash.settle()
    html = dash.client.get("/panel/positions").get_data(as_text=True)
    cell = re.search(r'<td class="num net-qty ([^"]+)"', html).group(1)
    assert cell == "qty-short" and "gain" not in cell and "loss" not in cell
    css = dash.client.get("/static/dashboard.css").get_data(as_text=True)
    colour = lambda name: re.search(rf"--{name}: (#[0-9a-f]+)", css).group(1)  # noqa: E731
    assert {colour("long"), colour("short")}.isdisjoint({colour("gain"), colour("loss")})


def test_dashboard_logins_are_their_own_category_left_out_of_latest_events(dash):
    html = dash.client.get("/panel/events?limit=15").get_data(as_text=True)
    assert 'data-kind="login"' not in html and "1 dashboard login event not shown" in html
    html = dash.client.get("/panel/events?limit=15&logins=1").get_data(as_text=True)
    assert 'data-kind="login"' in html and '<span class="category">login</span>' in html


def test_an_idle_notifier_says_idle_and_why_in_the_api_and_on_the_page(host_factory, tmp_path):
    import shutil
    from pathlib import Path
    plugins = tmp_path / "plugins" / "notifiers"
    plugins.mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parent.parent / "plugins" / "notifiers" / "telegram.py", plugins)
    h = host_factory(PLUGINS_DIR=str(tmp_path / "plugins"))
    login(h.client)
    item = wait_for(lambda: next((n for n in h.api("/api/notifiers").get_json()["items"]
                                  if n["name"] == "telegram" and n["status"] != "stopped"), None))
    assert item["status"] == "idle" and "TELEGRAM_BOT_TOKEN" in item["reason"] and item["error"] is None
    html = h.client.get("/panel/plugins?kind=notifier").get_data(as_text=True)
    assert "badge-idle" in html and "badge-running" not in html and "TELEGRAM_BOT_TOKEN" in html
