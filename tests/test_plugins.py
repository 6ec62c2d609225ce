"""Strategy plugins while the host runs: discovery, hot reload, faults, isolation, API controls."""
from __future__ import annotations

import gc
import sys
import time
import weakref

import pytest

from conftest import SYMBOL, alert, wait_for
from plugin_files import gone, stays, strategies, strategy_source, wait_strategy, write

COUNTING = '''
@hookimpl
def strategy_start(ctx):
    ctx.state.setdefault("alerts", 0)

@hookimpl
def strategy_on_alert(ctx, alert):
    ctx.state["alerts"] += 1
    leg = alert.legs[0]
    return [Intent(leg.exchange, leg.symbol, leg.side, leg.qty * QTY_FACTOR, leg.order_type, leg.product,
                   leg.price, action=alert.execution_type)]
'''


def counting(name, version, factor=1):
    return strategy_source(name, version, f"QTY_FACTOR = {factor}\n" + COUNTING)


@pytest.fixture
def folder(host):
    return host.runtime.strategies.folder


def test_a_dropped_file_trades_and_its_orders_carry_its_version(host, folder):
    write(folder, "doubler", counting("doubler", "1.0", factor=2))
    wait_strategy(host, "doubler", status="running", version="1.0", generation=1, error=None)
    r = host.post(alert(strategy="doubler", qty=75))
    assert r.status_code == 200, r.get_json()
    order = r.get_json()["orders"][0]
    assert order["qty"] == 150 and order["strategy_version"] == "1.0"


def test_an_edit_takes_over_with_the_state_handed_on(host, folder):
    write(folder, "counter", counting("counter", "1.0"))
    wait_strategy(host, "counter", status="running", generation=1)
    host.post(alert(strategy="counter", alert_id="a1"))
    host.settle()
    host.post(alert("EXIT", strategy="counter", alert_id="a2"))
    host.settle()
    write(folder, "counter", counting("counter", "2.0", factor=3), atomic=True)
    wait_strategy(host, "counter", version="2.0", generation=2)
    r = host.post(alert(strategy="counter", qty=10, alert_id="a3"))
    assert r.get_json()["orders"][0]["qty"] == 30 and r.get_json()["orders"][0]["strategy_version"] == "2.0"
    assert host.runtime.strategies.live("counter").ctx.state["alerts"] == 3  # counted by v1 twice, v2 once


@pytest.mark.parametrize("broken, words", [
    ("def oops(:\n", "SyntaxError"),
    ("import module_that_does_not_exist\n", "ModuleNotFoundError"),
    ("@hookimpl\ndef strategy_on_tick(ctx, tick, extra):\n    pass\n", "extra"),
])
def test_a_broken_version_leaves_the_old_one_running_with_the_error_shown(host, folder, broken, words):
    write(folder, "steady", counting("steady", "1.0"))
    wait_strategy(host, "steady", status="running", generation=1)
    write(folder, "steady", counting("steady", "1.1") + broken)
    record = wait_for(lambda: (s := strategies(host)["steady"])["error"] and s)
    assert words in record["error"] and record["traceback"]
    assert record["status"] == "running" and record["version"] == "1.0" and record["generation"] == 1
    assert record["history"][0]["change"] == "load failed" and record["digest"]
    r = host.post(alert(strategy="steady", qty=5))
    assert r.status_code == 200 and r.get_json()["orders"][0]["strategy_version"] == "1.0"
    events = host.api("/api/events").get_json()["items"]
    assert any(e["kind"] == "plugin_failed" and "steady" in e["message"] and "keeps running" in e["message"]
               for e in events)


def test_a_first_version_that_fails_is_reported_and_its_alerts_are_not_passed_through(host, folder):
    write(folder, "bad_meta", strategy_source("bad_meta").replace(
        'return {"name"', 'raise RuntimeError("meta exploded")\n    return {"name"'))
    record = wait_strategy(host, "bad_meta", status="error")
    assert "strategy_meta raised RuntimeError: meta exploded" in record["error"]
    r = host.post(alert(strategy="bad_meta"))
    assert r.status_code == 503 and "is not running" in r.get_json()["reason"]
    assert host.orders() == []


