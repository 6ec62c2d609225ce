"""Memory of the host with 20 strategy plugins loaded and ticking, against a bare Flask floor.

Usage: python bench/plugin_rss.py [--plugins N] [--seconds S] [--short]
Writes N copies of plugins/strategies/ma_cross.py (each its own name and symbol), starts
`strategy-host run` (paper), waits until all N run, feeds each symbol paper ticks for S seconds
(a random walk, so the strategies enter and exit), and prints the resident memory (RSS) of the
host's processes, beside a bare Flask route under the same gunicorn settings in the same run.
--short: 5 seconds of ticks, for CI (it checks that the bench runs, not how much memory).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import tempfile
import time
from pathlib import Path

from webhook_latency import ROOT, TOKEN, free_port, start_bare, start_host, wait_up

TEMPLATE = ROOT / "plugins" / "strategies" / "ma_cross.py"


def write_plugins(folder: Path, n: int) -> list[str]:
    """n ma_cross strategies named rss00.., each on its own symbol; their symbols."""
    folder.mkdir(parents=True)
    source = TEMPLATE.read_text()
    symbols = []
    for i in range(n):
        symbol = f"RSS{i:02d}-EQ"
        text = source.replace('"name": "ma_cross"', f'"name": "rss{i:02d}"').replace(
            'EXCHANGE, SYMBOL = "NSE", "NIFTYBEES-EQ"', f'EXCHANGE, SYMBOL = "NSE", "{symbol}"')
        (folder / f"rss{i:02d}.py").write_text(text)
        symbols.append(symbol)
    return symbols


def api(port: int, path: str, method: str = "GET", body: object = None) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, json.dumps(body) if body is not None else None,
              {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    r = c.getresponse()
    data = json.loads(r.read() or b"{}")
    c.close()
    if r.status != 200:
        raise SystemExit(f"{method} {path}: {r.status} {data}")
    return data


def rss_mb(leader: int) -> tuple[float, int]:
    """Resident memory of every process in the session led by `leader` (master and workers), and their count."""
    total, count = 0, 0
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if os.getsid(int(pid)) != leader:
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except (OSError, ProcessLookupError):
            continue
        kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        total, count = total + kb, count + 1
    return total / 1024, count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plugins", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--short", action="store_true", help="5 s of ticks: for CI")
    args = ap.parse_args()
    if args.short:
        args.seconds = 5.0
    work = Path(tempfile.mkdtemp(prefix="bench-rss-"))
    symbols = write_plugins(work / "plugins" / "strategies", args.plugins)
    port, bare_port = free_port(), free_port()
    host, bare = start_host(work, port), start_bare(bare_port, work)
    try:
        wait_up(port)
        wait_up(bare_port)
        deadline = time.monotonic() + 30
        while True:
            running = [s for s in api(port, "/api/strategies")["items"]
                       if s["name"].startswith("rss") and s["status"] == "running"]
            if len(running) == args.plugins:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(running)} of {args.plugins} strategies running after 30 s")
            time.sleep(0.2)
        loaded, _ = rss_mb(host.pid)
        rng = random.Random(17)
        prices = {s: 100.0 for s in symbols}
        ticks = 0
        t_end = time.monotonic() + args.seconds
        peak = loaded
        while time.monotonic() < t_end:
            for s in symbols:
                prices[s] = max(1.0, prices[s] * (1 + rng.uniform(-0.004, 0.004)))
            api(port, "/api/paper/ticks", "POST", [{"exchange": "NSE", "symbol": s, "ltp": f"{p:.2f}"}
                                                  for s, p in prices.items()])
            ticks += len(symbols)
            peak = max(peak, rss_mb(host.pid)[0])
            time.sleep(0.05)
        orders = len(api(port, "/api/orders?limit=1000")["items"])
        ticking, processes = rss_mb(host.pid)
        peak = max(peak, ticking)
        floor, _ = rss_mb(bare.pid)
    finally:
        for p in (host, bare):
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(30)
    print(f"{args.plugins} strategy plugins (ma_cross copies), {ticks} ticks over {args.seconds:g} s, "
          f"{orders} orders placed")
    print(f"{'':34}{'host':>10}{'floor':>10}")
    print(f"{'RSS, plugins loaded (MB)':34}{loaded:10.1f}")
    print(f"{'RSS, after ticking (MB)':34}{ticking:10.1f}{floor:10.1f}   ({processes} host processes; "
          f"floor: a bare Flask route, same gunicorn settings)")
    print(f"{'RSS, peak while ticking (MB)':34}{peak:10.1f}")
    print(f"aim: <= 200 MB with {args.plugins} plugins: {'met' if peak <= 200 else 'NOT met'}")


if __name__ == "__main__":
    main()
