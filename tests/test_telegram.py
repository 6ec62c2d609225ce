"""The Telegram notifier plugin: the real python-telegram-bot against a fake Bot API server on loopback."""
from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from conftest import alert, wait_for
from host.sim.telegram_api import FakeTelegram
from host.broker_session import set_session_state
from host.market import IST

REPO = Path(__file__).resolve().parent.parent
CHAT, USER, STRANGER = 555, 42, 666


@pytest.fixture
def tg():
    fake = FakeTelegram().start()
    yield fake
    fake.stop()


@pytest.fixture
def tghost(tg, host_factory, tmp_path):  # tg first: its server stops after the hosts, never while a bot polls it
    """A host with the Telegram plugin (copied from plugins/notifiers) pointed at the fake server."""
    def make(**overrides):
        plugins = tmp_path / "plugins"
        (plugins / "notifiers").mkdir(parents=True, exist_ok=True)
        (plugins / "strategies").mkdir(exist_ok=True)
        shutil.copy(REPO / "plugins" / "notifiers" / "telegram.py", plugins / "notifiers" / "telegram.py")
        settings = {"TELEGRAM_BOT_TOKEN": tg.token, "TELEGRAM_CHAT_ID": str(CHAT), "TELEGRAM_ALLOWED_USERS": str(USER),
                    "TELEGRAM_API_URL": tg.url, **overrides}
        h = host_factory(**settings)
        wait_for(lambda: tg.sent("deleteWebhook") or tg.webhook, timeout=5)  # the bot is up and receiving
        return h
    return make


def said(tg, needle: str, timeout: float = 5.0) -> str:
    """The first message (sent or edited) containing needle, waiting for it."""
    def find():
        for p in tg.sent() + tg.sent("editMessageText"):
            if needle in p.get("text", ""):
                return p["text"]
        return None
    return wait_for(find, timeout=timeout)


def test_messages_for_each_event(tghost, tg, tmp_path):
    h = tghost(RISK_BASE_MAX_LOSS="-1000")
    assert "strategy-host" in said(tg, "Host started")
    # alerts: accepted and filled, duplicate, blocked by the guard, invalid, refused by risk
    assert h.post(alert()).status_code == 200
    assert "filled 75 @ 42.5" in said(tg, "Filled")
    h.post(alert())
    assert "duplicate" in said(tg, "Alert not executed: duplicate")
    h.post(alert(price="43"))
    assert "duplicate ENTRY" in said(tg, "Alert blocked by the guard")
    h.post(alert(qty="lots"))
    assert "legs[0].qty" in said(tg, "Alert rejected: invalid")
    # the broker session, with the login link
    set_session_state(h.runtime.storage, "expired", "test")
    text = said(tg, "Broker session lost")
    assert '<a href="http://127.0.0.1:8000/broker">Connect broker</a>' in text
    set_session_state(h.runtime.storage, "valid", "test")
    said(tg, "Broker session restored")
    # risk: a loss through the limit breaches, halts and exits; the next entry is refused
    h.tick("55")  # short 75 from 42.5: -937.5, past the warning level (-800)
    said(tg, "Risk warning")
    h.tick("60")
    said(tg, "DAILY MAX LOSS BREACHED")
    assert "halted" in said(tg, "Trading state")
    said(tg, "Exit all")
    h.settle()
    h.post(alert(tradingsymbol="NIFTY28APR26P24500"))
    said(tg, "Alert refused")
    # plugins: a broken strategy file, then a disabled strategy
    (tmp_path / "plugins" / "strategies" / "broken.py").write_text("this is not python\n")
    said(tg, "Plugin failed to load")
    (tmp_path / "plugins" / "strategies" / "calm.py").write_text(CALM)
    wait_for(lambda: h.api("/api/strategies/calm/disable", "POST").status_code == 200, timeout=5)
    said(tg, "Plugin disabled")
    # the day's summary, once, after DAILY_SUMMARY_TIME on a trading day
    h.runtime.engine.summary_time = datetime.now(IST).time().replace(second=0, microsecond=0)
    h.runtime.clock_offset = _to_trading_day(h)
    summary = said(tg, "Day summary")
    assert "PnL <b>−₹" in summary and "orders" in summary and "• s1 −₹" in summary
    time.sleep(1.5)
    assert sum("Day summary" in t for t in tg.texts()) == 1
    # stop: the last message still goes out
    h.stop()
    said(tg, "Host stopped", timeout=2)


def _to_trading_day(h) -> timedelta:
    """A clock offset that lands today's time on a weekday (the suite may run on a weekend)."""
    days = 0
    while not h.runtime.gate.clock.is_trading_day((datetime.now(IST) + timedelta(days=days)).date()):
        days += 1
    return timedelta(days=days)


# events Telegram never carries, each with why: info the dashboard shows, or said by another event at once
NOT_SENT = {
    "login": "a dashboard login; only failures and lock-outs are sent",
    "outside_fill_counted": "info: the fill was already told as closed_outside",
    "stop_placing": "info: stop_placed follows",
    "protected_exit": "info: the exit's own order events follow",
    "protection_ended": "info: the position is flat or reversed, told by its fills",
    "instruments": "the symbol files' state at each download: the dashboard shows it (never sent, by design)",
}