def test_an_exception_in_start_keeps_the_old_version(host, folder):
    write(folder, "starter", counting("starter", "1.0"))
    wait_strategy(host, "starter", status="running")
    write(folder, "starter", strategy_source("starter", "2.0", '''
@hookimpl
def strategy_start(ctx):
    raise ValueError("cannot start")
'''))
    record = wait_for(lambda: (s := strategies(host)["starter"])["error"] and s)
    assert "start failed" in record["error"] and "cannot start" in record["error"]
    assert record["version"] == "1.0" and record["status"] == "running"


def test_meta_fields_and_api_version_are_checked(host, folder):
    write(folder, "wrongname", strategy_source("other_name"))
    assert "name: expected 'wrongname'" in wait_strategy(host, "wrongname", status="error")["error"]
    write(folder, "future", strategy_source("future").replace('"api_version": 1', '"api_version": 2'))
    assert "api_version: expected 1, found 2" in wait_strategy(host, "future", status="error")["error"]


def test_a_hook_parameter_with_a_default_is_refused(host, folder):
    write(folder, "defaults", strategy_source("defaults", body='''
@hookimpl
def strategy_on_tick(ctx, tick=None):
    return None
'''))
    assert "default values (tick)" in wait_strategy(host, "defaults", status="error")["error"]


def test_a_notifier_dropped_into_the_strategies_folder_is_refused(host, folder):
    write(folder, "chatty", 'from host import hookimpl\n@hookimpl\ndef notifier_meta():\n'
                           '    return {"name": "chatty", "version": "1", "api_version": 1}\n')
    assert "move it to plugins/notifiers/" in wait_strategy(host, "chatty", status="error")["error"]


def test_unknown_hooks_are_refused(host, folder):
    write(folder, "typo", strategy_source("typo", body='''
@hookimpl
def strategy_on_tik(ctx, tick):
    return None
'''))
    assert "strategy_on_tik" in wait_strategy(host, "typo", status="error")["error"]


def test_the_same_content_saved_twice_does_not_reload(host, folder):
    source = counting("same", "1.0")
    write(folder, "same", source)
    wait_strategy(host, "same", generation=1)
    write(folder, "same", source)
    write(folder, "same", source, atomic=True)
    stays(lambda: strategies(host)["same"]["generation"] == 1)


def test_ten_rapid_saves_give_one_reload(host, folder):
    write(folder, "rapid", counting("rapid", "1.0"))
    wait_strategy(host, "rapid", generation=1)
    for i in range(10):
        write(folder, "rapid", counting("rapid", f"1.{i + 1}"))
        time.sleep(0.02)
    wait_strategy(host, "rapid", version="1.10", generation=2)
    stays(lambda: strategies(host)["rapid"]["generation"] == 2)


def test_temp_and_private_files_are_skipped(host, folder):
    for fname in ("_helper.py", ".hidden.py", "draft.py~", "#auto#", "notes.txt"):
        (folder / fname).write_text("this is not python (")
    write(folder, "real", counting("real", "1.0"))
    wait_strategy(host, "real", status="running")
    assert set(strategies(host)) == {"real"}


def test_delete_stops_and_a_readded_file_resumes_from_its_state(host, folder):
    path = write(folder, "phoenix", counting("phoenix", "1.0"))
    wait_strategy(host, "phoenix", status="running")
    host.post(alert(strategy="phoenix", alert_id="p1"))
    host.settle()
    path.unlink()
    gone(host, "phoenix")
    # without its plugin the name is served by the built-in passthrough: the qty is not multiplied
    write(folder, "phoenix", counting("phoenix", "2.0", factor=5))
    wait_strategy(host, "phoenix", status="running", version="2.0")
    assert host.runtime.strategies.live("phoenix").ctx.state["alerts"] == 1
    events = [e["kind"] for e in host.api("/api/events").get_json()["items"]]
    assert "plugin_removed" in events


def test_a_rename_is_a_delete_plus_an_add(host, folder):
    path = write(folder, "before", counting("before", "1.0"))
    wait_strategy(host, "before", status="running")
    path.write_text(counting("after", "1.0"))
    path.rename(folder / "after.py")
    wait_strategy(host, "after", status="running")
    gone(host, "before")


