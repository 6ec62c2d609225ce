"""Webhook latency and throughput of the host under gunicorn (paper mode), against a bare Flask floor.

Usage: python bench/webhook_latency.py [--alerts N] [--concurrency C] [--short]
Prints p50/p99 of the webhook round trip, alert-to-fill time, and alerts/s under C concurrent
senders, each beside the same figure for a bare Flask route on the same gunicorn settings: both
servers take theirs from host/gunicorn_conf.py (the bare one without the host's hooks).
--short: 100 alerts, for CI (it checks that the bench runs, not how fast).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-webhook-secret"
TOKEN = "bench-api-token-0123456789"
SETTLE_S = 0.5  # after the serial senders and after the concurrent ones, for the CPU figures
IDLE_S = 2.0  # the server's idle CPU is measured over this long (the host's loops run every 0.1 to 2 s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server on {port} did not come up")


GUNICORN_CONF = ROOT / "host" / "gunicorn_conf.py"
# the host's gunicorn settings without its hooks (they start the engine): read, not copied, so that the
# floor follows any change to the host's serving model
BARE_CONF = """import types as _types
import host.gunicorn_conf as _host
globals().update({_k: _v for _k, _v in vars(_host).items()
                  if not _k.startswith("_") and not isinstance(_v, (_types.FunctionType, _types.ModuleType))})
"""


def _env(**extra: str) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def start_host(workdir: Path, port: int, **env: str) -> subprocess.Popen:
    env = _env(WEBHOOK_SECRET=SECRET, API_TOKEN=TOKEN, DASHBOARD_PASSWORD="bench-password", LOG_LEVEL="WARNING",
               **env)
    return subprocess.Popen([sys.executable, "-m", "host", "run", "--port", str(port), "--gunicorn-conf",
                             str(GUNICORN_CONF)], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def start_bare(port: int, workdir: Path | None = None) -> subprocess.Popen:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="bench-bare-"))
    conf = workdir / "bare_gunicorn_conf.py"
    conf.write_text(BARE_CONF)
    return subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(conf), "--bind", f"127.0.0.1:{port}",
                             "--log-level", "warning", "--chdir", str(ROOT / "bench"), "bare_app:app"],
                            env=_env(BARE_DB=str(workdir / "bare.sqlite"), BENCH_SECRET=SECRET), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def body(i: int, tag: str) -> bytes:
    return json.dumps({"secret_key": SECRET, "execution_type": "ENTRY", "strategy_name": f"{tag}{i}",
                       "exchange": "NFO", "legs": [{"tradingsymbol": "NIFTY28APR26C24500", "direction": "BUY",
                                                    "qty": "75", "order_type": "LMT", "price": "42.5",
                                                    "product_type": "M"}]}).encode()


def blocked_body(i: int) -> bytes:
    """An ENTRY for a strategy holding its position already: the guard blocks it (409), so no order is made."""
    return json.dumps({**json.loads(body(0, "hold")), "alert_id": f"b{i}"}).encode()


def run_senders(port: int, bodies: list[bytes], concurrency: int,
                path: str = "/webhook") -> tuple[list[float], float, list[int]]:
    """Send every body over keep-alive connections from `concurrency` threads; latencies, wall time, statuses."""
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    index = iter(range(len(bodies)))

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while True:
            with lock:
                i = next(index, None)
            if i is None:
                break
            t0 = time.perf_counter()
            conn.request("POST", path, bodies[i], {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                statuses.append(resp.status)
        conn.close()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - t0, statuses


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def tree_usage(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) used so far by a process and its children (gunicorn's master and workers), and
    how many times their threads gave up the CPU to wait (voluntary context switches: a lock, a queue, the GIL,
    the disk, a socket): each hand-off of an alert from one thread to another costs at least one."""
    tick, parents = os.sysconf("SC_CLK_TCK"), {pid}
    stats = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats.append((int(entry), int(fields[1]), int(fields[11]) + int(fields[12])))
    grew = True
    while grew:  # descendants at any depth
        grew = False
        for own, parent, _ in stats:
            if parent in parents and own not in parents:
                parents.add(own)
                grew = True
    return sum(ticks for own, _, ticks in stats if own in parents) / tick, sum(_switches(p) for p in parents)