def test_every_event_the_host_records_reaches_telegram_or_is_left_out_on_purpose():
    """Found while adding exit_not_moved: exit_capped, order_held, target_exit_rejected and others were recorded
    but never classified, so Telegram dropped them; an error that asks the trader to act must reach the phone."""
    plugin = load_plugin()
    kinds = set()
    for path in (REPO / "host").rglob("*.py"):
        text = path.read_text()
        kinds |= set(re.findall(r'add_event\(\s*\w+,\s*"([a-z_]+)"', text))
        kinds |= set(re.findall(r'_say\([^,]+,\s*"([a-z_]+)"', text))
    assert len(kinds) > 40  # the scan finds the host's events
    missing = sorted(k for k in kinds if plugin.classify(k) is None and k not in NOT_SENT)
    assert missing == [], missing


def test_every_dynamic_value_is_html_escaped(tghost, tg):
    h = tghost()
    h.post(alert(strategy="<b>x&y</b>", qty="<script>"))
    text = said(tg, "Alert rejected")
    assert "&lt;b&gt;x&amp;y&lt;/b&gt;" in text and "&lt;script&gt;" in text
    assert "<script>" not in text and "<b>x" not in text


def test_categories_and_minimum_severity_filter(tghost, tg):
    h = tghost(TELEGRAM_CATEGORIES="orders,system", TELEGRAM_MIN_SEVERITY="warning")
    h.post(alert())
    h.post(alert(qty="bad"))                       # alerts: not a chosen category
    h.settle()
    h.runtime._emit("order_rejected", "order o1 rejected by the broker: margin", "warning", "s1", None)
    said(tg, "Order rejected")
    texts = "\n".join(tg.texts())
    assert "Filled" not in texts and "Alert rejected" not in texts  # info, and a category not chosen


def test_429_retry_after_is_obeyed(tghost, tg):
    h = tghost()
    time.sleep(1.5)
    mark = time.monotonic()
    tg.retry_after = [2]
    h.post(alert())
    wait_for(lambda: sum("Filled" in t for t in tg.texts()) == 2, timeout=8)
    after = [(t, p["text"]) for (t, m, p) in tg.calls if m == "sendMessage" and t >= mark]
    (refused_at, text), (again_at, again) = after[0], after[1]
    assert again == text and again_at - refused_at >= 2.0  # the same message, after the wait it was told
    assert [t for _, t in after].count(text) == 2  # refused once, delivered once


def test_a_refused_message_is_logged_and_the_next_one_still_goes(tghost, tg, caplog):
    h = tghost()
    caplog.set_level(logging.ERROR, logger="notifier.telegram")
    time.sleep(1.1)
    tg.bad_next = 1
    h.post(alert())
    wait_for(lambda: "Telegram refused a message" in caplog.text, timeout=5)
    h.post(alert(strategy="next"))
    said(tg, "(next, order")
    assert h.api("/api/notifiers").get_json()["items"][0]["status"] == "running"


@pytest.mark.slow
def test_a_30_s_outage_collapses_into_one_notice_and_never_delays_trading(tghost, tg):
    h = tghost()
    time.sleep(1.1)
    tg.outage(30)
    started = time.monotonic()
    for i in range(12):
        t = time.monotonic()
        assert h.post(alert(strategy=f"o{i}")).status_code == 200
        assert time.monotonic() - t < 1.0  # the webhook never waits for Telegram
    h.settle()
    before = len(tg.sent())
    notice = said(tg, "dropped</b> while Telegram was unreachable", timeout=50)
    assert time.monotonic() - started >= 29
    assert re.search(r"\d+ messages dropped", notice)
    time.sleep(2)
    after = tg.sent()[before:]
    assert len(after) <= 3  # the message that was retrying, the notice, maybe one more: not a flood of 12


CALM = ("from host import hookimpl\n\n@hookimpl\ndef strategy_meta():\n"
        "    return {'name': 'calm', 'version': '1', 'api_version': 1}\n")


def test_commands_from_the_allowed_user_and_a_stranger(tghost, tg, caplog, tmp_path):
    h = tghost()
    (tmp_path / "plugins" / "strategies" / "calm.py").write_text(CALM)
    caplog.set_level(logging.WARNING, logger="notifier.telegram")
    tg.push_message("/halt", STRANGER, CHAT, username="mallory")
    tg.push_message("/halt", USER, 999)  # an allowed user, but in another chat
    tg.push_message("/status", USER, CHAT)
    said(tg, "<b>Status</b>")
    assert h.api("/api/risk").get_json()["state"] == "active"
    assert "ignored '/halt' from user 666" in caplog.text and "in chat 999" in caplog.text
    tg.push_message("/halt", USER, CHAT)
    said(tg, "Trading state is now <b>halted</b>")
    r = h.post(alert())
    assert r.status_code == 423
    events = h.api("/api/events").get_json()["items"]
    assert any(e["kind"] == "telegram_command" and "/halt by telegram:@trader (42)" in e["message"] for e in events)
    assert any(e["kind"] == "trading_state" and "by telegram:@trader (42)" in e["message"] for e in events)
    for command, needle in (("/pnl", "Day PnL"), ("/positions", "No open positions"), ("/orders", "No orders"),
                            ("/risk", "<b>Risk</b>"), ("/strategies", "• calm v1 g1 <b>running</b>"), ("/nope", "Unknown command"),
                            ("/disable", "Usage: /disable"), ("/disable ghost", "Not done: no strategy named")):
        tg.push_message(command, USER, CHAT)
        said(tg, needle)
    wait_for(lambda: h.api("/api/strategies").get_json()["items"], timeout=5)
    for command, needle, status in (("/disable calm", "calm</b>: disabled", "disabled"),
                                    ("/enable calm", "calm</b>: enabled", "running"),
                                    ("/reload calm", "calm</b>: reloaded", "running")):
        tg.push_message(command, USER, CHAT)
        said(tg, needle)
        assert h.api("/api/strategies").get_json()["items"][0]["status"] == status
    assert h.api("/api/strategies").get_json()["items"][0]["generation"] == 3  # enable and reload load it again
    tg.push_message("/resume", USER, CHAT)
    said(tg, "Trading state is now <b>active</b>")
    assert h.post(alert()).status_code == 200