def test_garbage_returned_by_a_plugin_makes_no_order(host, folder):
    write(folder, "junk", strategy_source("junk", body='''
@hookimpl
def strategy_on_alert(ctx, alert):
    return [{"symbol": "X", "qty": 1}, "sell everything"]
'''))
    wait_strategy(host, "junk", status="running")
    r = host.post(alert(strategy="junk"))
    assert r.status_code == 503
    assert "expected an Intent, found dict" in r.get_json()["reason"]
    assert host.orders() == []


def test_intents_with_bad_values_are_refused(host, folder):
    write(folder, "negative", strategy_source("negative", body='''
@hookimpl
def strategy_on_alert(ctx, alert):
    return Intent("NOPE", "X", Side.BUY, -3, OrderType.LMT, Product.MIS, 1.5, action=ExecutionType.ENTRY)
'''))
    wait_strategy(host, "negative", status="running")
    reason = host.post(alert(strategy="negative")).get_json()["reason"]
    assert "intent[0].price: expected Decimal or None" in reason
    assert host.orders() == []


def test_a_plugin_that_sleeps_past_its_budget_does_not_stall_the_engine(host_factory):
    h = host_factory(plugin_budget_s=0.3)
    write(h.runtime.strategies.folder, "sleepy", strategy_source("sleepy", body='''
import time

@hookimpl
def strategy_on_alert(ctx, alert):
    time.sleep(2)
    return [Intent(l.exchange, l.symbol, l.side, l.qty, l.order_type, l.product, l.price,
                   action=alert.execution_type) for l in alert.legs]
'''))
    wait_strategy(h, "sleepy", status="running")
    t0 = time.monotonic()
    r = h.post(alert(strategy="sleepy"))
    assert r.status_code == 503 and "budget" in r.get_json()["reason"]
    assert time.monotonic() - t0 < 1.0
    t0 = time.monotonic()
    assert h.post(alert(strategy="someone_else")).status_code == 200  # the engine moved on
    assert time.monotonic() - t0 < 0.5
    slow = [e for e in h.api("/api/events").get_json()["items"] if e["kind"] == "plugin_slow"]
    assert slow and slow[0]["data"]["duration_s"] >= 0.3
    time.sleep(2)  # the late result of the slow call is dropped, never an order
    assert [o["strategy"] for o in h.orders()] == ["someone_else"]


def test_a_delete_during_a_slow_call_stops_the_plugin_and_drops_its_intents(host_factory):
    h = host_factory(plugin_budget_s=0.2)
    folder = h.runtime.strategies.folder
    path = write(folder, "slowpoke", strategy_source("slowpoke", body='''
import time

@hookimpl
def strategy_on_alert(ctx, alert):
    time.sleep(1)
    return []
'''))
    wait_strategy(h, "slowpoke", status="running")
    h.post(alert(strategy="slowpoke"))
    path.unlink()
    gone(h, "slowpoke")
    time.sleep(1.2)
    assert h.orders() == []
    assert h.runtime.strategies.live("slowpoke") is None


def test_one_failing_strategy_never_hides_another(host, folder):
    tick_source = '''
@hookimpl
def strategy_on_tick(ctx, tick):
    {action}
'''
    meta = f', "symbols": ["NFO:{SYMBOL}"]'
    write(folder, "crasher", strategy_source("crasher", body=tick_source.format(action='raise RuntimeError("tick bug")'),
                                             meta_extra=meta))
    write(folder, "buyer", strategy_source("buyer", body=tick_source.format(
        action='return None if ctx.position(tick.exchange, tick.symbol) or ctx.open_orders else '
               'Intent(tick.exchange, tick.symbol, Side.BUY, 1, OrderType.MKT, Product.NRML, action=ExecutionType.ENTRY)'),
        meta_extra=meta))
    wait_strategy(host, "crasher", status="running")
    wait_strategy(host, "buyer", status="running")
    host.tick("100")
    wait_for(lambda: host.net("buyer") == 1)
    record = strategies(host)["crasher"]
    assert "strategy_on_tick raised RuntimeError: tick bug" in record["error"] and "generation 1" in record["error"]
    assert "Traceback" in record["traceback"]


