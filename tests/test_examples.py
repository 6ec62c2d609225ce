"""The example plugins shipped in plugins/, driven through the engine on the paper broker."""
from __future__ import annotations

from pathlib import Path


from conftest import alert, wait_for
from plugin_files import wait_strategy

EXAMPLES = Path(__file__).resolve().parent.parent / "plugins"


def install(host, kind: str, name: str, replace: tuple[str, str] = ("", "")) -> None:
    folder = host.runtime.strategies.folder if kind == "strategies" else host.runtime.notifiers.folder
    folder.mkdir(parents=True, exist_ok=True)
    text = (EXAMPLES / kind / f"{name}.py").read_text().replace(*replace)
    (folder / f"{name}.py").write_text(text)


def test_passthrough_example_executes_legs_as_given(host):
    install(host, "strategies", "passthrough")
    wait_strategy(host, "passthrough", status="running", version="1.0")
    r = host.post(alert(strategy="passthrough", direction="BUY", qty=25, price="42.5"))
    order = r.get_json()["orders"][0]
    assert (order["side"], order["qty"], order["strategy_version"]) == ("BUY", 25, "1.0")


def _ticks(host, prices):
    """One at a time: ma_cross sees each price before the next is sent (a busy strategy is given only a
    symbol's latest tick, so prices sent back to back can coalesce and the averages never cross)."""
    for p in prices:
        host.tick(str(p), symbol="NIFTYBEES-EQ", exchange="NSE")
        wait_for(lambda: (live := host.runtime.strategies.live("ma_cross")) is not None
                 and live.ctx.state.get("prices", [])[-1:] == [str(p)], timeout=5)


NEVER = ('"exit_at": "15:10"', '"exit_at": "24:00"')  # "HH:MM" >= "24:00" never: no exit by the clock at any hour


def test_ma_cross_enters_on_a_cross_and_exits_at_its_stop(host):
    install(host, "strategies", "ma_cross", replace=NEVER)  # after 15:10 IST its clock hook would exit first
    wait_strategy(host, "ma_cross", status="running")
    _ticks(host, [100, 99, 98, 97, 96, 95])  # falling: no cross yet
    assert host.orders() == []
    _ticks(host, [99, 104])  # the fast average crosses above the slow one
    wait_for(lambda: host.net("ma_cross", "NIFTYBEES-EQ") == 10)
    entry = host.orders(strategy="ma_cross")[0]
    assert entry["side"] == "BUY" and entry["product"] == "I" and entry["action"] == "ENTRY"
    _ticks(host, [104.5, 103])  # 103 is within 1 % of the entry at 104: held
    assert host.net("ma_cross", "NIFTYBEES-EQ") == 10
    _ticks(host, [102.9])  # under the stop at 102.96
    wait_for(lambda: host.net("ma_cross", "NIFTYBEES-EQ") == 0)
    assert [o["action"] for o in host.orders(strategy="ma_cross")] == ["EXIT", "ENTRY"]


def test_ma_cross_exits_at_its_time(host):
    install(host, "strategies", "ma_cross", replace=('"exit_at": "15:10"', '"exit_at": "00:00"'))
    wait_strategy(host, "ma_cross", status="running")
    _ticks(host, [100, 99, 98, 97, 96, 95, 99, 104])
    # the clock hook runs every second and finds the exit time passed: the entry is closed at once
    wait_for(lambda: [o["action"] for o in host.orders(strategy="ma_cross") if o["status"] == "FILLED"]
             == ["EXIT", "ENTRY"], timeout=5)
    assert host.net("ma_cross", "NIFTYBEES-EQ") == 0


def test_ma_cross_remembers_its_prices_across_a_restart(host):
    install(host, "strategies", "ma_cross")
    wait_strategy(host, "ma_cross", status="running")
    _ticks(host, [100, 99, 98])
    host.restart()
    assert host.runtime.strategies.live("ma_cross").ctx.state["prices"] == ["100", "99", "98"]


def test_fill_follower_places_a_stop_when_its_entry_fills(host):
    install(host, "strategies", "fill_follower")
    wait_strategy(host, "fill_follower", status="running")
    host.tick("100")
    r = host.post(alert(strategy="fill_follower", direction="BUY", qty=50, order_type="MKT", price=None))
    assert r.status_code == 200
    stop = wait_for(lambda: next((o for o in host.orders(strategy="fill_follower") if o["order_type"] == "SL-MKT"), None))
    assert (stop["side"], stop["qty"], stop["trigger_price"], stop["action"]) == ("SELL", 50, "95", "EXIT")
    host.tick("94.5")
    wait_for(lambda: host.net("fill_follower") == 0)
    wait_for(lambda: host.runtime.strategies.live("fill_follower").ctx.state.get("closed_trades") == 1)


def test_log_notifier_logs_every_event(host, caplog):
    install(host, "notifiers", "log")
    wait_for(lambda: [n["status"] for n in host.api("/api/notifiers").get_json()["items"]] == ["running"])
    with caplog.at_level("INFO", logger="notifier.log"):
        host.post(alert())
        host.settle()
        wait_for(lambda: any("[order_filled]" in r.getMessage() for r in caplog.records))