def _exitall_prompt(tg) -> dict:
    said(tg, "Exit all 1 open position?")
    return next(p for p in tg.sent() if "reply_markup" in p and "Exit all" in p["text"])


def test_exitall_asks_with_buttons_then_exits(tghost, tg):
    h = tghost()
    h.post(alert())
    h.settle()
    tg.push_message("/exitall", USER, CHAT)
    prompt = _exitall_prompt(tg)
    buttons = prompt["reply_markup"]["inline_keyboard"][0]
    assert [b["text"] for b in buttons] == ["Yes, exit all", "Cancel"]
    assert h.net() == -75  # asking changes nothing
    tg.push_callback(buttons[0]["callback_data"], STRANGER, prompt["_message"])  # a stranger's press
    time.sleep(0.5)
    assert h.net() == -75
    tg.push_callback(buttons[0]["callback_data"], USER, prompt["_message"])
    said(tg, "1 exit order sent")
    h.settle()
    assert h.net() == 0
    tg.push_callback(buttons[0]["callback_data"], USER, prompt["_message"])  # pressed again: used up
    said(tg, "confirmation expired")


def test_exitall_confirmation_expires(tghost, tg):
    h = tghost(TELEGRAM_CONFIRM_S="5")
    h.post(alert())
    h.settle()
    tg.push_message("/exitall", USER, CHAT)
    prompt = _exitall_prompt(tg)
    time.sleep(5.3)
    tg.push_callback(prompt["reply_markup"]["inline_keyboard"][0][0]["callback_data"], USER, prompt["_message"])
    said(tg, "Exit all: the confirmation expired. Nothing was done.")
    assert any(p.get("text", "").startswith("This confirmation has expired") for p in tg.sent("answerCallbackQuery"))
    time.sleep(0.5)
    assert h.net() == -75


def test_hot_reload_while_polling_loses_and_repeats_no_update(tghost, tg, tmp_path):
    h = tghost()
    path = tmp_path / "plugins" / "notifiers" / "telegram.py"
    pushed = []
    for i in range(3):
        pushed.append(tg.push_message("/pnl", USER, CHAT))
        time.sleep(0.05)
    path.write_text(path.read_text().replace('VERSION = "1.0"', 'VERSION = "1.1"'))  # a hot reload
    for i in range(6):
        pushed.append(tg.push_message("/pnl", USER, CHAT))
        time.sleep(0.15)
    wait_for(lambda: h.api("/api/notifiers").get_json()["items"][0]["version"] == "1.1", timeout=5)
    wait_for(lambda: sum("Day PnL" in t for t in tg.texts()) >= 9, timeout=20)
    time.sleep(1.5)
    # every update answered; at least once, not exactly: a reply whose send the reload cut after Telegram had taken
    # it is sent again by the next version (README: none is lost, one arrives twice), so at most one twice
    assert 9 <= sum("Day PnL" in t for t in tg.texts()) <= 10
    assert tg.conflicts == 0  # never two pollers at once
    assert h.api("/api/notifiers").get_json()["items"][0]["generation"] == 2


def test_the_bot_token_never_reaches_logs_or_events(tghost, tg, caplog):
    caplog.set_level(logging.DEBUG)
    h = tghost()
    tg.outage(2)
    h.post(alert())
    said(tg, "Filled", timeout=10)
    tg.push_message("/status", USER, CHAT)
    said(tg, "<b>Status</b>")
    assert tg.token not in caplog.text
    assert tg.token.split(":")[1] not in caplog.text
    assert not h.runtime.storage.rows("select 1 from events where message like ?", (f"%{tg.token.split(':')[1]}%",))


