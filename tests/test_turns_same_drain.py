"""Found in review 8 (fixed; each test here failed on the code before the fix).

an alert handed over and a hook's intents delivered while the engine is busy after its poll (a clock
hook, a slow reconcile) come in one drain: the hook acts in _handle, before the alert that came first is decided
in _process_alerts (_act checks _held from the last pass; the alert is only appended)."""
from __future__ import annotations
import threading, time
from conftest import SYMBOL, Host, alert, make_settings, wait_for
from host.models import ExecutionType, Intent, OrderType, Product, Side
from host.plugins.strategies import Asked
from test_hook_turns import _decisions, _engine_busy, _paper_host_long

SELL = Intent("NFO", SYMBOL, Side.SELL, 75, OrderType.MKT, Product.NRML, action=ExecutionType.EXIT)


def test_alert_then_hook_in_one_drain_keep_their_order(tmp_path):
    h = _paper_host_long(tmp_path, "pp")
    try:
        eng = h.runtime.engine
        seen = _decisions(eng)
        gate = _engine_busy(eng)  # after its poll (an on_clock hook, a slow reconcile, ...)
        client = h.app.test_client()
        t = threading.Thread(target=lambda: client.post("/webhook", json=alert(
            strategy="pp", direction="SELL", qty=75, order_type="MKT", price=None, execution_type="EXIT")))
        t.start()                    # 1st: the EXIT alert, stored and handed over
        wait_for(lambda: h.runtime.storage.one("select id from alerts where strategy='pp' and execution_type='EXIT'"))
        time.sleep(0.1)
        BUY = Intent("NFO", SYMBOL, Side.BUY, 75, OrderType.MKT, Product.NRML, action=ExecutionType.ENTRY)
        eng.submit(lambda: eng._act("pp", Asked(intents=(BUY,), version="1"), "on_tick"))  # 2nd: the hook's ENTRY
        gate.set()
        t.join(10)
        wait_for(lambda: len(seen) == 2, timeout=5)
        time.sleep(1.0)
        print("order:", seen, "net pp:", h.net("pp"))
        assert seen == ["alert EXIT", "hook ENTRY"], (seen, h.net("pp"))
    finally:
        h.stop()
