"""Storage: schema version and migrations, WAL, busy timeout, one connection shared by threads."""
from __future__ import annotations

import sqlite3
import statistics
import threading
import time

from host import storage as storage_mod
from host.storage import Storage


def test_schema_is_versioned_and_migrations_run_once(tmp_path, monkeypatch):
    s = Storage(tmp_path / "h.sqlite")
    assert s.schema_version == len(storage_mod.MIGRATIONS)
    assert {"alerts", "orders", "fills", "positions", "events", "state"} <= set(s.db.table_names())
    s.close()
    before = len(storage_mod.MIGRATIONS)
    ran = []

    def m2(db):
        ran.append(1)
        db["extra"].create({"id": int}, pk="id")
    monkeypatch.setattr(storage_mod, "MIGRATIONS", storage_mod.MIGRATIONS + (m2,))
    s = Storage(tmp_path / "h.sqlite")
    assert s.schema_version == before + 1 and "extra" in s.db.table_names() and ran == [1]
    s.close()
    Storage(tmp_path / "h.sqlite").close()
    assert ran == [1]


def test_wal_and_busy_timeout(tmp_path):
    s = Storage(tmp_path / "h.sqlite")
    assert s.read(lambda db: db.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
    assert s.read(lambda db: db.execute("PRAGMA busy_timeout").fetchone()[0]) == storage_mod.BUSY_TIMEOUT_MS


def test_one_connection_is_shared_safely_by_many_threads(tmp_path):
    s = Storage(tmp_path / "h.sqlite")
    errors = []

    def work(n):
        try:
            for i in range(50):
                s.write(lambda db: Storage.add_event(db, "t", f"{n}-{i}"))
                s.rows("select count(*) from events")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert s.one("select count(*) n from events")["n"] == 400


def test_a_failed_transaction_leaves_nothing_behind(tmp_path):
    s = Storage(tmp_path / "h.sqlite")

    def half(db):
        Storage.add_event(db, "t", "first")
        raise RuntimeError("boom")
    try:
        s.write(half)
    except RuntimeError:
        pass
    assert s.one("select count(*) n from events")["n"] == 0


def test_a_long_read_in_one_thread_does_not_hold_up_reads_in_another(tmp_path):
    """The dashboard reads a lot; the engine's reads must not queue behind them."""
    s = Storage(tmp_path / "db.sqlite")
    inside, release = threading.Event(), threading.Event()
    slow = threading.Thread(target=lambda: s.read(lambda db: (inside.set(), release.wait(5))))
    slow.start()
    try:
        assert inside.wait(2)
        done = []
        other = threading.Thread(target=lambda: done.append(s.rows("select 1 as one")))
        other.start()
        other.join(1)
        assert done == [[{"one": 1}]]  # finished while the slow read is still open
    finally:
        release.set()
        slow.join()
        s.close()


def test_a_write_waiting_for_another_process_begins_soon_after_it_ends(tmp_path):
    """Another process's write (another gunicorn worker) ends 9 ms in: ours begins within a few ms of that,
    not at SQLite's own busy handler's next try (it sleeps 1, 2, 5, 10 ms...: 18 ms in, 9 ms late)."""
    storage = Storage(tmp_path / "db.sqlite")
    other = sqlite3.connect(str(tmp_path / "db.sqlite"), isolation_level=None, check_same_thread=False)
    late = []
    for _ in range(7):
        other.execute("BEGIN IMMEDIATE")
        released = threading.Event()
        released_at: list[float] = []

        def release() -> None:
            time.sleep(0.009)
            released_at.append(time.monotonic())
            other.execute("COMMIT")
            released.set()
        t = threading.Thread(target=release)
        t.start()
        storage.write(lambda db: Storage.put_state(db, "k", "v"))
        done = time.monotonic()
        t.join()
        late.append(done - released_at[0])
    assert statistics.median(late) < 0.005, late
    other.close()
    storage.close()


def _open_files() -> int:
    import os
    return len(os.listdir("/proc/self/fd"))


def test_a_thread_that_read_and_ended_leaves_no_connection_open(tmp_path):
    """Each thread reads through a connection of its own, and the storage kept every one open until it closed:
    a thread per exit's book read (exit_reads.py) left two open files each, 402 connections in a 2,000-alert soak,
    so a host up for days would run out of files (a service's limit is often 1,024) and then fail broker calls."""
    s = Storage(tmp_path / "h.sqlite")
    s.one("select 1 as x")
    before = _open_files()

    def read() -> None:
        assert s.one("select 1 as x")["x"] == 1

    for _ in range(60):
        t = threading.Thread(target=read)
        t.start()
        t.join()
    assert _open_files() - before <= 4
    kept = threading.Event()
    done = threading.Event()

    def read_and_stay() -> None:
        read()
        kept.set()
        done.wait(5)

    t = threading.Thread(target=read_and_stay)
    t.start()
    kept.wait(5)
    s.close()  # a thread still alive: its connection is closed with the storage's
    assert _open_files() < before
    done.set()
    t.join()



def test_a_storage_dropped_without_close_is_freed_with_its_files(tmp_path):
    """The readers' finalizers must not hold the storage: one never closed (an error path) still lets its files go."""
    import gc
    import weakref
    before = _open_files()
    s = Storage(tmp_path / "h.sqlite")
    s.one("select 1 as x")
    gone = weakref.ref(s)
    del s
    gc.collect()
    assert gone() is None
    assert _open_files() <= before