def test_webhook_mode_verifies_the_secret_header_and_takes_each_update_once(tghost, tg):
    secret = "s3cret-token-for-webhooks"
    h = tghost(TELEGRAM_MODE="webhook", TELEGRAM_WEBHOOK_SECRET=secret, PUBLIC_URL="https://host.example")
    wait_for(lambda: tg.webhook is not None, timeout=5)
    assert tg.webhook["url"] == "https://host.example/telegram/webhook" and tg.webhook["secret_token"] == secret
    update = {"update_id": 77, "message": {"message_id": 1, "date": 0, "text": "/status",
                                           "chat": {"id": CHAT, "type": "private"},
                                           "from": {"id": USER, "is_bot": False, "first_name": "T"}}}
    r = h.client.post("/telegram/webhook", json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "wrong"})
    assert r.status_code == 401 and "X-Telegram-Bot-Api-Secret-Token" in r.get_json()["error"]
    r = h.client.post("/telegram/webhook", json={"update_id": "x"}, headers={"X-Telegram-Bot-Api-Secret-Token": secret})
    assert r.status_code == 400 and r.get_json()["errors"][0]["field"] == "update_id"
    for _ in range(2):  # Telegram resends when unsure: handled once
        r = h.client.post("/telegram/webhook", json=update, headers={"X-Telegram-Bot-Api-Secret-Token": secret})
        assert r.status_code == 200
    said(tg, "<b>Status</b>")
    time.sleep(1.0)
    assert sum("<b>Status</b>" in t for t in tg.texts()) == 1
    assert tg.sent("getUpdates") == []  # no polling in webhook mode


def test_without_a_token_the_plugin_idles_and_the_host_runs(host_factory, tmp_path):
    plugins = tmp_path / "plugins" / "notifiers"
    plugins.mkdir(parents=True)
    shutil.copy(REPO / "plugins" / "notifiers" / "telegram.py", plugins / "telegram.py")
    h = host_factory()
    item = wait_for(lambda: next(iter(i for i in h.api("/api/notifiers").get_json()["items"] if i["status"] != "stopped"), None))
    assert item["status"] == "idle" and "TELEGRAM_BOT_TOKEN" in item["reason"]  # not a green "running"
    assert h.post(alert()).status_code == 200
    assert h.client.post("/telegram/webhook", json={}).status_code == 404


def load_plugin(name: str = "telegram_plugin_test"):
    """The plugin's module, loaded from its file as the host's loader does (registered while it runs)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "plugins/notifiers/telegram.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def test_render_titles_links_and_what_is_never_sent():
    plugin = load_plugin()
    link = lambda path: "https://h.example" + path  # noqa: E731

    def ev(kind, severity="info", message="m", strategy=None):
        return {"kind": kind, "severity": severity, "message": message, "strategy": strategy, "data": None}
    category, text = plugin.render(ev("broker_session_expiring", "warning"), link)
    assert category == "broker" and "Broker session expiring" in text and 'href="https://h.example/broker"' in text
    assert "href" in plugin.render(ev("preopen_check", "error"), link)[1]
    assert "href" not in plugin.render(ev("preopen_check", "info"), link)[1]
    assert "href" not in plugin.render(ev("broker_session_valid"), link)[1]
    assert plugin.render(ev("order_partial", strategy="s&p"), link) == ("orders", "ℹ️ <b>Partially filled</b> · s&amp;p\nm")
    assert plugin.render(ev("risk_square_off", "warning"), link)[0] == "risk"  # a prefix finds new kinds
    for quiet in ("login", "telegram_command", "instruments"):
        assert plugin.render(ev(quiet), link) is None


def test_orders_reply_shows_the_trigger_of_a_stop_order_and_rupees(tghost, tg):
    h = tghost()
    said(tg, "Host started")
    h.tick("42.5")
    r = h.post(alert(direction="BUY", stop_loss="40"))
    assert r.status_code == 200, r.get_json()
    wait_for(lambda: any(o["order_type"] == "SL-LMT" and o["status"] == "OPEN"
                         for o in h.api("/api/orders").get_json()["items"]), timeout=10)
    tg.push_message("/orders", USER, CHAT)
    text = said(tg, "Latest orders")
    stop = next(line for line in text.splitlines() if "SL-LMT" in line)
    assert "trigger ₹40.00 · limit ₹" in stop and "<b>OPEN</b> 0/75" in stop
    entry = next(line for line in text.splitlines() if "LMT ₹42.50" in line)
    assert "<b>FILLED</b> 75/75 avg ₹42.50" in entry


def _refused_for(tg, seconds: int) -> float:
    """A /status whose reply Telegram refuses with a 429 asking to wait `seconds`; when it was refused."""
    time.sleep(1.5)
    tg.retry_after = [seconds]
    tg.push_message("/status", USER, CHAT)
    wait_for(lambda: any(code == 429 for _, code in tg.statuses()), timeout=5)
    return next(t for t, code in tg.statuses() if code == 429)


def test_a_retry_after_in_force_at_a_reload_is_obeyed_by_the_next_version(tghost, tg, tmp_path):
    """Review 15: Telegram said "retry after 6 s" for a reply; a reload 1 s later started a version with a fresh
    pace, which sent the handed-on reply at once, 5 s early (real Telegram answers 429 again, and may lengthen the
    wait). The wait is kept where every version of the notifier sees it, and in its state for the next start."""
    h = tghost()
    refused_at = _refused_for(tg, 6)
    time.sleep(1.0)
    path = tmp_path / "plugins" / "notifiers" / "telegram.py"
    path.write_text(path.read_text().replace('VERSION = "1.0"', 'VERSION = "1.1"'))  # a hot reload
    wait_for(lambda: h.api("/api/notifiers").get_json()["items"][0]["version"] == "1.1", timeout=5)
    ok = lambda: [t for t, m, code, p in list(tg.received)  # noqa: E731
                  if m == "sendMessage" and code == 200 and "<b>Status</b>" in p.get("text", "")]
    sent_at = wait_for(ok, timeout=10)[0]
    assert sent_at - refused_at >= 5.5, sent_at - refused_at


def test_a_retry_after_in_force_at_a_restart_is_obeyed_after_it(tghost, tg):
    """The same across a restart: the wait's end is kept in the notifier's state, as wall-clock time."""
    h = tghost()
    refused_at = _refused_for(tg, 8)
    h.restart()
    ok = lambda: [t for t, m, code, p in list(tg.received) if m == "sendMessage" and code == 200 and t > refused_at]  # noqa: E731
    sent_at = wait_for(ok, timeout=15)[0]
    assert sent_at - refused_at >= 7.5, sent_at - refused_at


def _slow_loop_start(monkeypatch, at: str = "    async def _main(self) -> None:\n") -> None:
    """The plugin as tghost copies it, its bot loop's thread taking 1.6 s at `at` (a loaded machine)."""
    source = (REPO / "plugins" / "notifiers" / "telegram.py").read_text()
    assert source.count(at) == 1
    source = source.replace(at, f"{at}        time.sleep(1.6)  # a loaded machine\n")
    real_copy = shutil.copy

    def copy(src, dst, *a, **kw):
        if str(src).endswith("telegram.py"):
            Path(dst).write_text(source)
            return dst
        return real_copy(src, dst, *a, **kw)
    monkeypatch.setattr(shutil, "copy", copy)