def test_a_plugin_that_keeps_raising_is_disabled_by_the_breaker(host_factory):
    h = host_factory(breaker_limit=3)
    write(h.runtime.strategies.folder, "flaky", strategy_source("flaky", body='''
@hookimpl
def strategy_on_alert(ctx, alert):
    raise KeyError("missing leg")
'''))
    wait_strategy(h, "flaky", status="running")
    codes = [h.post(alert(strategy="flaky", alert_id=f"f{i}")).status_code for i in range(3)]
    assert codes == [503, 503, 503]
    record = wait_strategy(h, "flaky", status="disabled")
    assert any("circuit breaker" in x["change"] for x in record["history"])
    wait_for(lambda: any(e["kind"] == "plugin_disabled" and "circuit breaker" in e["message"]
                         for e in h.api("/api/events").get_json()["items"]))
    assert h.post(alert(strategy="flaky", alert_id="f9")).status_code == 423


def test_a_plugin_that_keeps_returning_unusable_intents_is_disabled_by_the_breaker(host_factory):
    """Found by an outside test: a call that returned was counted a success, then its unusable intents a failure,
    so the count went 0, 1, 0, 1: fifteen 503s in a row never tripped the breaker, and the plugin stayed running."""
    h = host_factory(breaker_limit=3)
    write(h.runtime.strategies.folder, "garbled", strategy_source("garbled", body='''
@hookimpl
def strategy_on_alert(ctx, alert):
    return ["not an intent"]
'''))
    wait_strategy(h, "garbled", status="running")
    codes = [h.post(alert(strategy="garbled", alert_id=f"g{i}")).status_code for i in range(3)]
    assert codes == [503, 503, 503]
    record = wait_strategy(h, "garbled", status="disabled")
    assert any("circuit breaker" in x["change"] and "unusable intents" in x["change"] for x in record["history"])


def test_disable_enable_and_reload_through_the_api(host, folder):
    write(folder, "ctl", counting("ctl", "1.0"))
    wait_strategy(host, "ctl", status="running")
    host.post(alert(strategy="ctl", direction="BUY", qty=10, alert_id="c1"))
    host.settle()
    r = host.api("/api/strategies/ctl/disable", "POST")
    assert r.status_code == 200 and r.get_json()["status"] == "disabled"
    assert wait_strategy(host, "ctl", status="disabled")["version"] is None
    refused = host.post(alert(strategy="ctl", alert_id="c2", tradingsymbol="OTHER"))
    assert refused.status_code == 423 and "disabled" in refused.get_json()["reason"]
    exited = host.post(alert("EXIT", strategy="ctl", alert_id="c3"))
    assert exited.status_code == 200 and len(exited.get_json()["orders"]) == 1  # exits still run
    assert host.api("/api/strategies/ctl/enable", "POST").get_json()["status"] == "running"
    gen = strategies(host)["ctl"]["generation"]
    r = host.api("/api/strategies/ctl/reload", "POST")
    assert r.status_code == 200 and r.get_json()["generation"] == gen + 1
    assert host.api("/api/strategies/nope/disable", "POST").status_code == 404
    assert host.api("/api/strategies/ctl/explode", "POST").status_code == 404


def test_disabled_state_survives_a_restart(host, folder):
    write(folder, "sleeper", counting("sleeper", "1.0"))
    wait_strategy(host, "sleeper", status="running")
    host.api("/api/strategies/sleeper/disable", "POST")
    host.restart()
    assert strategies(host)["sleeper"]["status"] == "disabled"
    assert host.post(alert(strategy="sleeper")).status_code == 423


def test_unknown_strategies_pass_through(host):
    r = host.post(alert(strategy="nobody", qty=75))
    assert r.status_code == 200 and r.get_json()["orders"][0]["qty"] == 75


def test_require_known_strategy_rejects_unknown_names(tmp_path):
    from conftest import Host, make_settings
    h = Host(make_settings(tmp_path / "v2", REQUIRE_KNOWN_STRATEGY="true")).start()
    try:
        r = h.post(alert(strategy="nobody"))
        assert r.status_code == 422 and "REQUIRE_KNOWN_STRATEGY=true" in r.get_json()["reason"]
    finally:
        h.stop()


