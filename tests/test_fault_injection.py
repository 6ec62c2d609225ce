"""Faults on purpose under gunicorn (paper mode): while alerts and ticks flow, a poison alert, a raising plugin,
unreadable positions and a full disk; after each, halt answers within 1 s, an EXIT executes within 2 s,
/healthz says what is wrong, and a breach still flattens."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests

from conftest import wait_for
from serverproc import ServerProcess

pytestmark = pytest.mark.slow
SYM = "NIFTY28APR26C24500"


class Flow:
    """Alerts and ticks flowing in the background (bounded), as a trading day would have them."""

    def __init__(self, s: ServerProcess, secret: str):
        self.s, self.secret, self.stop, self.sent = s, secret, threading.Event(), 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        deadline = time.monotonic() + 120
        n = 0
        while not self.stop.is_set() and time.monotonic() < deadline:
            n += 1
            try:
                self.s.api("/api/paper/ticks", "POST", json=[{"exchange": "NFO", "symbol": "FLOWSYM",
                                                             "ltp": str(100 + n % 5)}])
                requests.post(self.s.url + "/webhook", timeout=5, json={
                    "secret_key": self.secret, "execution_type": "ADJUST", "strategy_name": "flow", "exchange": "NFO",
                    "legs": [{"tradingsymbol": "FLOWSYM", "direction": "BUY" if n % 2 else "SELL", "qty": 1,
                              "order_type": "LMT", "price": "50", "product_type": "M"}]})
                self.sent += 1
            except requests.RequestException:
                pass
            self.stop.wait(0.1)


def _alert(secret: str, kind: str, strategy: str, side: str = "BUY", qty: int = 100) -> dict:
    return {"secret_key": secret, "execution_type": kind, "strategy_name": strategy, "exchange": "NFO",
            "legs": [{"tradingsymbol": SYM, "direction": side, "qty": qty, "order_type": "MKT", "product_type": "M"}]}


def _controls_work(s: ServerProcess, secret: str, strategy: str) -> None:
    """Halt answers within 1 s; an EXIT of an open position executes within 2 s."""
    t0 = time.monotonic()
    r = s.api("/api/halt", "POST", json={"mode": "reduce_only", "reason": "fault drill"})
    assert r.status_code == 200 and time.monotonic() - t0 < 1.0, (r.status_code, r.text, time.monotonic() - t0)
    r = requests.post(s.url + "/webhook", json=_alert(secret, "EXIT", strategy, "SELL"), timeout=5)
    assert r.status_code == 200 and r.json()["orders"], r.text
    t0 = time.monotonic()
    wait_for(lambda: s.api(f"/api/orders/{r.json()['orders'][0]['id']}").json()["status"] == "FILLED", timeout=2)
    assert s.api("/api/halt", "POST", json={"mode": "active"}).status_code == 200


def _open(s: ServerProcess, secret: str, strategy: str, qty: int = 100) -> None:
    r = requests.post(s.url + "/webhook", json=_alert(secret, "ENTRY", strategy, qty=qty), timeout=5)
    assert r.status_code == 200, r.text
    wait_for(lambda: any(p["strategy"] == strategy and p["net_qty"] == qty
                         for p in s.api("/api/positions").json()["items"]), timeout=3)


def _health(s: ServerProcess) -> requests.Response:
    return requests.get(s.url + "/healthz", timeout=5)


def _breach_flattens(s: ServerProcess, secret: str, opened: bool = False) -> None:
    if not opened:
        s.api("/api/paper/ticks", "POST", json=[{"exchange": "NFO", "symbol": SYM, "ltp": "100"}])
        _open(s, secret, "loser")
    s.api("/api/paper/ticks", "POST", json=[{"exchange": "NFO", "symbol": SYM, "ltp": "80"}])  # -2000 < -1000
    wait_for(lambda: s.api("/api/risk").json()["breached"], timeout=5)
    wait_for(lambda: all(p["net_qty"] == 0 for p in s.api("/api/positions").json()["items"]
                         if p["strategy"] == "loser"), timeout=5)


def _start(workdir: Path, data_dir: Path) -> tuple[ServerProcess, str]:
    s = ServerProcess(workdir, env={"DATA_DIR": str(data_dir), "PLUGINS_DIR": str(workdir / "plugins"),
                                    "RISK_BASE_MAX_LOSS": "-1000", "RISK_TRAIL_STEP": "0", "RISK_POLL_S": "1",
                                    "SQUARE_OFF_TIME": "off", "DISK_MIN_FREE_MB": "2"}).start()
    secret = dict(line.split("=", 1) for line in (data_dir / "secrets.env").read_text().split()
                  if "=" in line)["WEBHOOK_SECRET"]
    s.secrets = lambda: dict(l.split("=", 1) for l in (data_dir / "secrets.env").read_text().split() if "=" in l)
    return s, secret


def test_poison_alert_raising_plugin_and_blind_positions_never_switch_risk_off(tmp_path):
    s, secret = _start(tmp_path, tmp_path / "var")
    flow = Flow(s, secret)
    try:
        s.api("/api/paper/ticks", "POST", json=[{"exchange": "NFO", "symbol": SYM, "ltp": "100"}])
        flow.thread.start()
        # 1. a poison alert (a value no parser lets in today, stored by an older host) in the inbox
        _open(s, secret, "p1")
        db = sqlite3.connect(tmp_path / "var" / "host.sqlite", timeout=10)
        with db:
            db.execute("insert into alerts (id, received_at, strategy, execution_type, status, orders, body) values "
                       "(?, ?, 'p1', 'ENTRY', 'received', '[]', ?)",
                       ("apoison", datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                        json.dumps({"strategy_name": "p1", "execution_type": "ENTRY", "legs": [
                            {"exchange": "NFO", "tradingsymbol": SYM, "direction": "SELL", "qty": 75,
                             "order_type": "LMT", "product_type": "M", "price": "1e27x", "trigger_price": None}]})))
        db.close()
        wait_for(lambda: any(a["id"] == "apoison" and a["status"] == "failed"
                             for a in s.api("/api/alerts", params={"limit": 1000}).json()["items"]))
        _controls_work(s, secret, "p1")
        assert _health(s).status_code == 200, _health(s).text
        # 2. a plugin that raises on every alert
        (tmp_path / "plugins" / "strategies").mkdir(parents=True, exist_ok=True)
        (tmp_path / "plugins" / "strategies" / "boom.py").write_text(
            "from host import hookimpl\n\n@hookimpl\ndef strategy_meta():\n    return {'name': 'boom', 'version': '1', "
            "'api_version': 1}\n\n@hookimpl\ndef strategy_on_alert(ctx, alert):\n    raise RuntimeError('boom')\n")
        wait_for(lambda: any(p["name"] == "boom" for p in s.api("/api/strategies").json()["items"]), timeout=5)
        r = requests.post(s.url + "/webhook", json=_alert(secret, "ENTRY", "boom"), timeout=5)
        assert r.status_code == 503 and "boom" in r.text
        _open(s, secret, "p2")
        _controls_work(s, secret, "p2")
        # 3. the broker's positions cannot be read
        _open(s, secret, "p3")
        _open(s, secret, "loser")
        s.api("/api/paper/faults", "POST", json={"positions_unreadable": "PositionBook timed out"})
        h = wait_for(lambda: (h := _health(s)).status_code == 503 and h.json(), timeout=5)
        assert "risk is blind" in " ".join(h["problems"])
        _controls_work(s, secret, "p3")
        _breach_flattens(s, secret, opened=True)  # entries are refused while blind: the loser was in before
        assert flow.sent >= 5  # alerts and ticks kept flowing through all of it
    finally:
        flow.stop.set()
        flow.thread.join(5)
        s.stop()


def test_a_full_disk_answers_507_says_so_on_healthz_and_risk_acts_again_once_freed(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)]).returncode != 0:
        pytest.fail("this test mounts a small tmpfs as root; mount failed")
    s = None
    try:
        s, secret = _start(tmp_path, mount / "var")
        s.api("/api/paper/ticks", "POST", json=[{"exchange": "NFO", "symbol": SYM, "ltp": "100"}])
        _open(s, secret, "d1")
        _open(s, secret, "loser")
        filler = mount / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=64"], capture_output=True)
        r = requests.post(s.url + "/webhook", json=_alert(secret, "ENTRY", "d2"), timeout=5)
        assert r.status_code == 507, r.text
        h = wait_for(lambda: (h := _health(s)).status_code == 503 and h.json(), timeout=10)
        assert any("disk" in p for p in h["problems"]), h
        # the reserve keeps the emergency paths and risk working on the full disk
        _controls_work(s, secret, "d1")
        _breach_flattens(s, secret, opened=True)
        filler.unlink()
        wait_for(lambda: _health(s).status_code == 200, timeout=15)
        assert requests.post(s.url + "/webhook", json=_alert(secret, "EXIT", "d2"), timeout=5).status_code == 200
    finally:
        if s is not None:
            s.stop()
        subprocess.run(["umount", "-l", str(mount)])
