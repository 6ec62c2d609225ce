"""What an online backup costs the host: its duration, and the latency of durable writes while it runs.

Usage: python bench/backup_online.py [--mb 100] [--seconds 3]
Fills a host database with events to about --mb MB, then times durable one-row writes (as an alert's
intake does) for --seconds without a backup, and again while `backup.write` (VACUUM INTO) runs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from host import backup  # noqa: E402
from host.storage import Storage  # noqa: E402


def writes(storage: Storage, stop: threading.Event, seconds: float) -> list[float]:
    """Durable one-event writes until stop is set (or seconds pass); their latencies in ms."""
    took, end = [], time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < end:
        t = time.perf_counter()
        storage.write(lambda db: Storage.add_event(db, "bench", "x" * 200), durable=True)
        took.append((time.perf_counter() - t) * 1000)
    return took


def summary(label: str, ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=100)
    return f"{label}: {len(ms)} writes, p50 {q[49]:.2f} ms, p99 {q[98]:.2f} ms, max {max(ms):.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--short", action="store_true", help="a 10 MB database and 1 s of writes (for CI)")
    args = ap.parse_args()
    if args.short:
        args.mb, args.seconds = 10, 1.0
    with tempfile.TemporaryDirectory() as tmp:
        storage = Storage(Path(tmp) / "host.sqlite")
        rows = args.mb * 1_000_000 // 500
        for start in range(0, rows, 10_000):
            storage.write(lambda db: db.conn.executemany(
                "insert into events (at, kind, severity, message) values ('2026-01-01', 'fill', 'info', ?)",
                [("y" * 450,)] * min(10_000, rows - start)))
        size = (Path(tmp) / "host.sqlite").stat().st_size
        print(f"database: {size / 1e6:.0f} MB")
        print(summary("no backup", writes(storage, threading.Event(), args.seconds)))
        stop, took, made = threading.Event(), [], []
        writer = threading.Thread(target=lambda: took.extend(writes(storage, stop, 600)))
        writer.start()
        t = time.monotonic()
        made.append(backup.write(storage.path, Path(tmp) / "backups", "manual", 0))
        duration = time.monotonic() - t
        stop.set()
        writer.join()
        print(f"backup: {made[0].size / 1e6:.0f} MB in {duration:.2f} s")
        print(summary("during the backup", took))
        storage.close()


if __name__ == "__main__":
    main()