def _switches(pid: int) -> int:
    """Voluntary context switches of every thread of a process so far."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt")), 0)
        except OSError:
            continue
    return total


def measure(port: int, tag: str, n: int, concurrency: int, path: str = "/webhook",
            pid: Optional[int] = None) -> dict:
    """Serial p50/p99 and concurrent alerts/s; with the server's pid, its CPU per alert in the concurrent run."""
    run_senders(port, [body(i, f"{tag}warm") for i in range(50)], 1, path)  # warm up
    serial, _, st1 = run_senders(port, [body(i, f"{tag}s") for i in range(n)], 1, path)
    if pid:
        time.sleep(SETTLE_S)
        idle0 = tree_usage(pid)  # what the server spends doing nothing (the host's loops), taken off below
        time.sleep(IDLE_S)
        used0 = tree_usage(pid)
        idle_rate = [(b - a) / IDLE_S for a, b in zip(idle0, used0)]
    conc, wall, st2 = run_senders(port, [body(i, f"{tag}c") for i in range(n)], concurrency, path)
    cpu = switches = None
    if pid:
        time.sleep(SETTLE_S)  # the order life after the last answers
        cpu, switches = ((b - a - idle * (wall + SETTLE_S)) / n for a, b, idle in zip(used0, tree_usage(pid), idle_rate))
    bad = [s for s in st1 + st2 if s != 200]
    return {"p50": pct(serial, 50), "p99": pct(serial, 99), "rate": n / wall, "bad": len(bad), "cpu": cpu,
            "switches": switches}



def measure_blocked(port: int, n: int) -> dict:
    """Serial alerts that the guard blocks: the host's cost of an alert without the order life after it."""
    run_senders(port, [body(0, "hold")], 1)
    latencies, _, statuses = run_senders(port, [blocked_body(i) for i in range(n)], 1)
    bad = [s for s in statuses if s != 409]
    return {"p50": pct(latencies, 50), "p99": pct(latencies, 99), "bad": len(bad)}


def alert_to_fill(db: Path, strategy_like: str = "%") -> list[float]:
    conn = sqlite3.connect(str(db))
    rows = conn.execute("select a.received_at, min(f.at) from alerts a join orders o on o.alert_id = a.id "
                        "join fills f on f.order_id = o.id where a.strategy like ? group by a.id",
                        (strategy_like,)).fetchall()
    conn.close()
    return [(datetime.fromisoformat(f) - datetime.fromisoformat(a)).total_seconds() for a, f in rows]


