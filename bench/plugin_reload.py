"""Save-to-live latency of a strategy plugin under `strategy-host run`, against a bare watchdog floor.

Usage: python bench/plugin_reload.py [--saves N] [--short]
Each save writes a new version atomically (temp file + rename, as editors do) and times until
GET /api/strategies shows that version running. The floor is a bare watchdog observer on the
same kind of folder noticing the same kind of save, measured in the same run.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

TOKEN = "bench-api-token-0123456789"
SOURCE = '''from host import hookimpl

@hookimpl
def strategy_meta():
    return {{"name": "bench", "version": "{version}", "api_version": 1}}
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save(folder: Path, version: str) -> float:
    tmp = folder / ".bench.py.tmp"
    tmp.write_text(SOURCE.format(version=version))
    t0 = time.perf_counter()
    os.replace(tmp, folder / "bench.py")
    return t0


def floor(n: int) -> list[float]:
    folder = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    seen = threading.Event()

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event):
            if str(getattr(event, "dest_path", "")).endswith("bench.py"):
                seen.set()
    obs = Observer()
    obs.schedule(Handler(), str(folder))
    obs.start()
    out = []
    for i in range(n):
        seen.clear()
        t0 = save(folder, f"f{i}")
        seen.wait(5)
        out.append(time.perf_counter() - t0)
        time.sleep(0.05)
    obs.stop()
    obs.join()
    return out


def strategy_version(port: int) -> str | None:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    c.request("GET", "/api/strategies", headers={"Authorization": f"Bearer {TOKEN}"})
    items = json.loads(c.getresponse().read())["items"]
    rec = next((x for x in items if x["name"] == "bench"), None)
    return rec["version"] if rec and rec["status"] == "running" else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--saves", type=int, default=30)
    ap.add_argument("--short", action="store_true", help="3 saves: for CI (it checks that the bench runs)")
    args = ap.parse_args()
    if args.short:
        args.saves = 3
    work = Path(tempfile.mkdtemp(prefix="bench-reload-"))
    folder = work / "plugins" / "strategies"
    folder.mkdir(parents=True)
    port = free_port()
    env = {**os.environ, "WEBHOOK_SECRET": "bench-webhook-secret", "API_TOKEN": TOKEN,
           "DASHBOARD_PASSWORD": "bench-password", "LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "host", "run", "--port", str(port)], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    times = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                strategy_version(port)
                break
            except OSError:
                time.sleep(0.1)
        for i in range(args.saves):
            version = f"1.{i}"
            t0 = save(folder, version)
            while strategy_version(port) != version:
                if time.perf_counter() - t0 > 10:
                    raise SystemExit(f"version {version} not live after 10 s")
                time.sleep(0.005)
            times.append(time.perf_counter() - t0)
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    base = floor(args.saves)
    ms = 1000
    print(f"saves: {args.saves} (atomic rename), under strategy-host run (gunicorn)")
    print(f"{'':30}{'host':>10}{'floor':>10}{'ratio':>8}")
    print(f"{'save-to-live p50 (ms)':30}{statistics.median(times) * ms:10.1f}{statistics.median(base) * ms:10.1f}"
          f"{statistics.median(times) / statistics.median(base):8.1f}x")
    print(f"{'save-to-live max (ms)':30}{max(times) * ms:10.1f}{max(base) * ms:10.1f}{max(times) / max(base):8.1f}x")
    print("floor: a bare watchdog observer noticing the same save; the host adds a 150 ms debounce by design")


if __name__ == "__main__":
    main()
