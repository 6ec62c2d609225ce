"""The dashboard in real headless Chromium (Playwright), against a real `strategy-host run` under gunicorn."""
from __future__ import annotations

import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from conftest import wait_for
from serverproc import ServerProcess

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"
REPO = Path(__file__).resolve().parent.parent
LOCKOUT_S = 60
PAGES = {"overview": "/", "orders": "/orders", "positions": "/positions", "alerts": "/alerts",
         "strategies": "/strategies", "risk": "/risk", "broker": "/broker"}


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: install Debian's chromium (.ci/run does: apt-get install chromium)"
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("dashboard")
    shutil.copytree(REPO / "plugins", work / "plugins")
    s = ServerProcess(work, env={"DASHBOARD_LOGIN_ATTEMPTS": "3", "DASHBOARD_LOCKOUT_S": str(LOCKOUT_S),
                                 "SQUARE_OFF_TIME": "off", "PLUGINS_DIR": str(work / "plugins")}).start()
    yield s
    s.stop()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(10_000)
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.console_errors = errors
    yield pg
    context.close()


def shot(pg, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


def log_in(pg, server) -> None:
    pg.goto(server.url + "/")
    pg.fill("#password", server.secrets()["DASHBOARD_PASSWORD"])
    pg.click("form button[type=submit]")
    pg.wait_for_selector("nav a[aria-current=page]")


def alert(server, symbol="NIFTY28APR26C24500", strategy="ui", execution="ENTRY", price="42.5", side="SELL"):
    body = {"secret_key": server.secrets()["WEBHOOK_SECRET"], "execution_type": execution, "strategy_name": strategy,
            "exchange": "NFO", "legs": [{"tradingsymbol": symbol, "direction": side, "qty": "75",
                                         "order_type": "LMT", "price": price, "product_type": "M"}]}
    return requests.post(server.url + "/webhook", json=body, timeout=10)


def test_wrong_passwords_slow_logins_down_then_the_owner_gets_in(page, server):
    page.goto(server.url + "/orders")
    assert "/login?next=/orders" in page.url
    shot(page, "login")
    for expected in ("2 attempts left", "1 attempt left", "possible in 1 s"):
        page.fill("#password", "wrong-password")
        page.click("form button[type=submit]")
        assert expected in page.inner_text("#login-error")
    time.sleep(1.1)
    page.fill("#password", "wrong-password")
    page.click("form button[type=submit]")
    assert "possible in 2 s" in page.inner_text("#login-error")  # 1, 2, 4 ... s, from any address
    page.fill("#password", server.secrets()["DASHBOARD_PASSWORD"])  # right, but too soon: not even checked
    page.click("form button[type=submit]")
    assert "Try again in" in page.inner_text("#login-error")
    shot(page, "login-slowed")
    time.sleep(2.5)
    page.fill("#password", server.secrets()["DASHBOARD_PASSWORD"])
    page.click("form button[type=submit]")
    page.wait_for_selector("h1:text('Orders')")
    assert page.url.endswith("/orders")  # back where the login began


def test_log_out_everywhere_ends_this_and_every_other_session(browser, page, server):
    log_in(page, server)
    other = browser.new_context()
    try:
        other_page = other.new_page()
        log_in(other_page, server)
        page.click("#account summary")  # the header's Account menu holds both log-out buttons
        page.click("text=Log out everywhere")
        page.wait_for_selector("#password")
        assert "sessions ended" in page.inner_text("main")
        other_page.goto(server.url + "/risk")
        assert "/login?next=/risk" in other_page.url  # the other browser is logged out too
    finally:
        other.close()


def test_alert_order_and_position_appear_without_reload(page, server):
    log_in(page, server)
    page.evaluate("window.__same_page = true")
    r = alert(server, symbol="NIFTY28APR26P24000")
    assert r.status_code == 200, r.text
    oid = r.json()["orders"][0]["id"]
    page.wait_for_selector(f"tr[data-order='{oid}'] .badge-filled")
    page.wait_for_selector("#positions-table tr[data-symbol='NIFTY28APR26P24000']")
    assert "−75" in page.inner_text("#positions-table tr[data-symbol='NIFTY28APR26P24000']")
    assert page.evaluate("window.__same_page") is True  # no reload happened
    shot(page, "overview-live")
    assert page.console_errors == []  # CSP violations show up here


def test_paper_price_moves_the_pnl_chart(page, server):
    r = alert(server, symbol="NIFTY28APR26C25000", strategy="chart", price="50")
    assert r.status_code == 200, r.text
    # the alert's 200 means decided, not filled: the price moves once the short is on the books
    wait_for(lambda: any(p["strategy"] == "chart" and p["net_qty"] == -75
                         for p in server.api("/api/positions").json()["items"]), timeout=10)
    log_in(page, server)
    before_path = page.get_attribute("#pnl-curve", "d")
    before_pnl = page.inner_text("#day-pnl")
    ticks = requests.post(server.url + "/api/paper/ticks", timeout=10,
                          headers={"Authorization": f"Bearer {server.secrets()['API_TOKEN']}"},
                          json=[{"exchange": "NFO", "symbol": "NIFTY28APR26C25000", "ltp": "30"}])
    assert ticks.status_code == 200, ticks.text
    page.wait_for_function("([p, d]) => document.querySelector('#day-pnl').innerText !== p && "
                           "document.querySelector('#pnl-curve').getAttribute('d') !== d", arg=[before_pnl, before_path])
    # a short position of 75 gains (50 - 30) x 75 = 1,500 on this symbol
    assert page.inner_text("#day-pnl").startswith("+₹")
    shot(page, "overview-pnl")


def test_halt_from_the_risk_page_refuses_the_next_alert_then_resume(page, server):
    log_in(page, server)
    page.goto(server.url + "/risk")
    page.fill("#reason", "browser test")
    page.click("button[value=halted]")
    page.wait_for_selector(".flash-ok:text('Trading state set to halted')")
    page.wait_for_selector("#trading-state .badge-halted")
    shot(page, "risk-halted")
    r = alert(server, strategy="after-halt")
    assert r.status_code == 423, r.text
    page.click("button[value=active]")
    page.wait_for_selector("#trading-state .badge-active")
    assert alert(server, strategy="after-halt").status_code == 200


def test_exit_all_asks_first(page, server):
    log_in(page, server)
    page.goto(server.url + "/risk")
    page.click("a:text('Exit all positions')")
    page.wait_for_selector("h1:text('Exit all positions?')")
    shot(page, "exit-all-confirm")
    page.click("a:text('No, go back')")
    assert page.url.endswith("/risk")
    assert any(p["net_qty"] for p in server.api("/api/positions").json()["items"])  # nothing was exited


def test_disable_a_strategy(page, server):
    log_in(page, server)
    page.goto(server.url + "/strategies")
    page.click("button[aria-label='disable passthrough']")
    page.wait_for_selector("#strategy-passthrough .badge-disabled")
    shot(page, "strategies-disabled")
    r = alert(server, strategy="passthrough")
    assert r.json()["status"] == "refused" and "disabled" in r.json()["reason"], r.text
    page.click("button[aria-label='enable passthrough']")
    page.wait_for_selector("#strategy-passthrough .badge-running")


class _Attacker(BaseHTTPRequestHandler):
    """A page on another origin that posts to the dashboard with the victim's cookie, but no CSRF token."""

    target = ""

    def do_GET(self):  # noqa: N802
        body = (f'<html><body><form id="f" method="post" action="{self.target}/risk/state">'
                '<input name="mode" value="halted"></form><p id="out"></p><script>'
                f'fetch("{self.target}/api/halt", {{method: "POST", credentials: "include", '
                'headers: {"Content-Type": "text/plain"}, body: JSON.stringify({mode: "halted"})})'
                '.then(r => { document.getElementById("out").textContent = "api " + r.status; })'
                '.catch(e => { document.getElementById("out").textContent = "api blocked"; })'
                '.finally(() => document.getElementById("f").submit());</script></body></html>').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_cross_site_post_without_csrf_token_is_refused(page, server):
    log_in(page, server)
    _Attacker.target = server.url
    evil = ThreadingHTTPServer(("127.0.0.1", 0), _Attacker)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        with page.expect_navigation(url=server.url + "/risk/state") as nav:
            page.goto(f"http://127.0.0.1:{evil.server_address[1]}/")
        assert nav.value.status == 403
        # the browser sent the session cookie (same site, other port) and its Origin: refused by the Origin check;
        # a request without an Origin header meets the CSRF token check (test_dashboard.py)
        assert "cross-site request refused" in page.inner_text("main")
        shot(page, "csrf-refused")
    finally:
        evil.shutdown()
        evil.server_close()
    assert server.api("/api/risk").json()["state"] == "active"  # neither the form nor the fetch changed it
    halts = [e for e in server.api("/api/events").json()["items"] if e["kind"] == "trading_state"
             and "halted" in e["message"] and "browser test" not in e["message"]]
    assert halts == []


@pytest.mark.parametrize("viewport", [{"width": 1280, "height": 900}, {"width": 390, "height": 844}],
                         ids=["desktop", "phone"])
def test_every_page_in_the_browser(browser, server, viewport):
    context = browser.new_context(viewport=viewport)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    log_in(pg, server)
    secrets = server.secrets()
    for name, path in PAGES.items():
        pg.goto(server.url + path)
        pg.wait_for_selector("main .panel")
        html = pg.content()
        assert all(secrets[k] not in html for k in ("API_TOKEN", "WEBHOOK_SECRET", "DASHBOARD_PASSWORD")), name
        if viewport["width"] < 500:  # nothing but the tables' own scroll boxes is wider than a phone
            assert pg.evaluate("document.documentElement.scrollWidth") <= viewport["width"], name
        shot(pg, f"{name}-{'phone' if viewport['width'] < 500 else 'desktop'}")
    pg.wait_for_selector("#live-status:text('updated ')")  # the panels refreshed at least once
    assert errors == []
    context.close()


# ---- issue 16: a phone (390 px) and a desktop (1366 px) see what matters, nothing sideways ----
PHONE, TABLET, DESKTOP = {"width": 390, "height": 844}, {"width": 800, "height": 1000}, {"width": 1366, "height": 900}
OVERFLOW_JS = """() => {
  const w = window.innerWidth, out = [];
  if (document.documentElement.scrollWidth > w) out.push('page scrolls sideways: ' + document.documentElement.scrollWidth);
  for (const el of document.body.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.height === 0) continue;
    if (r.width > w + 0.5 || r.right > w + 0.5 || r.left < -0.5)
      out.push(el.tagName + (el.id ? '#' + el.id : '') + '.' + el.className + ' ' + Math.round(r.left) + '..' + Math.round(r.right));
  }
  return out.slice(0, 10);
}"""


def busy_day(server) -> dict:
    """What a trader's morning leaves: a protected entry (its SL order rests), a rejected order, an invalid alert."""
    if getattr(server, "busy_day", None):
        return server.busy_day  # once per server: the guard would block the same entries again
    protected = alert(server, symbol="NIFTY28APR26C26000", strategy="guarded", side="BUY", price="42.5")
    assert protected.status_code == 200, protected.text
    body = {"secret_key": server.secrets()["WEBHOOK_SECRET"], "execution_type": "ENTRY", "strategy_name": "guarded",
            "exchange": "NFO", "legs": [{"tradingsymbol": "NIFTY28APR26C26100", "direction": "BUY", "qty": "75",
                                         "order_type": "LMT", "price": "42.5", "product_type": "M", "stop_loss": "40"}]}
    stop = requests.post(server.url + "/webhook", json=body, timeout=10)
    assert stop.status_code == 200, stop.text
    body["legs"] = [{"tradingsymbol": "NIFTY28APR26C26200", "direction": "BUY", "qty": "75", "order_type": "MKT",
                     "product_type": "M"}]
    unpriced = requests.post(server.url + "/webhook", json=body, timeout=10)  # no price yet: the broker rejects it
    assert unpriced.status_code in (200, 502), unpriced.text
    bad = alert(server, strategy="typo", price="forty")
    assert bad.status_code == 422, bad.text
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        orders = server.api("/api/orders?limit=200").json()["items"]
        sl = [o for o in orders if o["order_type"] == "SL-LMT" and o["status"] in ("OPEN", "SUBMITTED")]
        if sl:
            server.busy_day = {"stop": sl[0]}
            return server.busy_day
        time.sleep(0.1)
    raise AssertionError(f"no resting stop order: {orders}")


def no_overflow(pg, name: str) -> None:
    problems = pg.evaluate(OVERFLOW_JS)
    assert problems == [], f"{name}: {problems}"


def visible_in_view(pg, selector: str, name: str) -> str:
    """The element is shown, inside the viewport's width; its text is returned."""
    el = pg.locator(selector).first
    assert el.is_visible(), f"{name}: {selector} is not visible"
    box, width = el.bounding_box(), pg.viewport_size["width"]
    assert box["x"] >= 0 and box["x"] + box["width"] <= width + 0.5, f"{name}: {selector} at {box}"
    return el.inner_text()


@pytest.mark.parametrize("viewport", [PHONE, TABLET, DESKTOP], ids=["phone-390", "tablet-800", "desktop-1366"])
def test_each_page_shows_what_matters_without_sideways_scrolling(browser, server, viewport):
    stop = busy_day(server)["stop"]
    context = browser.new_context(viewport=viewport)
    pg = context.new_page()
    pg.set_default_timeout(10_000)
    tag = f"{'phone' if viewport is PHONE else 'desktop'}-{viewport['width']}"
    try:
        log_in(pg, server)
        for name, path in {**PAGES, "exit-all": "/risk/exit-all"}.items():
            pg.goto(server.url + path)
            pg.wait_for_selector("main .panel")
            header = pg.locator("header.top").bounding_box()
            assert header["height"] <= 80, f"{name}: the header takes {header['height']} px"
            no_overflow(pg, name)
            shot(pg, f"{name}-{tag}")
        pg.goto(server.url + "/orders")
        row = f"tr[data-order='{stop['id']}']"
        assert "trigger ₹40.00" in visible_in_view(pg, f"{row} .price", "orders")
        assert visible_in_view(pg, f"{row} .badge", "orders") == "OPEN"
        assert visible_in_view(pg, f"{row} .filled", "orders") == "0 / 75"
        visible_in_view(pg, f"{row} .avg", "orders")
        rejected = pg.locator("#orders-table tbody tr:has(.badge-rejected)").first
        assert "no price" in visible_in_view(pg, f"#{rejected.get_attribute('id')} .reason", "orders")
        pg.goto(server.url + "/alerts")
        assert visible_in_view(pg, "#alerts-table tr:has(.badge-rejected) .decision", "alerts") == "rejected"
        assert "legs[0].price" in visible_in_view(pg, "#alerts-table tr:has(.badge-rejected) .why", "alerts")
        pg.goto(server.url + "/strategies")
        for action in ("reload", "disable"):
            visible_in_view(pg, f"button[aria-label='{action} passthrough']", "strategies")
        status = visible_in_view(pg, "#notifier-telegram .plugin-status", "strategies")
        assert status.startswith("idle") and "TELEGRAM_BOT_TOKEN" in status, status
        pg.goto(server.url + "/positions")
        assert "trigger ₹40.00" in visible_in_view(pg, "tr[data-symbol='NIFTY28APR26C26100'] .stop-order", "positions")
        pg.goto(server.url + "/")
        count = visible_in_view(pg, "#orders-count", "overview")
        assert re.fullmatch(r"\d+ of \d+ orders today · all of them", count), count
        pg.click("#orders-count a")
        pg.wait_for_selector("h2:text(\"Today's orders\")")
        assert "today=1" in pg.url
        pg.goto(server.url + "/")
        height = pg.evaluate("() => { document.getElementById('live-status').textContent = "
                             "'not updating: HTTP 503 SERVICE UNAVAILABLE'; "
                             "return document.querySelector('header.top').getBoundingClientRect().height; }")
        assert height <= 80, f"the header grows to {height} px when the live status is long"
        pg.click("#account summary")
        visible_in_view(pg, "button:text('Log out everywhere')", "account menu")
        no_overflow(pg, "account menu open")
    finally:
        context.close()


def test_the_pnl_bar_names_zero_the_warning_the_limit_and_now_without_overlap(browser, server):
    for viewport in (PHONE, DESKTOP):
        context = browser.new_context(viewport=viewport)
        pg = context.new_page()
        try:
            log_in(pg, server)
            boxes = {}
            for name in ("now", "limit", "warning", "zero"):
                el = pg.locator(f"#pnl-gauge .label-{name}")
                boxes[name] = el.bounding_box()
                assert el.text_content().strip(), name
            assert pg.text_content("#pnl-gauge .label-limit") == "limit −₹5,000.00"
            assert pg.text_content("#pnl-gauge .label-zero") == "₹0"
            names = list(boxes)
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    p, q = boxes[a], boxes[b]
                    apart = (p["x"] + p["width"] <= q["x"] or q["x"] + q["width"] <= p["x"]
                             or p["y"] + p["height"] <= q["y"] or q["y"] + q["height"] <= p["y"])
                    assert apart, (viewport["width"], a, p, b, q)
            assert pg.locator("#pnl-chart-limit").count() == 1  # the day chart draws the limit
        finally:
            context.close()


def test_dashboard_logins_stay_out_of_latest_events_until_asked_for(page, server):
    log_in(page, server)
    kinds = page.eval_on_selector_all("#events-list li", "els => els.map(e => e.dataset.kind)")
    assert kinds and "login" not in kinds
    page.click("#show-logins")
    page.wait_for_selector("#events-list li[data-kind='login'] .category:text('login')")
    page.click("#hide-logins")
    page.wait_for_selector("#show-logins")
