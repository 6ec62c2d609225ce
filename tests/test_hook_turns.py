"""A strategy's alerts and hook intents take their turns in order while live exits wait for the broker's books.

Found in review 7 of the hook exit cap (an EXIT a hook returns waits for a read of the books made after it, as an
EXIT alert's does): a later alert was decided before an earlier hook exit and the other way round; a hook exiting
on every tick with a slow book made one read each and starved the strategy's alerts; a strategy disabled while its
intents waited still had them sent; one failing hook's intents dropped another strategy's; intents waiting at a
stop were lost without a word. Live hosts on the Noren simulator (tests/test_issue12_live.py's fixtures).
"""
from __future__ import annotations

import threading
import time
from datetime import datetime
from decimal import Decimal
from typing import Any

from conftest import SYMBOL, Host, alert, make_settings, wait_for
from host.models import ExecutionType, Intent, OrderType, Product, Side
from host.plugins.strategies import Asked
from test_issue12_live import PUT, broker_net, entry, events, live, net, wait_status  # noqa: F401  (live: fixture)

SELL = Intent("NFO", SYMBOL, Side.SELL, 75, OrderType.MKT, Product.NRML, action=ExecutionType.EXIT)
PUT_BUY = Intent("NFO", PUT, Side.BUY, 75, OrderType.LMT, Product.NRML, Decimal("43"), action=ExecutionType.ENTRY)


def _slow_reads(eng: Any, seconds: float, count: list | None = None) -> Any:
    """Each read of the books for exits takes `seconds` longer; the real read, to put back."""
    real = eng.exit_reads._read

    def slow() -> Any:
        if count is not None:
            count[0] += 1
        time.sleep(seconds)
        return real()
    eng.exit_reads._read = slow
    return real


def _hook(eng: Any, strategy: str, intent: Intent, version: str = "1") -> None:
    """A strategy's on_tick returning this intent, as the engine receives it."""
    eng.submit(lambda: eng._act(strategy, Asked(intents=(intent,), version=version), "on_tick"))


def _post(h: Host, body: dict) -> threading.Thread:
    client = h.app.test_client()
    t = threading.Thread(target=lambda: client.post("/webhook", json=body))
    t.start()
    return t


def _paper_host_long(tmp_path: Any, strategy: str) -> Host:
    """A paper host whose strategy holds 75 (stop it when done)."""
    h = Host(make_settings(tmp_path / "var")).start()
    h.tick("42.5")
    assert h.post(alert(strategy=strategy, direction="BUY", qty=75, order_type="MKT", price=None)).status_code == 200
    wait_for(lambda: h.net(strategy) == 75)
    return h


def _engine_busy(eng: Any) -> threading.Event:
    """Hold the engine in its next clock step (a slow on_clock hook, a slow reconcile) until the event is set."""
    gate, busy = threading.Event(), threading.Event()
    clock = eng._clock

    def slow_clock() -> None:
        if not busy.is_set():
            busy.set()
            gate.wait(5)
        clock()
    eng._clock = slow_clock
    busy.wait(5)
    return gate


def _decisions(eng: Any) -> list[str]:
    """The order in which the engine decides alerts and acts on hook intents, recorded as it does."""
    seen: list[str] = []
    process, act_now = eng._process_alert, eng._act_now
    eng._process_alert = lambda row, view=None: (seen.append(f"alert {row['execution_type']}"), process(row, view))[1]
    eng._act_now = lambda s, asked, src, view: (seen.append(f"hook {asked.intents[0].action.value}"),
                                               act_now(s, asked, src, view))[1]
    return seen


def test_an_alert_after_a_hooks_exit_waits_for_it_and_a_hook_after_an_alert_waits_for_that(live, sim):
    h = live(RISK_POLL_S=60)
    wait_status(h, entry(h, strategy="so", direction="BUY", qty=75, price="43"), "FILLED")
    eng = h.runtime.engine
    real = _slow_reads(eng, 1.0)
    seen = _decisions(eng)
    first = _post(h, alert(execution_type="EXIT", strategy="so", direction="SELL", qty=75, order_type="MKT",
                           price=None))
    time.sleep(0.3)
    _hook(eng, "so", SELL)  # waits behind the EXIT alert, then for a read of its own
    time.sleep(0.3)
    second = _post(h, alert(strategy="so", direction="BUY", qty=75, price="43", alert_id="so-2"))
    time.sleep(0.3)
    _hook(eng, "so", PUT_BUY)  # after the ENTRY alert
    first.join(10)
    second.join(10)
    wait_for(lambda: len(seen) == 4, timeout=10)
    eng.exit_reads._read = real
    assert seen == ["alert EXIT", "hook EXIT", "alert ENTRY", "hook ENTRY"], seen


