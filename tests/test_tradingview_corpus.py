"""Every payload in the shared TradingView corpus, sent to a real `strategy-host run` (gunicorn, paper mode)."""
from __future__ import annotations

import filecmp
from decimal import Decimal
import json
from pathlib import Path

import pytest
import requests

from conftest import wait_for
from serverproc import ServerProcess

HERE = Path(__file__).parent
VENDORED = HERE / "corpus" / "tradingview"
SHARED = HERE.parent.parent / "shared" / "corpus" / "tradingview"
PRICES = {"NIFTY28APR26C24500": "42.5", "NIFTY28APR26P23500": "40", "NIFTY29DEC26F": "26120", "INFY-EQ": "1500"}

TARGETS = {"05-": 75, "06-": 75, "07-": -75, "08-": 0}

pytestmark = pytest.mark.slow


def net(s: ServerProcess, strategy: str, symbol: str = "NIFTY29DEC26F") -> int:
    return sum(p["net_qty"] for p in s.api("/api/positions").json()["items"]
               if (p["strategy"], p["symbol"]) == (strategy, symbol))


def test_the_vendored_corpus_is_the_shared_one():
    """The tests carry a copy (CI may run without ../shared); it must not drift from the shared corpus."""
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: the shared corpus should sit beside the project")
    cmp = filecmp.dircmp(SHARED, VENDORED)
    assert not (cmp.left_only or cmp.right_only or cmp.diff_files), (cmp.left_only, cmp.right_only, cmp.diff_files)


def test_every_corpus_payload_gets_its_answer(tmp_path):
    expect = json.loads((VENDORED / "expect.json").read_text())
    files = sorted(p for p in VENDORED.iterdir() if p.name not in ("expect.json", "README.md"))
    assert set(p.name for p in files) == set(expect), "every corpus file has an expected answer"
    # 09- is an MIS entry: after the square-off time (15:15 IST on a trading day) it would be refused
    s = ServerProcess(tmp_path, env={"SQUARE_OFF_TIME": "off"}).start()
    try:
        secret = s.secrets()["WEBHOOK_SECRET"]
        ticks = [{"exchange": "NSE" if sym.endswith("-EQ") else "NFO", "symbol": sym, "ltp": ltp}
                 for sym, ltp in PRICES.items()]
        assert s.api("/api/paper/ticks", "POST", json=ticks).status_code == 200
        answers = {}
        for path in files:
            text = path.read_text().replace("CORPUS-SECRET", secret)
            kind = "application/json" if path.suffix == ".json" else "text/plain"
            r = requests.post(s.url + "/webhook", data=text.encode(), headers={"Content-Type": kind}, timeout=10)
            answers[path.name] = r
            want = expect[path.name]["status"]
            assert r.status_code == want, (path.name, expect[path.name]["why"], r.text)
            assert r.headers["Content-Type"].startswith("application/json"), path.name
            if path.name[:3] in TARGETS:  # each target is reached before the next one is sent
                wait_for(lambda: net(s, "ema_trend_pos") == TARGETS[path.name[:3]], timeout=5)
        assert "qty" in answers["11-unsubstituted-placeholder.json"].json()["errors"][0]["field"]
        assert "JSON" in answers["15-plain-text.txt"].json()["error"]
        assert answers["12-nse-equity-ticker.json"].json()["orders"][0]["symbol"] == "INFY-EQ"
        assert "already at target" in answers["06-position-long-float-text.json"].json()["reason"]
        mkt = answers["01-seed-entry-mkt-price-0.json"].json()["orders"]
        assert [o["order_type"] for o in mkt] == ["MKT", "LMT"] and mkt[0]["price"] is None
        # the strategy-alert files, in order: long 75, again, reverse to short 75, flat
        def ema_orders():
            return [o for o in s.api("/api/orders").json()["items"] if o["strategy"] == "ema_trend_pos"]
        wait_for(lambda: len(ema_orders()) == 4 and all(o["status"] == "FILLED" for o in ema_orders()), timeout=8)
        flows = [(o["side"], o["qty"]) for o in reversed(ema_orders())]
        assert flows == [("BUY", 75), ("SELL", 75), ("SELL", 75), ("BUY", 75)]
        assert net(s, "ema_trend_pos") == 0
        # 09 is sent after the ema files: their fills do not say its order has reached the broker yet
        wait_for(lambda: net(s, "bn_breakout") == -75, timeout=5)
        # 14: the stop, target and trailing travel with the entry: once it fills, the stop rests at the broker
        assert answers["14-with-stop-and-target.json"].json()["status"] == "accepted"
        assert s.api("/api/paper/ticks", "POST", json=[{"exchange": "NFO", "symbol": "NIFTY29DEC26F",
                                                        "ltp": "26100"}]).status_code == 200
        [guarded] = wait_for(lambda: [p for p in s.api("/api/positions").json()["items"]
                                      if p["strategy"] == "protected_entry" and p["stop_orders"]
                                      and p["stop_orders"][0]["status"] == "OPEN"], timeout=8)
        assert guarded["net_qty"] == 75 and Decimal(str(guarded["target"])) == Decimal("26300")
        assert Decimal(str(guarded["stop_orders"][0]["trigger_price"])) >= Decimal("26000")  # trails by 20 points
        assert guarded["trailing"]["type"] == "POINTS"
        assert "Traceback" not in s.output()
    finally:
        s.stop()
