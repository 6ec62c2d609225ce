"""What the dashboard's live refresh costs: each panel's HTML under gunicorn, against a bare Flask floor.

Usage: python bench/dashboard_panels.py [--orders N] [--rounds R] [--alerts A] [--short]
Loads a busy day through the webhook (N orders: 20 strategies x 5 symbols entering and exiting,
so 100 positions), logs in like a browser, then fetches every panel R times (what one open page
does every 2 s). Prints p50/p99 per panel beside the floor (a bare Flask JSON route on
the same gunicorn settings), and the webhook's p50 with and without 4 dashboards polling.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path

import requests

from webhook_latency import SECRET, free_port, measure, pct, run_senders, start_bare, start_host, wait_up

SYMBOLS = ("NIFTY28APR26C24500", "NIFTY28APR26P24500", "NIFTY28APR26C25000", "NIFTY28APR26P24000",
           "NIFTY28APR26C24000")


def busy_day(orders: int) -> list[list[bytes]]:
    """Rounds of alerts: every strategy enters each symbol, then exits it, and again."""
    pairs = [(f"strategy{s}", sym) for s in range(20) for sym in SYMBOLS]
    rounds = []
    for r in range(max(1, orders // len(pairs)) | 1):  # an odd number of rounds ends with positions open
        entry = r % 2 == 0
        rounds.append([json.dumps({"secret_key": SECRET, "execution_type": "ENTRY" if entry else "EXIT",
                                   "strategy_name": name, "exchange": "NFO",
                                   "legs": [{"tradingsymbol": sym, "direction": "BUY" if entry else "SELL",
                                             "qty": "75", "order_type": "LMT", "price": "42.5",
                                             "product_type": "M"}]}).encode() for name, sym in pairs])
    return rounds

PANELS = ("status", "pnl", "positions?open=1", "orders?today=1&limit=10&compact=1", "events?limit=15", "orders",
          "alerts", "plugins?kind=strategy", "risk")


def logged_in(port: int) -> requests.Session:
    s = requests.Session()
    html = s.get(f"http://127.0.0.1:{port}/login", timeout=10).text
    token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    r = s.post(f"http://127.0.0.1:{port}/login", data={"password": "bench-password", "csrf_token": token},
               allow_redirects=False, timeout=10)
    assert r.status_code == 302, r.text
    return s


def timed(session: requests.Session, url: str, rounds: int, gap_s: float = 0.0) -> list[float]:
    out = []
    for _ in range(rounds):
        time.sleep(gap_s)  # under the dashboard's 20 refreshes a second per session
        t = time.perf_counter()
        r = session.get(url, timeout=10)
        out.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, (url, r.status_code)
    return out


def with_dashboards(port: int, n: int, pause: float, work):
    """Run work() while n open overview pages refresh their 5 panels every `pause` seconds."""
    stop = threading.Event()

    def page() -> None:
        sess = logged_in(port)
        while not stop.is_set():
            for name in PANELS[:5]:
                sess.get(f"http://127.0.0.1:{port}/panel/{name}", timeout=10)
            stop.wait(pause)
    pages = [threading.Thread(target=page) for _ in range(n)]
    for p in pages:
        p.start()
    try:
        return work()
    finally:
        stop.set()
        for p in pages:
            p.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--orders", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--alerts", type=int, default=300, help="webhook alerts timed beside each dashboard load")
    ap.add_argument("--short", action="store_true", help="50 orders, 10 rounds, 20 alerts: for CI (it checks that "
                                                          "the bench runs)")
    args = ap.parse_args()
    if args.short:
        args.orders, args.rounds, args.alerts = 50, 10, 20
    hp, bp = free_port(), free_port()
    with tempfile.TemporaryDirectory() as work:
        host, bare = start_host(Path(work), hp), start_bare(bp)
        try:
            wait_up(hp)
            wait_up(bp)
            for bodies in busy_day(args.orders):
                _, _, statuses = run_senders(hp, bodies, 8)
                assert set(statuses) == {200}, set(statuses)
                time.sleep(1.0)  # the round fills before its exits come
            floor = timed(requests.Session(), f"http://127.0.0.1:{bp}/healthz", args.rounds, gap_s=0.05)
            f50 = statistics.median(floor)
            print(f"floor: bare Flask GET on the same gunicorn  p50 {f50:.2f} ms  p99 {pct(floor, 99):.2f} ms")
            s = logged_in(hp)
            for name in PANELS:
                t = timed(s, f"http://127.0.0.1:{hp}/panel/{name}", args.rounds, gap_s=0.05)
                print(f"panel {name:26s} p50 {statistics.median(t):6.2f} ms ({statistics.median(t) / f50:4.1f}x)"
                      f"  p99 {pct(t, 99):6.2f} ms")
            quiet = measure(hp, "quiet", args.alerts, 1)
            print(f"webhook with no dashboard open{'':24s} p50 {quiet['p50'] * 1000:6.2f} ms  p99 {quiet['p99'] * 1000:6.2f} ms")
            for label, pause in (("4 overview pages open (every 2 s)", 2.0),
                                 ("4 pages refreshing nonstop (429 past 20/s)", 0.0)):
                busy = with_dashboards(hp, 4, pause, lambda: measure(hp, f"b{int(pause)}", args.alerts, 1))
                print(f"webhook with {label:42s} p50 {busy['p50'] * 1000:6.2f} ms  p99 {busy['p99'] * 1000:6.2f} ms"
                      f"  ({busy['p50'] / quiet['p50']:.2f}x)")
        finally:
            for p in (host, bare):
                p.terminate()
                p.wait(10)


if __name__ == "__main__":
    main()
