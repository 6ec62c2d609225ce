"""Found in review 8 (fixed; each test here failed on the code before the fix).

a write that fails twice while an alert is decided (disk full: the failure's own record fails too) raises
out of _take_turns, which had emptied _alerts_in/_hooks_in: the alert stays 'received' for good (it is in _decided,
so later polls skip it) and every hook intent after it in that pass vanishes, neither acted nor failed."""
from __future__ import annotations
import sqlite3, threading, time
from conftest import SYMBOL, alert, wait_for
from host.models import ExecutionType, Intent, OrderType, Product, Side
from host.plugins.strategies import Asked
from test_issue12_live import PUT, entry, events, live, wait_status  # noqa: F401
from test_hook_turns import _engine_busy, _slow_reads

SELL = Intent("NFO", SYMBOL, Side.SELL, 75, OrderType.MKT, Product.NRML, action=ExecutionType.EXIT)


def test_a_failing_write_loses_nothing(live, sim):
    h = live(RISK_POLL_S=60)
    wait_status(h, entry(h, strategy="yy", direction="BUY", qty=75, price="43"), "FILLED")
    eng = h.runtime.engine
    st = h.runtime.storage
    gate = _engine_busy(eng)
    client = h.app.test_client()
    t = threading.Thread(target=lambda: client.post("/webhook", json=alert(
        strategy="xx", tradingsymbol=PUT, direction="BUY", qty=75, price="43", alert_id="x1")))
    t.start()                                             # xx's ENTRY alert, handed over
    wait_for(lambda: st.one("select id from alerts where client_alert_id='x1'"))
    time.sleep(0.1)
    eng.submit(lambda: eng._act("yy", Asked(intents=(SELL,), version="1"), "on_tick"))  # yy's hook EXIT after it
    fails = [0]
    process = eng._process_alert
    armed = []
    def arming(row, view=None):
        if row.get('client_alert_id') == 'x1' and not armed:
            armed.append(1)
            fails[0] = 2   # this decision's write, and the failure's own record
        return process(row, view)
    eng._process_alert = arming
    write = st.write
    def failing(fn, *a, **k):
        if threading.current_thread().name == "engine" and fails[0] > 0:
            fails[0] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return write(fn, *a, **k)
    st.write = failing
    gate.set()
    time.sleep(0.5)
    time.sleep(4.0)                                      # the disk has room again; many passes, polls, reads
    t.join(10)
    row = st.one("select status from alerts where client_alert_id='x1'")
    said = events(h, "strategy_on_tick")
    print("alert x1:", row["status"], "| yy hook events:", [e["message"] for e in said],
          "| hooks_in:", len(eng._hooks_in), "| yy exits:", st.rows("select id, status from orders where strategy='yy' "
                                                                     "and action='EXIT'"))
    assert row["status"] != "received", "alert left received for good"
    assert said, "yy's hook EXIT neither acted nor failed"
