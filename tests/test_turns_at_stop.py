"""Found in review 8 (fixed; each test here failed on the code before the fix).

at a stop, hook intents held behind an earlier alert of their strategy are stored (and sent at start-up)
ahead of that alert, which stays in the inbox and is decided after them: the strategy's order is reversed."""
from __future__ import annotations
import threading, time
from decimal import Decimal
from conftest import SYMBOL, alert, wait_for
from host.models import ExecutionType, Intent, OrderType, Product, Side
from host.plugins.strategies import Asked
from test_issue12_live import PUT, entry, live, wait_status  # noqa: F401
from test_hook_turns import _slow_reads, _hook

PUT_BUY = Intent("NFO", PUT, Side.BUY, 75, OrderType.LMT, Product.NRML, Decimal("43"), action=ExecutionType.ENTRY)


def test_stop_keeps_order_of_alert_then_hook(live, sim):
    h = live(RISK_POLL_S=60)
    wait_status(h, entry(h, strategy="sx", direction="BUY", qty=75, price="43"), "FILLED")
    eng = h.runtime.engine
    _slow_reads(eng, 3.0)
    client = h.app.test_client()
    t = threading.Thread(target=lambda: client.post("/webhook", json=alert(
        execution_type="EXIT", strategy="sx", direction="SELL", qty=75, order_type="MKT", price=None)))
    t.start()                      # 1st: the EXIT alert, waiting for its read
    wait_for(lambda: "sx" in eng._held, timeout=3)
    _hook(eng, "sx", PUT_BUY)      # 2nd: the hook's ENTRY, behind it
    wait_for(lambda: eng._hooks_in, timeout=3)
    h.stop()
    t.join(10)
    alert_row = h.runtime.storage.one("select status, decided_at from alerts where strategy='sx' and "
                                      "execution_type='EXIT'")
    hook_orders = h.runtime.storage.rows("select id, status, created_at from orders where strategy='sx' and symbol=?",
                                         (PUT,))
    print("EXIT alert:", dict(alert_row), "hook orders:", [dict(o) for o in hook_orders])
    assert not (alert_row["status"] == "received" and hook_orders), "hook's later ENTRY stored ahead of the EXIT alert"
