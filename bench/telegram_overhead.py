"""Does Telegram ever hold up trading? Webhook latency with the Telegram notifier on, against the same
host without it, in one run.

Usage: python bench/telegram_overhead.py [--alerts N] [--short]
Three hosts under gunicorn, one after another: no Telegram (the floor); Telegram answering in 5 ms;
Telegram answering in 2 s (a slow network). Each gets N serial alerts; p50/p99 and the ratio to the floor.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from webhook_latency import ROOT, body, free_port, pct, run_senders, start_host, wait_up

sys.path.insert(0, str(ROOT))
from host.sim.telegram_api import FakeTelegram  # noqa: E402


def run(work: Path, n: int, telegram: FakeTelegram | None) -> dict:
    port = free_port()
    if telegram is not None:
        (work / "plugins" / "notifiers").mkdir(parents=True)
        shutil.copy(ROOT / "plugins" / "notifiers" / "telegram.py", work / "plugins" / "notifiers")
        os.environ.update(TELEGRAM_BOT_TOKEN=telegram.token, TELEGRAM_CHAT_ID="555", TELEGRAM_API_URL=telegram.url)
    host = start_host(work, port)
    try:
        wait_up(port)
        if telegram is not None:
            deadline = time.monotonic() + 10
            while not telegram.sent("deleteWebhook") and time.monotonic() < deadline:
                time.sleep(0.05)
        run_senders(port, [body(i, "warm") for i in range(30)], 1)
        latencies, _, statuses = run_senders(port, [body(i, "t") for i in range(n)], 1)
        assert set(statuses) == {200}, set(statuses)
        return {"p50": pct(latencies, 50) * 1000, "p99": pct(latencies, 99) * 1000}
    finally:
        host.terminate()
        host.wait(15)
        for k in ("TELEGRAM_BOT_TOKEN", "TELEGRAM_CHAT_ID", "TELEGRAM_API_URL"):
            os.environ.pop(k, None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alerts", type=int, default=300)
    ap.add_argument("--short", action="store_true", help="30 alerts: for CI (it checks that the bench runs)")
    args = ap.parse_args()
    if args.short:
        args.alerts = 30
    results = {}
    for label, delay in (("no Telegram (floor)", None), ("Telegram answering in 5 ms", 0.005),
                         ("Telegram answering in 2 s", 2.0)):
        fake = FakeTelegram().start() if delay is not None else None
        if fake is not None:
            fake.slow_s = delay
        with tempfile.TemporaryDirectory() as work:
            results[label] = run(Path(work), args.alerts, fake)
        if fake is not None:
            results[label]["messages"] = len(fake.sent())  # paced to 1/s per chat; a backlog is joined
            fake.stop()
    floor = results["no Telegram (floor)"]["p50"]
    for label, r in results.items():
        extra = f"  ({r['messages']} messages reached the Bot API)" if "messages" in r else ""
        print(f"{label:30s} webhook p50 {r['p50']:6.2f} ms ({r['p50'] / floor:4.2f}x)  p99 {r['p99']:6.2f} ms{extra}")


if __name__ == "__main__":
    main()