def test_a_hook_exiting_on_every_tick_with_a_slow_book_shares_reads_and_never_starves_its_alerts(live, sim):
    h = live(RISK_POLL_S=60, ALERT_MAX_AGE_S=6)
    wait_status(h, entry(h, strategy="st", direction="BUY", qty=75, price="43"), "FILLED")
    eng = h.runtime.engine
    reads = [0]
    real = _slow_reads(eng, 0.5, reads)
    sent = None
    for n in range(40):  # 10 ticks a second for 4 s, each below the strategy's stop: an EXIT each
        _hook(eng, "st", SELL)
        if n == 5:
            sent = _post(h, alert(strategy="st", tradingsymbol=PUT, direction="BUY", qty=75, price="43",
                                  alert_id="st-entry"))
        time.sleep(0.1)
    assert sent is not None
    sent.join(10)
    row = wait_for(lambda: (r := h.runtime.storage.one("select * from alerts where client_alert_id = 'st-entry'"))
                   ["decided_at"] and r, timeout=10)
    took = (datetime.fromisoformat(row["decided_at"]) - datetime.fromisoformat(row["received_at"])).total_seconds()
    wait_for(lambda: len(events(h, "strategy_on_tick")) == 40, timeout=10)
    eng.exit_reads._read = real
    assert row["status"] == "accepted" and took < 3.0, (row, took)  # not behind 40 reads
    assert reads[0] <= 15, reads  # one read serves every intent waiting for it
    assert broker_net(sim, SYMBOL) >= 0


PLUGIN = '''from host import hookimpl

@hookimpl
def strategy_meta():
    return {"name": "dz", "version": "1.0", "api_version": 1, "symbols": [], "params": {}}
'''


def test_intents_waiting_when_their_strategy_is_disabled_are_dropped_and_said(live, sim, tmp_path):
    (tmp_path / "plugins" / "strategies").mkdir(parents=True)
    (tmp_path / "plugins" / "strategies" / "dz.py").write_text(PLUGIN)
    h = live(RISK_POLL_S=60)
    eng = h.runtime.engine
    wait_for(lambda: eng.strategies.live("dz"), timeout=5)
    wait_status(h, entry(h, strategy="dz", direction="BUY", qty=75, price="43"), "FILLED")
    real = _slow_reads(eng, 1.5)
    _hook(eng, "dz", SELL, "1.0")     # waits for its read
    _hook(eng, "dz", PUT_BUY, "1.0")  # behind it
    time.sleep(0.3)
    eng.submit(lambda: eng.strategies.set_disabled("dz", True, "disabled by test"))
    wait_for(lambda: len(events(h, "plugin_late")) == 2, timeout=8)
    eng.exit_reads._read = real
    assert h.runtime.storage.rows("select id from orders where strategy = 'dz' and symbol = ?", (PUT,)) == []
    assert "disabled or replaced while its on_tick intents waited" in events(h, "plugin_late")[0]["message"]


def test_one_strategys_failing_intents_never_drop_anothers(live, sim):
    h = live(RISK_POLL_S=60)
    eng = h.runtime.engine
    for s in ("f1", "f2"):
        wait_status(h, entry(h, strategy=s, direction="BUY", qty=75, price="43", alert_id=f"{s}-in"), "FILLED")
    real = _slow_reads(eng, 1.0)
    evaluate = eng.decider.evaluate

    def failing(db: Any, strategy: str, *a: Any, **k: Any) -> Any:
        if strategy == "f1":
            raise RuntimeError("a bug deciding f1's intents")
        return evaluate(db, strategy, *a, **k)
    eng.decider.evaluate = failing
    _hook(eng, "f1", SELL)
    _hook(eng, "f2", SELL)
    said = wait_for(lambda: len(events(h, "strategy_on_tick")) == 2 and events(h, "strategy_on_tick"), timeout=8)
    eng.exit_reads._read, eng.decider.evaluate = real, evaluate
    by = {e["strategy"]: e for e in said}
    assert "failed: the host failed on them (RuntimeError: a bug deciding f1's intents)" in by["f1"]["message"]
    assert "1 order(s)" in by["f2"]["message"], by
    wait_for(lambda: net(h, "f2", SYMBOL) == 0, timeout=5)


def test_intents_waiting_at_a_stop_are_stored_and_the_start_up_caps_and_sends_them(live, sim):
    h = live(RISK_POLL_S=60)
    eng = h.runtime.engine
    wait_status(h, entry(h, strategy="sx", direction="BUY", qty=75, price="43"), "FILLED")
    _slow_reads(eng, 3.0)
    _hook(eng, "sx", SELL)
    time.sleep(0.3)  # its read is under way
    h.stop()
    [stored] = h.runtime.storage.rows("select * from orders where strategy = 'sx' and action = 'EXIT'")
    assert stored["status"] == "NEW" and stored["qty"] == 75, stored
    h.restart()
    wait_status(h, stored["id"], "FILLED", timeout=10)
    assert broker_net(sim, SYMBOL) == 0


def test_paper_hook_exits_act_at_once_without_a_read(tmp_path):
    h = _paper_host_long(tmp_path, "pp")
    try:
        eng = h.runtime.engine
        asked: list = []
        real_ask = eng.exit_reads.ask
        eng.exit_reads.ask = lambda k: (asked.append(k), real_ask(k))[1]
        held: list = []
        eng.submit(lambda: (eng._act("pp", Asked(intents=(SELL,), version="1"), "on_tick"),
                            held.append(list(eng._hooks_in))))
        said = wait_for(lambda: events(h, "strategy_on_tick"), timeout=2)
        wait_for(lambda: h.net("pp") == 0, timeout=3)
        assert held == [[]] and asked == [] and "1 order(s)" in said[0]["message"]
    finally:
        h.stop()