def test_a_slow_start_of_the_bots_loop_neither_fails_the_notifier_nor_loses_what_came_meanwhile(tghost, tg, tmp_path,
                                                                                               monkeypatch):
    """On a loaded machine the bot's loop took long to come up: notifier_start waited up to 2 s for it against the
    host's 1 s budget, so the version was counted failed and stopped, and nothing reached Telegram until the next
    reload or restart. The start now returns at once; what is offered before the loop runs waits for it."""
    _slow_loop_start(monkeypatch)
    h = tghost()
    item = h.api("/api/notifiers").get_json()["items"][0]
    assert item["status"] == "running", item
    assert "strategy-host" in said(tg, "Host started", timeout=8)  # offered while the loop was still coming up
    tg.push_message("/status", USER, CHAT)
    said(tg, "<b>Status</b>", timeout=8)


def test_a_reload_while_the_bots_loop_is_still_coming_up_leaves_one_poller(tg, host_factory, tmp_path):
    """With the start no longer waiting for the loop, a stop can come before the loop has made its tasks: the
    cancel found none, the tasks were made after it, and the stopped version polled on beside the next one."""
    plugins = tmp_path / "plugins" / "notifiers"
    plugins.mkdir(parents=True)
    (tmp_path / "plugins" / "strategies").mkdir()
    path = plugins / "telegram.py"
    path.write_text((REPO / "plugins" / "notifiers" / "telegram.py").read_text().replace(
        "    def _run(self) -> None:\n",
        "    def _run(self) -> None:\n        time.sleep(1.2 if VERSION == '1.0' else 0)  # loaded\n", 1))
    h = host_factory(TELEGRAM_BOT_TOKEN=tg.token, TELEGRAM_CHAT_ID=str(CHAT), TELEGRAM_ALLOWED_USERS=str(USER),
                     TELEGRAM_API_URL=tg.url)
    assert not tg.sent("deleteWebhook")  # the first version's loop is still coming up
    path.write_text(path.read_text().replace('VERSION = "1.0"', 'VERSION = "1.1"'))  # reload at once
    wait_for(lambda: h.api("/api/notifiers").get_json()["items"][0]["version"] == "1.1", timeout=8)
    time.sleep(2.0)
    for i in range(3):
        tg.push_message("/pnl", USER, CHAT)
        time.sleep(0.2)
    wait_for(lambda: sum("Day PnL" in t for t in tg.texts()) >= 3, timeout=10)
    time.sleep(1.0)
    assert sum("Day PnL" in t for t in tg.texts()) == 3 and tg.conflicts == 0
    import threading
    assert not [t for t in threading.enumerate() if t.name == "telegram-1.0"]  # no stopped version runs on


def test_a_reply_in_flight_at_a_hot_reload_is_sent_by_the_next_version(tghost, tg, tmp_path, monkeypatch):
    """The reload's stop cancelled a send in flight (Telegram slow to take it), and the reply, already taken off
    the queue, was lost: the trader's /status (or /halt's answer) never came. What was being sent is handed on
    with what waits; if Telegram had in fact taken it, it arrives twice, which beats never."""
    import asyncio
    from telegram import Bot
    real_send, hung = Bot.send_message, []

    async def send_message(self, chat_id, text, *args, **kw):
        if "<b>Status</b>" in text and not hung:
            hung.append(text)
            await asyncio.sleep(60)  # never reaches Telegram
        return await real_send(self, chat_id, text, *args, **kw)
    monkeypatch.setattr(Bot, "send_message", send_message)
    h = tghost()
    tg.push_message("/status", USER, CHAT)
    wait_for(lambda: hung, timeout=5)
    path = tmp_path / "plugins" / "notifiers" / "telegram.py"
    path.write_text(path.read_text().replace('VERSION = "1.0"', 'VERSION = "1.1"'))  # a hot reload
    wait_for(lambda: h.api("/api/notifiers").get_json()["items"][0]["version"] == "1.1", timeout=5)
    said(tg, "<b>Status</b>", timeout=8)
    assert sum("<b>Status</b>" in t for t in tg.texts()) == 1


