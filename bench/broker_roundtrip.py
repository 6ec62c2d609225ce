"""Alert-to-broker-ack latency through the Shoonya adapter, against a bare NorenRestApiPy place_order.

Usage: python bench/broker_roundtrip.py [--orders N] [--short]
Starts `strategy-host sim` and `strategy-host run` (BROKER=shoonya, token session) on loopback, sends
N webhook alerts spaced under the 10 orders/s limiter, and times each from the alert's arrival to
the broker's acknowledgement (the order's first status after SUBMITTED). The floor is one bare
NorenRestApiPy place_order against the same simulator, timed in the same run at the same pace: one
bare call halfway between two alerts. A call made right after another is much quicker than one made
after a pause (the machine's cores and threads are awake), so the floor made back to back is printed
as well, for reference, but the aim is judged against the floor made at the alerts' pace.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

TOKEN, UID = "bench-token", "FA00001"
GAP_S = 0.15  # between two alerts: under the host's 10 orders/s limiter
SYMBOL = "NIFTY28APR26C24500"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, headers: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # the host's own reason, not a traceback
        raise SystemExit(f"{url} answered {e.code}: {e.read().decode(errors='replace')}") from None


def wait_up(url: str) -> None:
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--orders", type=int, default=50)
    ap.add_argument("--short", action="store_true", help="5 orders: for CI (it checks that the bench runs)")
    args = ap.parse_args()
    if args.short:
        args.orders = 5
    work = Path(tempfile.mkdtemp(prefix="bench-broker-"))
    sim_port, ws_port, host_port = free_port(), free_port(), free_port()
    api_url = f"http://127.0.0.1:{sim_port}/NorenWClientAPI/"
    sim = subprocess.Popen([sys.executable, "-m", "host", "sim", "--port", str(sim_port), "--ws-port", str(ws_port),
                            "--session", f"{UID}:{TOKEN}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    env = {**os.environ, "BROKER": "shoonya", "SHOONYA_AUTH": "token", "USER_ID": UID, "SHOONYA_ACCESS_TOKEN": TOKEN,
           "SHOONYA_API_URL": api_url, "SHOONYA_WS_URL": f"ws://127.0.0.1:{ws_port}/NorenWSAPI/",
           "SHOONYA_SYMBOLS_URL": f"http://127.0.0.1:{sim_port}/", "WEBHOOK_SECRET": "bench-webhook-secret",
           "API_TOKEN": "bench-api-token-0123456789", "DASHBOARD_PASSWORD": "bench-password", "LOG_LEVEL": "WARNING",
           "SQUARE_OFF_TIME": "off", "SHOONYA_PREOPEN_CHECK": "off",
           "ALLOW_AMO": "true"}  # any hour: outside the session the entries go as after-market orders, same path
    host = None
    try:
        wait_up(f"http://127.0.0.1:{sim_port}/authorize")
        post(f"http://127.0.0.1:{sim_port}/sim/control",
             json.dumps({"action": "tick", "exchange": "NFO", "symbol": SYMBOL, "ltp": "42.5"}).encode())
        # the bare floor's calls come between the host's, and back to back at the end: the simulator's limit of
        # 10 order messages a second would refuse some (the host keeps under it by itself)
        post(f"http://127.0.0.1:{sim_port}/sim/control", json.dumps({"action": "ops_limit", "per_s": 0}).encode())
        host = subprocess.Popen([sys.executable, "-m", "host", "run", "--port", str(host_port)], cwd=work, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_up(f"http://127.0.0.1:{host_port}/healthz")
        time.sleep(1.0)
        from NorenRestApiPy.NorenApi import NorenApi
        api = NorenApi(host=api_url, websocket="ws://127.0.0.1:1/")
        api.injectOAuthHeader(TOKEN, UID, UID)

        def bare(remarks: str) -> float:
            t0 = time.perf_counter()
            api.place_order("B", "M", "NFO", SYMBOL, 75, 0, "LMT", price=40.0, remarks=remarks)
            return time.perf_counter() - t0
        floor, sent = [], {}
        for i in range(args.orders):  # resting limit orders: the ack is the broker's answer, not a fill
            body = {"secret_key": "bench-webhook-secret", "execution_type": "ENTRY", "strategy_name": f"b{i}",
                    "exchange": "NFO", "legs": [{"tradingsymbol": SYMBOL, "direction": "BUY", "qty": 75,
                                                 "order_type": "LMT", "price": "40", "product_type": "M"}]}
            sent[f"b{i}"] = time.time()
            post(f"http://127.0.0.1:{host_port}/webhook", json.dumps(body).encode())
            time.sleep(GAP_S / 2)
            floor.append(bare(f"floor-{i}"))  # the same pause before it as before each alert's order
            time.sleep(GAP_S / 2)
        time.sleep(1.0)
        db = sqlite3.connect(str(work / "var" / "host.sqlite"))
        rows = db.execute("select a.strategy, a.received_at, min(h.at) from alerts a join orders o on o.alert_id = "
                          "a.id join order_history h on h.order_id = o.id and h.status in ('OPEN','PARTIAL','FILLED') "
                          "group by a.id").fetchall()
        ours = [(datetime.fromisoformat(h) - datetime.fromisoformat(a)).total_seconds() for _, a, h in rows]
        # from the moment the client sent the alert: the HTTP receive, parsing and checks included. The ack's
        # stamp is cut to its millisecond: half of one is added back, the mean of what the cut takes off
        whole = [datetime.fromisoformat(h).timestamp() + 0.0005 - sent[name] for name, _, h in rows]
        hot = [bare(f"hot-{i}") for i in range(args.orders)]
    finally:
        for p in (host, sim):
            if p is not None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(30)
    ms = 1000
    print(f"orders: {len(ours)} through the host, {len(floor)} bare between them (one every {GAP_S:g} s each), "
          f"on one Noren simulator (loopback)")
    print(f"{'':32}{'host':>10}{'floor':>10}{'ratio':>8}")
    print(f"{'alert-to-ack p50 (ms)':32}{statistics.median(ours) * ms:10.2f}{statistics.median(floor) * ms:10.2f}"
          f"{statistics.median(ours) / statistics.median(floor):8.2f}x")
    print(f"{'alert-to-ack p99 (ms)':32}{pct(ours, 99) * ms:10.2f}{pct(floor, 99) * ms:10.2f}"
          f"{pct(ours, 99) / pct(floor, 99):8.2f}x")
    # the host stores whole milliseconds: a median of differences of two such times is whole (or half)
    # milliseconds too, while their mean is not biased by it (each time is cut at a random point of its ms)
    print(f"{'alert-to-ack mean (ms)':32}{statistics.fmean(ours) * ms:10.2f}{statistics.fmean(floor) * ms:10.2f}"
          f"{statistics.fmean(ours) / statistics.fmean(floor):8.2f}x")
    print(f"{'bare place_order back to back':32}{'':10}{statistics.median(hot) * ms:10.2f}   p50; mean "
          f"{statistics.fmean(hot) * ms:.2f} ms (for reference: not the alerts' pace)")
    print(f"{'client send to ack mean (ms)':32}{statistics.fmean(whole) * ms:10.2f}{statistics.fmean(floor) * ms:10.2f}"
          f"{statistics.fmean(whole) / statistics.fmean(floor):8.2f}x")
    print("host: from the alert's received_at (stamped as it is stored, after its HTTP receive and checks) to its")
    print("order's first status after SUBMITTED; 'client send' starts when the bench sends the alert.")
    aim = 1.5 * statistics.fmean(floor) + 0.001
    for label, values in (("received_at to ack", ours), ("client send to ack", whole)):
        mean = statistics.fmean(values)
        print(f"aim, on means (the stamps are whole ms, a median is biased by them): {label} {mean * ms:.2f} ms "
              f"<= 1.5 x floor + 1 ms = {aim * ms:.2f} ms: {'met' if mean <= aim else 'NOT met'} "
              f"(margin {(aim - mean) * ms:+.2f} ms)")


if __name__ == "__main__":
    main()
