"""Found in review 8 (fixed; each test here failed on the code before the fix).

alerts found by the poll are re-numbered into rowid order among the alerts only; a hook's intents
numbered between them keep their number, so a strategy's local alert can be moved behind a hook's intents that
came after it (another strategy's alert, stored by another worker just before, was found late)."""
from __future__ import annotations
import threading, time
from decimal import Decimal
from conftest import SYMBOL, alert, wait_for
from host.models import ExecutionType, Intent, OrderType, Product, Side
from host.plugins.strategies import Asked
from test_issue12_live import PUT, entry, live, wait_status  # noqa: F401
from test_hook_turns import _slow_reads

PUT_BUY = Intent("NFO", PUT, Side.BUY, 75, OrderType.LMT, Product.NRML, Decimal("43"), action=ExecutionType.ENTRY)


def test_poll_renumber_keeps_a_strategys_order(live, sim):
    h = live(RISK_POLL_S=60)
    wait_status(h, entry(h, strategy="so", direction="BUY", qty=75, price="43"), "FILLED")
    eng = h.runtime.engine
    seen: list[str] = []
    process, act_now = eng._process_alert, eng._act_now
    eng._process_alert = lambda row, view=None: (seen.append(f"alert {row['strategy']} {row['execution_type']}"),
                                                 process(row, view))[1]
    eng._act_now = lambda s, a, src, v: (seen.append(f"hook {s} {a.intents[0].action.value}"), act_now(s, a, src, v))[1]
    real = _slow_reads(eng, 2.0)
    client = h.app.test_client()
    posts = []
    def post(body):
        t = threading.Thread(target=lambda: client.post("/webhook", json=body)); t.start(); posts.append(t)
    post(alert(execution_type="EXIT", strategy="so", direction="SELL", qty=75, order_type="MKT", price=None))
    wait_for(lambda: "so" in eng._held, timeout=3)           # its EXIT waits for the books: so's later ones queue
    gate, busy = threading.Event(), threading.Event()
    clock = eng._clock
    def slow_clock():                                        # the engine busy after its poll
        if not busy.is_set():
            busy.set(); gate.wait(5)
        clock()
    eng._clock = slow_clock
    busy.wait(5)
    hand = h.runtime.inbox.hand
    h.runtime.inbox.hand = None                              # "another worker": stored, not handed over
    post(alert(strategy="other", direction="BUY", qty=75, price="43", alert_id="w2"))
    wait_for(lambda: h.runtime.storage.one("select id from alerts where strategy='other'"))
    h.runtime.inbox.hand = hand
    post(alert(strategy="so", tradingsymbol=PUT, direction="BUY", qty=75, price="43", alert_id="so-B"))  # 1st
    wait_for(lambda: h.runtime.storage.one("select id from alerts where client_alert_id='so-B'"))
    time.sleep(0.1)
    eng.submit(lambda: eng._act("so", Asked(intents=(PUT_BUY,), version="1"), "on_tick"))           # 2nd
    gate.set()
    wait_for(lambda: len(seen) == 4, timeout=10)
    eng.exit_reads._read = real
    for t in posts:
        t.join(10)
    so = [s for s in seen if " so " in s]
    print("order:", seen)
    assert so == ["alert so EXIT", "alert so ENTRY", "hook so ENTRY"], seen