def test_a_wall_clock_stepped_back_after_a_429_brings_no_old_wait_back(tghost, tg, monkeypatch):
    """Review 17: the 429's end was kept for the next start in wall-clock time and read on every turn; with the
    clock stepped back 15 minutes (NTP correcting a fast clock), the wait long over came back as 15 minutes of
    silence, replies and risk alerts alike. It is read once, at a start, and forgotten once over."""
    def replies(after):
        return [t for t, m, code, p in list(tg.received)
                if m == "sendMessage" and code == 200 and "<b>Status</b>" in p.get("text", "") and t > after]
    tghost()
    said(tg, "Host started", timeout=8)
    tg.retry_after = [2]
    tg.push_message("/status", USER, CHAT)
    wait_for(lambda: any(code == 429 for _, code in tg.statuses()), timeout=5)
    wait_for(lambda: replies(0), timeout=10)  # the wait was obeyed and is over
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 900)  # the clock steps back 15 minutes
    asked = time.monotonic()
    tg.push_message("/status", USER, CHAT)
    assert wait_for(lambda: replies(asked), timeout=8)


def test_what_a_run_left_unsent_goes_out_before_what_the_next_run_says_at_its_start(tghost, tg, monkeypatch):
    """Review 17: at a start, what the previous run had left unsent (Telegram refusing it then) was queued after
    what the new run offered before its bot loop ran ("Host started": on a loaded machine the loop comes up after
    the start returns), so the trader read the new run's news first and the older alert after it, as if it were
    new. What an earlier run or version left goes out first."""
    _slow_loop_start(monkeypatch, at="    def _run(self) -> None:\n")  # before the loop runs _main
    h = tghost()
    said(tg, "Host started", timeout=8)
    tg.flood(3)  # Telegram refuses every message for 3 s
    r = h.api("/api/halt", method="POST", json={"mode": "halted", "reason": "left-unsent-by-the-first-run"})
    assert r.status_code == 200, r.get_json()
    wait_for(lambda: any(code == 429 for _, code in tg.statuses()), timeout=5)
    h.restart()

    def delivered() -> str:
        return "\n".join(p.get("text", "") for _, p in tg.delivered())
    wait_for(lambda: "left-unsent" in delivered() and delivered().count("Host started") >= 2, timeout=20)
    text = delivered()
    second_start = text.index("Host started", text.index("Host started") + 1)
    assert text.index("left-unsent") < second_start, text


def _slow_status(monkeypatch) -> threading.Event:
    """/status takes 3 s on the host's side (a command in progress); the event is set when it is asked."""
    import host.host_access as host_access
    asked = threading.Event()
    real_status = host_access.HostAccess.status

    def slow_status(self):  # type: ignore[no-untyped-def]
        asked.set()
        time.sleep(3)
        return real_status(self)
    monkeypatch.setattr(host_access.HostAccess, "status", slow_status)
    return asked


def test_a_command_in_progress_at_shutdown_does_not_lose_what_was_waiting_to_be_sent(tghost, tg, monkeypatch):
    """Review 17: at a shutdown the bot's loop waited up to 5 s for a command in progress before it saved what was
    still waiting to be sent, while the stop waited 0.8 s: the host stored the plugin's state without it, and the
    alert Telegram had refused just before never went out. What is waiting is saved before that wait."""
    h = tghost()
    said(tg, "Host started")
    asked = _slow_status(monkeypatch)
    tg.flood(4)  # longer than the shutdown: the first run cannot deliver it
    r = h.api("/api/halt", method="POST", json={"mode": "halted", "reason": "waiting-at-shutdown"})
    assert r.status_code == 200, r.get_json()
    wait_for(lambda: any(code == 429 for _, code in tg.statuses()), timeout=5)
    tg.push_message("/status", USER, CHAT)
    assert asked.wait(5)
    h.restart()
    wait_for(lambda: any("Trading state</b>" in p.get("text", "") and "waiting-at-shutdown" in p["text"]
                         for _, p in tg.delivered()), timeout=15)