def test_old_generations_leave_no_module_behind(host, folder):
    write(folder, "leaky", counting("leaky", "1.0"))
    wait_strategy(host, "leaky", generation=1)
    first = weakref.ref(host.runtime.strategies.live("leaky").candidate.module)
    for n in range(2, 5):
        write(folder, "leaky", counting("leaky", f"1.{n}"))
        wait_strategy(host, "leaky", generation=n)
    names = [m for m in sys.modules if m.startswith("host_plugins.strategies.leaky")]
    assert names == ["host_plugins.strategies.leaky__g4"]
    gc.collect()
    assert first() is None, gc.get_referrers(first())


def test_notifiers_get_events_and_a_failing_one_harms_nothing(host_factory, tmp_path):
    h = host_factory(breaker_limit=2)
    notifiers = h.runtime.notifiers.folder
    out = tmp_path / "got.txt"
    write(notifiers, "recorder", f'''from host import hookimpl
@hookimpl
def notifier_meta():
    return {{"name": "recorder", "version": "1", "api_version": 1}}
@hookimpl
def notifier_send(event):
    with open({str(out)!r}, "a") as f:
        f.write(event["kind"] + "\\n")
''')
    write(notifiers, "broken", '''from host import hookimpl
@hookimpl
def notifier_meta():
    return {"name": "broken", "version": "1", "api_version": 1}
@hookimpl
def notifier_send(event):
    raise ConnectionError("chat service down")
''')
    wait_for(lambda: {n["name"]: n["status"] for n in h.api("/api/notifiers").get_json()["items"]}
             == {"recorder": "running", "broken": "running"})
    assert h.post(alert()).status_code == 200
    h.settle()
    wait_for(lambda: out.exists() and "order_filled" in out.read_text())
    wait_for(lambda: {n["name"]: n["status"] for n in h.api("/api/notifiers").get_json()["items"]}["broken"]
             == "disabled")
    wait_for(lambda: "plugin_disabled" in out.read_text())


LIFECYCLE = '''
import json

@hookimpl
def strategy_validate(params):
    return [] if params["size"] > 0 else [f"size must be positive, found {params['size']}"]

@hookimpl
def strategy_start(ctx):
    ctx.state["starts"] = ctx.state.get("starts", 0) + 1

@hookimpl
def strategy_snapshot(ctx):
    return {"starts": ctx.state["starts"], "snap_by": ctx.version}

@hookimpl
def strategy_stop(ctx, reason):
    with open(LOG, "a") as f:
        f.write(json.dumps([ctx.version, reason]) + "\\n")
'''


def lifecycle(name, version, log, size=1):
    return strategy_source(name, version, f"LOG = {str(log)!r}\n" + LIFECYCLE,
                           meta_extra=f', "params": {{"size": {size}}}')


def test_strategy_snapshot_hands_state_over_and_strategy_stop_gets_the_reason(host, folder, tmp_path):
    log = tmp_path / "stops.jsonl"
    path = write(folder, "life", lifecycle("life", "1.0", log))
    wait_strategy(host, "life", generation=1)
    write(folder, "life", lifecycle("life", "2.0", log))
    wait_strategy(host, "life", generation=2)
    ctx = host.runtime.strategies.live("life").ctx
    assert ctx.state == {"starts": 2, "snap_by": "1.0"}  # v1's snapshot, then v2's start
    path.unlink()
    gone(host, "life")
    lines = [tuple(__import__("json").loads(x)) for x in log.read_text().splitlines()]
    assert lines == [("1.0", "reload"), ("2.0", "deleted")]


def test_strategy_validate_problems_stop_a_version_from_starting(host, folder, tmp_path):
    log = tmp_path / "stops.jsonl"
    write(folder, "checked", lifecycle("checked", "1.0", log))
    wait_strategy(host, "checked", generation=1)
    write(folder, "checked", lifecycle("checked", "2.0", log, size=-1))
    record = wait_for(lambda: (s := strategies(host)["checked"])["error"] and s)
    assert "strategy_validate: size must be positive, found -1" in record["error"]
    assert record["version"] == "1.0"


def test_strategy_on_clock_runs_about_every_second(host, folder):
    write(folder, "ticker", strategy_source("ticker", body='''
@hookimpl
def strategy_on_clock(ctx, now):
    ctx.state["beats"] = ctx.state.get("beats", 0) + 1
    ctx.state["tz"] = str(now.tzinfo)
'''))
    wait_strategy(host, "ticker", status="running")
    wait_for(lambda: host.runtime.strategies.live("ticker").ctx.state.get("beats", 0) >= 2, timeout=4)
    assert host.runtime.strategies.live("ticker").ctx.state["tz"] == "Asia/Kolkata"


