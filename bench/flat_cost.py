"""Cost per alert across a busy day: the 10,000th alert of a day must cost what the 10th does.

Usage: python bench/flat_cost.py [--alerts N] [--block B] [--concurrency C] [--short]
Sends N alerts (ADJUST, 20 strategies on one symbol, alternately buying and selling, so positions stay
few while orders, fills and the trail grow) to `strategy-host run` (paper), and prints the webhook p50
and p99 of each block of B alerts, then the last block's p50 over the first's (flat: close to 1).
--short: 2,000 alerts in blocks of 200, for CI (it checks that the bench runs, not how fast).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import tempfile
import time
from pathlib import Path

from webhook_latency import SECRET, free_port, pct, run_senders, start_host, wait_up

STRATEGIES = 20


def body(i: int) -> bytes:
    side = "BUY" if (i // STRATEGIES) % 2 == 0 else "SELL"
    return json.dumps({"secret_key": SECRET, "execution_type": "ADJUST", "strategy_name": f"day{i % STRATEGIES}",
                       "alert_id": f"a{i}", "exchange": "NFO",
                       "legs": [{"tradingsymbol": "NIFTY28APR26C24500", "direction": side, "qty": "75",
                                 "order_type": "LMT", "price": "42.5", "product_type": "M"}]}).encode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alerts", type=int, default=20000)
    ap.add_argument("--block", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=1, help="senders (1: each latency is one alert's cost)")
    ap.add_argument("--short", action="store_true", help="2,000 alerts in blocks of 200: for CI")
    args = ap.parse_args()
    if args.short:
        args.alerts, args.block = 2000, 200
    work = Path(tempfile.mkdtemp(prefix="bench-flat-"))
    port = free_port()
    host = start_host(work, port)
    blocks = []
    try:
        wait_up(port)
        for start in range(0, args.alerts, args.block):
            lat, wall, statuses = run_senders(port, [body(i) for i in range(start, min(start + args.block, args.alerts))],
                                              args.concurrency)
            bad = sum(1 for s in statuses if s != 200)
            blocks.append((start, pct(lat, 50), pct(lat, 99), len(lat) / wall, bad))
            print(f"alerts {start + 1:>6}-{start + len(lat):<6} p50 {pct(lat, 50) * 1000:7.2f} ms  "
                  f"p99 {pct(lat, 99) * 1000:7.2f} ms  {len(lat) / wall:6.0f}/s  non-200: {bad}", flush=True)
        time.sleep(1.0)
    finally:
        os.killpg(host.pid, signal.SIGTERM)
        host.wait(30)
    db = sqlite3.connect(str(work / "var" / "host.sqlite"))
    sizes = {t: db.execute(f"select count(*) from {t}").fetchone()[0] for t in ("alerts", "orders", "fills",
                                                                               "order_history", "events", "positions")}
    db.close()
    first, last = blocks[0][1], blocks[-1][1]
    print(f"rows at the end: {', '.join(f'{t} {n}' for t, n in sizes.items())}")
    print(f"last block p50 / first block p50: {last / first:.2f}x (flat: about 1)")


if __name__ == "__main__":
    main()