def test_an_alert_handed_on_at_a_reload_is_not_kept_for_the_next_start_too(tghost, tg, tmp_path):
    """Review 20: an alert Telegram refused was waiting at a hot reload. The retired version kept it in its state as
    well as handing it to the next version, which sent it; the state the host stored still listed it. After a
    crash (no clean stop: kill -9, out of memory), the next start sent it again, and the trader read an old halt
    as new. What is handed on at a reload is the next version's alone."""
    from host.notify import NotifierRegistry
    h = tghost()
    said(tg, "Host started")
    tg.flood(3)
    r = h.api("/api/halt", method="POST", json={"mode": "halted", "reason": "sent-once-please"})
    assert r.status_code == 200, r.get_json()
    wait_for(lambda: any(code == 429 for _, code in tg.statuses()), timeout=5)
    path = tmp_path / "plugins" / "notifiers" / "telegram.py"
    path.write_text(path.read_text().replace('VERSION = "1.0"', 'VERSION = "1.1"'))  # a hot reload
    wait_for(lambda: h.api("/api/notifiers").get_json()["items"][0]["version"] == "1.1", timeout=5)
    count = lambda: sum("sent-once-please" in p.get("text", "") for _, p in tg.delivered())  # noqa: E731
    wait_for(lambda: count() == 1, timeout=10)  # the new version sent it
    running = h.runtime.notifiers.running()
    real_stop, real_persist = NotifierRegistry._stop, NotifierRegistry.persist_state
    NotifierRegistry._stop = lambda self, live, reason: None  # a crash: no stop hook, no state stored
    NotifierRegistry.persist_state = lambda self, live, state=None: None
    try:
        h.restart()
    finally:
        NotifierRegistry._stop, NotifierRegistry.persist_state = real_stop, real_persist
    try:
        said(tg, "Host started")
        time.sleep(3)
        assert count() == 1, f"sent {count()} times"
    finally:  # the crashed process's bot must not poll on: a later test's fake Telegram may get its port
        for live in running:
            live.candidate.module.notifier_stop(reason="shutdown")


def test_a_clean_shutdown_right_after_a_reload_keeps_what_the_new_version_had_not_taken_over(tghost, tg, tmp_path,
                                                                                            monkeypatch):
    """Review 21: a deploy lands a new telegram.py (a hot reload) while the old version finishes a command, so it
    still holds the baton; the service is then restarted cleanly. The old version had stored nothing for the next
    start (a reload: the baton hands it on), and the new version, stopped before it took over, stored only its
    own queue: the halt alert Telegram had refused died with the baton. A version that never took over keeps what
    the previous one left, ahead of its own."""
    h = tghost()
    said(tg, "Host started")
    asked = _slow_status(monkeypatch)
    tg.flood(5)
    r = h.api("/api/halt", method="POST", json={"mode": "halted", "reason": "waiting-at-reload"})
    assert r.status_code == 200, r.get_json()
    wait_for(lambda: any(code == 429 for _, code in tg.statuses()), timeout=5)
    tg.push_message("/status", USER, CHAT)
    assert asked.wait(5)
    path = tmp_path / "plugins" / "notifiers" / "telegram.py"
    path.write_text(path.read_text().replace('VERSION = "1.0"', 'VERSION = "1.1"'))  # the deploy's new file
    wait_for(lambda: h.api("/api/notifiers").get_json()["items"][0]["version"] == "1.1", timeout=5)
    h.restart()  # clean: every stop hook runs, every state is stored
    wait_for(lambda: any("Trading state</b>" in p.get("text", "") and "waiting-at-reload" in p["text"]
                         for _, p in tg.delivered()), timeout=15)


def test_a_refused_token_is_said_once_and_commands_come_back_when_telegram_takes_it_again(tghost, tg, caplog):
    """Telegram answered a poll 401 (a token revoked and restored, or its own fault): the poll's task ended on
    the InvalidToken, and the bot read no command again until a restart, saying nothing."""
    caplog.set_level(logging.WARNING, logger="notifier.telegram")
    h = tghost()
    said(tg, "Host started")
    good, tg.token = tg.token, "1:refused"
    tg.push_message("/status", USER, CHAT)  # ends the poll in progress; the next one is refused
    wait_for(lambda: tg.unauthorized >= 2, timeout=5)  # the reply to /status and the next poll
    time.sleep(0.5)
    tg.token = good
    tg.push_message("/halt", USER, CHAT)
    wait_for(lambda: h.runtime.gate.state()["state"] == "halted", timeout=8)
    said(tg, "Trading state is now <b>halted</b>")
    assert caplog.text.count("Telegram refuses the bot token") == 1
    assert good.split(":")[1] not in caplog.text


def test_commands_are_read_in_a_process_with_more_than_1024_open_files(tghost, tg):
    """The fake Bot API checked for a cancelled long poll with select(), which raises for a socket numbered over
    1,023: late in a long test run every poll was taken for hung up and answered empty at once, no command was
    ever served, and the Telegram command tests failed only in full runs."""
    import os
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # what a long run's workers reach
    try:
        h = tghost()
        tg.push_message("/halt", USER, CHAT)
        wait_for(lambda: h.runtime.gate.state()["state"] == "halted", timeout=5)
        time.sleep(1.0)
        assert len(tg.statuses("getUpdates")) <= 3  # long polls, not a spin
    finally:
        for fd in spare:
            os.close(fd)


UNREADABLE = {"message": {"message_id": 1, "date": 0, "text": "/halt", "chat": {"id": CHAT, "type": "private"},
                          "from": {"id": USER, "is_bot": False, "first_name": "T"},
                          "entities": [{"type": "bot_command"}]}}  # an entity without offset and length: PTB raises