def test_notifier_start_gets_settings_without_secrets_and_notifier_stop_the_reason(host, tmp_path):
    out = tmp_path / "notifier.jsonl"
    source = f'''import json
from host import hookimpl
@hookimpl
def notifier_meta():
    return {{"name": "NAME", "version": "1", "api_version": 1}}
@hookimpl
def notifier_start(ctx):
    with open({str(out)!r}, "a") as f:
        f.write(json.dumps(["start", ctx.name, sorted(k for k, v in ctx.settings.items() if v)]) + "\\n")
@hookimpl
def notifier_stop(reason):
    with open({str(out)!r}, "a") as f:
        f.write(json.dumps(["stop", reason]) + "\\n")
'''
    folder = host.runtime.notifiers.folder
    path = write(folder, "watcher", source.replace("NAME", "watcher"))
    wait_for(lambda: out.exists() and out.read_text().count("start") == 1)
    start = __import__("json").loads(out.read_text().splitlines()[0])
    assert start[1] == "watcher" and "BROKER" in start[2]
    assert not {"WEBHOOK_SECRET", "API_TOKEN", "DASHBOARD_PASSWORD"} & set(start[2])
    path.unlink()
    wait_for(lambda: '["stop", "deleted"]' in out.read_text())


def test_strategy_on_order_hears_of_every_change_to_its_own_orders(host, folder):
    write(folder, "listener", strategy_source("listener", body='''
@hookimpl
def strategy_on_order(ctx, order):
    ctx.state.setdefault("seen", []).append([order.id, order.status.value, order.reason])
'''))
    wait_strategy(host, "listener", status="running")
    host.broker.engine.reject_next = "RMS:Blocked for trading"
    rejected = host.post(alert(strategy="listener", alert_id="l1")).get_json()["orders"][0]["id"]
    filled = host.post(alert(strategy="listener", alert_id="l2", tradingsymbol="OTHER")).get_json()["orders"][0]["id"]
    host.post(alert(strategy="someone_else", alert_id="l3", tradingsymbol="THIRD"))  # not its order
    host.settle()
    state = lambda: host.runtime.strategies.live("listener").ctx.state.get("seen", [])
    wait_for(lambda: [s for s in state() if s[1] == "FILLED"])
    assert [rejected, "REJECTED", "RMS:Blocked for trading"] in state()
    assert {s[0] for s in state()} == {rejected, filled}


def test_the_kind_manager_holds_exactly_the_live_versions(host, folder):
    write(folder, "managed", counting("managed", "1.0"))
    wait_strategy(host, "managed", generation=1)
    write(folder, "managed", counting("managed", "2.0"))
    wait_strategy(host, "managed", generation=2)
    pm = host.runtime.strategies.pm
    assert [name for name, _ in pm.list_name_plugin()] == ["managed.g2"]
    host.post(alert(strategy="managed"))
    host.settle()
    fill = next(e for e in host.api("/api/events").get_json()["items"] if e["kind"] == "order_filled")
    assert fill["data"]["version"] == "2.0"