def order_floor_done(db: Path, table: str = "book", done_as: str = "COMPLETE") -> tuple[int, int]:
    """A floor's orders that reached `done_as`, and all its orders, read SETTLE_S after its last answer: it did the
    work it claims within the time its CPU was measured over."""
    conn = sqlite3.connect(str(db))
    done, made = conn.execute(f"select sum(status = ?), count(*) from {table}", (done_as,)).fetchone()
    conn.close()
    return done or 0, made


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alerts", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--short", action="store_true", help="100 alerts: for CI, to keep the bench from rotting")
    args = ap.parse_args()
    if args.short:
        args.alerts = 100
    work = Path(tempfile.mkdtemp(prefix="bench-webhook-"))
    bare_port, host_port = free_port(), free_port()
    bare, host = start_bare(bare_port, work), start_host(work, host_port)
    try:
        wait_up(bare_port)
        wait_up(host_port)
        floor = measure(bare_port, "f", args.alerts, args.concurrency, pid=bare.pid)
        contract = measure(bare_port, "k", args.alerts, args.concurrency, "/webhook-contract", pid=bare.pid)
        least = measure(bare_port, "o", args.alerts, args.concurrency, "/webhook-order-floor", pid=bare.pid)
        least_done = order_floor_done(work / "bare-orders.sqlite")  # within SETTLE_S of its last answer
        checked = measure(bare_port, "c", args.alerts, args.concurrency, "/webhook-checked-floor", pid=bare.pid)
        checked_done = order_floor_done(work / "bare-checked.sqlite", "orders", "FILLED")
        records = measure(bare_port, "r", args.alerts, args.concurrency, "/webhook-records-floor", pid=bare.pid)
        records_done = order_floor_done(work / "bare-records.sqlite", "orders", "FILLED")
        ours = measure(host_port, "h", args.alerts, args.concurrency, pid=host.pid)
        time.sleep(1.0)  # let the last fills land
        fills = alert_to_fill(work / "var" / "host.sqlite")
        burst = alert_to_fill(work / "var" / "host.sqlite", "hc%")
        blocked = measure_blocked(host_port, args.alerts)
    finally:
        for p in (bare, host):
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    ms = 1000
    print(f"alerts: {args.alerts} serial + {args.alerts} with {args.concurrency} concurrent senders, keep-alive")
    print(f"{'':28}{'host':>10}{'floor':>10}{'ratio':>8}")
    print(f"{'webhook p50 (ms)':28}{ours['p50'] * ms:10.2f}{floor['p50'] * ms:10.2f}{ours['p50'] / floor['p50']:8.2f}x")
    print(f"{'webhook p99 (ms)':28}{ours['p99'] * ms:10.2f}{floor['p99'] * ms:10.2f}{ours['p99'] / floor['p99']:8.2f}x")
    print(f"{'alerts/s (concurrent)':28}{ours['rate']:10.0f}{floor['rate']:10.0f}{ours['rate'] / floor['rate']:8.2f}x")
    print(f"{'CPU per alert (ms)':28}{ours['cpu'] * ms:10.2f}{floor['cpu'] * ms:10.2f}{ours['cpu'] / floor['cpu']:8.2f}x"
          f"   (all threads, the order life included; one GIL runs the Python of them all)")
    print(f"{'thread switches per alert':28}{ours['switches']:10.1f}{floor['switches']:10.1f}   (threads that waited: "
          f"for a lock, a queue, the GIL, the disk; order-life floor {least['switches']:.1f})")
    if fills:
        print(f"{'alert-to-fill p50 (ms)':28}{statistics.median(fills) * ms:10.2f}{'':10}"
              f"{statistics.median(fills) / floor['p50']:8.2f}x of floor p50")
        print(f"{'alert-to-fill p99 (ms)':28}{pct(fills, 99) * ms:10.2f}")
    if burst:
        print(f"{'alert-to-fill p99, burst':28}{pct(burst, 99) * ms:10.2f}   ({len(burst)} alerts from "
              f"{args.concurrency} concurrent senders)")
    print("the contract's least (bare route + one durable commit + a decision on one thread), and the host")
    print("without the order life (alerts its guard blocks), each against the bare route:")
    print(f"{'contract floor p50 (ms)':28}{contract['p50'] * ms:10.2f}{floor['p50'] * ms:10.2f}"
          f"{contract['p50'] / floor['p50']:8.2f}x")
    print(f"{'contract floor p99 (ms)':28}{contract['p99'] * ms:10.2f}{floor['p99'] * ms:10.2f}"
          f"{contract['p99'] / floor['p99']:8.2f}x")
    print(f"{'contract floor alerts/s':28}{contract['rate']:10.0f}{floor['rate']:10.0f}"
          f"{contract['rate'] / floor['rate']:8.2f}x")
    print(f"{'contract floor CPU/alert (ms)':28}{contract['cpu'] * ms:10.2f}{floor['cpu'] * ms:10.2f}"
          f"{contract['cpu'] / floor['cpu']:8.2f}x")
    print("the least order life too (a batch of alerts stored, checked for duplicates, decided and their orders")
    print("persisted SUBMITTED in one durable commit, then answered and sent; acks and fills committed), no other check:")
    print(f"{'order-life floor p50 (ms)':28}{least['p50'] * ms:10.2f}{floor['p50'] * ms:10.2f}"
          f"{least['p50'] / floor['p50']:8.2f}x")
    print(f"{'order-life floor p99 (ms)':28}{least['p99'] * ms:10.2f}{floor['p99'] * ms:10.2f}"
          f"{least['p99'] / floor['p99']:8.2f}x")
    print(f"{'order-life floor alerts/s':28}{least['rate']:10.0f}{floor['rate']:10.0f}"
          f"{least['rate'] / floor['rate']:8.2f}x")
    print(f"{'order-life floor CPU/alert':28}{least['cpu'] * ms:10.2f}{floor['cpu'] * ms:10.2f}"
          f"{least['cpu'] / floor['cpu']:8.2f}x")
    print("the least order life with the host's own records (alert, order, its history, the day's count, the belief,")
    print("the SUBMITTED mark), in the same one-thread shape: without any check, then with the host's checks too")
    print("(screening, validation, duplicates, guard, risk, order checks):")
    for name, m in (("records floor", records), ("checked floor", checked)):
        for label, key in (("p50 (ms)", "p50"), ("p99 (ms)", "p99")):
            print(f"{name + ' ' + label:28}{m[key] * ms:10.2f}{floor[key] * ms:10.2f}{m[key] / floor[key]:8.2f}x")
        print(f"{name + ' alerts/s':28}{m['rate']:10.0f}{floor['rate']:10.0f}{m['rate'] / floor['rate']:8.2f}x")
        print(f"{name + ' CPU/alert':28}{m['cpu'] * ms:10.2f}{floor['cpu'] * ms:10.2f}{m['cpu'] / floor['cpu']:8.2f}x")
    print(f"{'host p50, blocked (ms)':28}{blocked['p50'] * ms:10.2f}{floor['p50'] * ms:10.2f}"
          f"{blocked['p50'] / floor['p50']:8.2f}x")
    print(f"non-200 answers: host {ours['bad']}, floor {floor['bad']}, contract floor {contract['bad']}; "
          f"order-life floor {least['bad']}; records floor {records['bad']}; checked floor {checked['bad']}; blocked alerts not answered 409: {blocked['bad']}; fills measured: "
          f"{len(fills)}; order-life floor orders filled: {least_done[0]} of {least_done[1]}; records floor's: {records_done[0]} of "
          f"{records_done[1]}; checked floor's: {checked_done[0]} of {checked_done[1]}")


if __name__ == "__main__":
    main()