def test_polling_an_update_the_library_cannot_read_is_skipped_and_commands_after_it_still_act(tghost, tg, caplog):
    """python-telegram-bot reads a whole getUpdates answer at once: one update it could not read (a field Telegram
    changed) failed every poll, the offset never moved past it, and no command was read again until a restart."""
    caplog.set_level(logging.WARNING, logger="notifier.telegram")
    h = tghost()
    bad = tg._push(UNREADABLE)
    tg.push_message("/halt", USER, CHAT)
    wait_for(lambda: h.runtime.gate.state()["state"] == "halted", timeout=8)
    said(tg, "Trading state is now <b>halted</b>")
    text = said(tg, "TELEGRAM MESSAGE NOT READ")  # the trader hears of it: a command in it was not acted on
    assert f"update {bad}" in text and "send it again" in text
    assert caplog.text.count(f"update {bad} could not be read") == 1
    assert tg.token.split(":")[1] not in caplog.text


def test_webhook_mode_an_update_the_library_cannot_read_is_skipped_and_commands_after_it_still_act(tghost, tg, caplog):
    """Webhook mode read stored updates with Update.de_json outside any try: one it could not read ended the
    task that takes them, silently, and no command sent after it was acted on until a restart."""
    caplog.set_level(logging.WARNING, logger="notifier.telegram")
    secret = "s3cret-token-for-webhooks"
    h = tghost(TELEGRAM_MODE="webhook", TELEGRAM_WEBHOOK_SECRET=secret, PUBLIC_URL="https://host.example")
    wait_for(lambda: tg.webhook is not None, timeout=5)
    halt = {"update_id": 91, "message": {"message_id": 2, "date": 0, "text": "/halt",
                                         "chat": {"id": CHAT, "type": "private"},
                                         "from": {"id": USER, "is_bot": False, "first_name": "T"}}}
    for update in ({"update_id": 90, **UNREADABLE}, halt):
        r = h.client.post("/telegram/webhook", json=update, headers={"X-Telegram-Bot-Api-Secret-Token": secret})
        assert r.status_code == 200
    wait_for(lambda: h.runtime.gate.state()["state"] == "halted", timeout=8)
    said(tg, "TELEGRAM MESSAGE NOT READ")
    assert caplog.text.count("update 90 could not be read") == 1
    wait_for(lambda: not h.runtime.storage.rows("select 1 from notifier_inbox where handled_at is null"), timeout=5)


def test_webhook_mode_a_failed_host_call_is_said_and_commands_after_it_still_act(tghost, tg, monkeypatch, caplog):
    """Review 23 R4: webhook mode's task had no guard around the host's calls: one failed write (a full disk, a
    locked database) ended it, asyncio.gather kept the exception to itself, and no Telegram command was acted on
    again until a restart, with nothing in the log."""
    from host.host_access import HostAccess
    caplog.set_level(logging.WARNING, logger="notifier.telegram")
    real, failed = HostAccess.inbox_done, []

    def inbox_done(self, row_id):
        if not failed:
            failed.append(row_id)
            raise OSError("database or disk is full (test)")
        return real(self, row_id)
    monkeypatch.setattr(HostAccess, "inbox_done", inbox_done)
    secret = "s3cret-token-for-webhooks"
    h = tghost(TELEGRAM_MODE="webhook", TELEGRAM_WEBHOOK_SECRET=secret, PUBLIC_URL="https://host.example")
    wait_for(lambda: tg.webhook is not None, timeout=5)

    def update(uid, text):
        return {"update_id": uid, "message": {"message_id": uid, "date": 0, "text": text,
                                              "chat": {"id": CHAT, "type": "private"},
                                              "from": {"id": USER, "is_bot": False, "first_name": "T"}}}
    hdr = {"X-Telegram-Bot-Api-Secret-Token": secret}
    assert h.client.post("/telegram/webhook", json=update(100, "/status"), headers=hdr).status_code == 200
    wait_for(lambda: failed, timeout=5)
    assert h.client.post("/telegram/webhook", json=update(101, "/halt"), headers=hdr).status_code == 200
    wait_for(lambda: h.runtime.gate.state()["state"] == "halted", timeout=8)
    assert "database or disk is full (test)" in caplog.text
    said(tg, "<b>Status</b>")
    time.sleep(1.0)
    assert sum("<b>Status</b>" in t for t in tg.texts()) == 1  # handled once, though its done-mark failed once


def test_an_unreadable_update_from_a_stranger_is_logged_not_announced_to_the_traders_chat(tghost, tg, caplog):
    """Review 23 R5: anyone can message a bot; an update the bot could not read was announced in the trader's chat
    ("a command in it was not acted on; send it again") before anything looked at who sent it."""
    caplog.set_level(logging.WARNING, logger="notifier.telegram")
    h = tghost()
    bad = tg._push({"message": {"message_id": 1, "date": 0, "text": "/halt", "chat": 7,
                                "from": {"id": STRANGER, "is_bot": False, "first_name": "X"}}})
    tg.push_message("/halt", USER, CHAT)  # a readable update after it: once acted on, the skip has been done
    wait_for(lambda: h.runtime.gate.state()["state"] == "halted", timeout=8)
    time.sleep(0.5)
    assert not h.runtime.storage.rows("select 1 from events where kind = 'telegram_update_skipped'")
    assert f"update {bad} could not be read" in caplog.text