def test_a_notifier_whose_start_overruns_its_budget_is_stopped_when_the_start_ends(host, tmp_path):
    """Its start counted failed (past the 1 s budget), but the thread it started (the Telegram notifier's poller)
    ran on: the host said "start failed" while it polled and answered commands, and the next version polled beside
    it. Once the late start ends, the version's notifier_stop is called."""
    out = tmp_path / "slow.jsonl"
    source = f'''import json, time
from host import hookimpl
@hookimpl
def notifier_meta():
    return {{"name": "slowstart", "version": "1", "api_version": 1}}
@hookimpl
def notifier_start(ctx):
    time.sleep(1.5)
    with open({str(out)!r}, "a") as f:
        f.write(json.dumps(["started"]) + "\\n")
@hookimpl
def notifier_stop(reason):
    with open({str(out)!r}, "a") as f:
        f.write(json.dumps(["stop", reason]) + "\\n")
'''
    write(host.runtime.notifiers.folder, "slowstart", source)
    wait_for(lambda: (e := host.runtime.notifiers.entries.get("slowstart")) is not None and e.error, timeout=5)
    assert "budget" in host.runtime.notifiers.entries["slowstart"].error
    wait_for(lambda: out.exists() and "stop" in out.read_text(), timeout=5)
    lines = [__import__("json").loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == ["started"] and lines[1][0] == "stop" and "never went live" in lines[1][1]
    assert host.runtime.notifiers.entries["slowstart"].live is None


@pytest.mark.parametrize("kind", ["notifier", "strategy"])
def test_a_start_that_raises_after_starting_a_thread_has_that_thread_stopped(host, tmp_path, kind):
    """A start that raised within its budget was retired without its stop hook: the thread it had begun (a
    notifier's poller, a strategy's feed reader) ran on beside the next version, the host saying "start failed"."""
    out = tmp_path / "threads.jsonl"
    body = f'''import json, threading
from host import hookimpl
RUN = threading.Event()
def _poll():
    while not RUN.wait(0.02):
        pass
    with open({str(out)!r}, "a") as f:
        f.write(json.dumps(["thread ended"]) + "\\n")
@hookimpl
def {kind}_meta():
    return {{"name": "halfstart", "version": "1", "api_version": 1}}
@hookimpl
def {kind}_start(ctx):
    threading.Thread(target=_poll, daemon=True).start()
    raise RuntimeError("the token was refused")
@hookimpl
def {kind}_stop({"ctx, " if kind == "strategy" else ""}reason):
    with open({str(out)!r}, "a") as f:
        f.write(json.dumps(["stop", reason]) + "\\n")
    RUN.set()
'''
    registry = host.runtime.notifiers if kind == "notifier" else host.runtime.strategies
    write(registry.folder, "halfstart", body)
    wait_for(lambda: (e := registry.entries.get("halfstart")) is not None and e.error, timeout=5)
    assert "the token was refused" in registry.entries["halfstart"].error
    wait_for(lambda: out.exists() and "thread ended" in out.read_text(), timeout=5)
    lines = [__import__("json").loads(line) for line in out.read_text().splitlines()]
    assert lines[0][0] == "stop" and "the token was refused" in lines[0][1] and "never went live" in lines[0][1]
    assert registry.entries["halfstart"].live is None


def test_a_plugins_market_exit_moves_its_own_resting_stop(host_factory):
    """Review: a plugin's market EXIT of its whole position answered "exit orders already cover the whole position"
    while its own stop rested far away (the fill_follower example places one): the strategy asked to be out and
    stayed in. Its hooks' market exits move its resting exits towards the market, as its alerts' do."""
    h = host_factory()
    write(h.runtime.strategies.folder, "stopper", strategy_source("stopper", body='''
@hookimpl
def strategy_on_tick(ctx, tick):
    held = ctx.position(tick.exchange, tick.symbol)
    if held and tick.ltp >= Decimal("45") and not ctx.state.get("out"):
        ctx.state["out"] = True
        return Intent(tick.exchange, tick.symbol, Side.SELL, held, OrderType.MKT, Product.NRML,
                      action=ExecutionType.EXIT)
    return None
''', meta_extra=f', "symbols": ["NFO:{SYMBOL}"]'))
    wait_strategy(h, "stopper", status="running")
    h.tick("40")
    assert h.post(alert(strategy="stopper", direction="BUY", qty=50, price="40")).status_code == 200
    wait_for(lambda: h.net("stopper") == 50)
    stop = h.post(alert("EXIT", strategy="stopper", direction="SELL", qty=50, order_type="SL-MKT", price=None,
                        trigger_price="30"))
    [stop_id] = [o["id"] for o in stop.get_json()["orders"]]
    wait_for(lambda: [o for o in h.orders(status="OPEN") if o["id"] == stop_id])
    h.tick("45")  # the hook's market exit: the stop covers the position, so it is moved to the market (the paper
    wait_for(lambda: h.net("stopper") == 0, timeout=8)  # broker refuses to make it a limit: cancelled, then exited)
    assert [o["status"] for o in h.orders() if o["id"] == stop_id] == ["CANCELLED"]
