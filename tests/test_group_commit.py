"""Group commit (issue 17): concurrent durable writes share one fsync, and nothing is promised before it.

A power cut is simulated by copying, at each fsync of the write-ahead log, exactly what that fsync put on
the disk (no commit can slip in meanwhile), then opening a copy of the database with that log.
"""
from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import alert, wait_for
from host.group_sync import NotDurable


class PowerCut:
    """What the disk holds after each fsync of the host's WAL; `disk()` opens the database as a cut would leave it.

    An fsync promises only what was written before it was called: its image is the WAL as it stood after
    the last durable commit made before the call (the log only grows here), whatever is written while it
    runs. Syncs run as in the host: beside each other and beside the writers.
    """

    def __init__(self, storage: Any, folder: Path):
        self.storage, self.folder = storage, folder
        folder.mkdir()
        storage.conn.execute("PRAGMA wal_autocheckpoint=0")  # the main file stays as copied below; the log only grows
        storage.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        shutil.copyfile(storage.path, folder / "main")
        self.wal = storage.path.with_name(storage.path.name + "-wal")
        self.count = self.opened = 0
        self.now = 0  # the image a power cut right now would leave (the largest of the syncs done)
        self._now_size = 0
        self._sizes = {0: 0}  # durable commit number -> the WAL's size right after it
        self._lock = threading.Lock()
        group = storage.group
        self._real, self._real_end = group._sync, group.end
        group._sync, group.end = self._sync, self._end

    def _end(self, committed: bool) -> int:
        if committed:  # right after COMMIT, under the write lock: numbered before a sync can count it
            self._sizes[self.storage.group._committed + 1] = self.wal.stat().st_size
        return self._real_end(committed)

    def _sync(self) -> None:
        size = self._sizes[self.storage.group._committed]  # what was written before this call
        self._real()
        with self._lock:
            self.count += 1
            n = self.count
        with open(self.wal, "rb") as src, open(self.folder / f"wal{n}", "wb") as dst:
            dst.write(src.read(size))
        with self._lock:
            if size >= self._now_size:
                self.now, self._now_size = n, size

    def disk(self, n: int) -> sqlite3.Connection:
        """The database as a power cut right after fsync n would leave it."""
        self.opened += 1
        cut = self.folder / f"cut{self.opened}"
        cut.mkdir()
        shutil.copyfile(self.folder / "main", cut / "host.sqlite")
        if n:
            shutil.copyfile(self.folder / f"wal{n}", cut / "host.sqlite-wal")
        return sqlite3.connect(str(cut / "host.sqlite"))


def test_alerts_answered_accepted_by_8_concurrent_senders_survive_a_power_cut_right_after_the_answer(host, tmp_path):
    cut = PowerCut(host.runtime.storage, tmp_path / "disk")
    answered: list[tuple[str, int]] = []  # (alert id, the last fsync done when the answer was given)
    lock = threading.Lock()

    def sender(k: int) -> None:
        client = host.app.test_client()
        for i in range(15):
            r = client.post("/webhook", json=alert("ENTRY", strategy=f"g{k}-{i}", alert_id=f"g{k}-{i}"))
            assert r.status_code == 200 and r.get_json()["status"] == "accepted", r.get_json()
            with lock:
                answered.append((r.get_json()["alert_id"], cut.now))
    threads = [threading.Thread(target=sender, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answered) == 120
    assert cut.count < len(answered), "every alert had an fsync of its own: nothing was grouped"
    for n in sorted({n for _, n in answered}):
        db = cut.disk(n)
        kept = {r[0] for r in db.execute("select id from alerts")}
        db.close()
        lost = [aid for aid, m in answered if m == n and aid not in kept]
        assert not lost, f"answered accepted, gone after a power cut right after the answer: {lost}"


def _one_then_a_batch_of_five(host: Any, gate: threading.Event, sending: Any) -> None:
    """Six entries: the first is held at the broker (until `gate`) once `sending()` says it is on its way, and the
    next five are decided meanwhile, so that they are sent together."""
    assert host.post(alert("ENTRY", strategy="b0")).get_json()["status"] == "accepted"
    wait_for(sending)
    for i in range(1, 6):
        assert host.post(alert("ENTRY", strategy=f"b{i}")).get_json()["status"] == "accepted"
    gate.set()
    host.settle()


def test_orders_waiting_together_are_marked_submitted_in_one_durable_commit_before_any_is_sent(host, tmp_path):
    storage = host.runtime.storage
    cut = PowerCut(storage, tmp_path / "disk")
    broker = host.runtime.broker
    real_place, gate = broker.place, threading.Event()
    durable_marks: list[int] = []
    sent_durably: list[bool] = []
    real_write = storage.write

    def write(fn: Any, durable: bool = False, on_commit: Any = None) -> Any:
        if durable and threading.current_thread().name == "order-sender":
            durable_marks.append(1)
        return real_write(fn, durable, on_commit)

    def place(req: Any) -> Any:
        gate.wait(10)  # the first order is held at the broker while the next ones are decided
        db = cut.disk(cut.now)
        row = db.execute("select status from orders where id = ?", (req.remarks,)).fetchone()
        db.close()
        sent_durably.append(row is not None and row[0] == "SUBMITTED")
        return real_place(req)
    storage.write = write
    broker.place = place
    try:
        _one_then_a_batch_of_five(host, gate, lambda: len(durable_marks) == 1)
    finally:
        storage.write, broker.place = real_write, real_place
    assert sent_durably == [True] * 6, sent_durably  # each was SUBMITTED on the disk before it left
    assert len(durable_marks) == 2, f"{len(durable_marks)} durable commits for 1 + a batch of 5 orders"
    assert {o["status"] for o in host.orders()} == {"FILLED"}


def test_a_failed_fsync_is_never_answered_accepted_and_stays_failed(host):
    group = host.runtime.storage.group
    real, calls = group._sync, []

    def broken() -> None:
        calls.append(1)
        raise OSError(5, "Input/output error")
    group._sync = broken
    try:
        r = host.post(alert("ENTRY", strategy="eio"))
        assert r.status_code == 503 and r.get_json()["status"] == "not_stored", r.get_json()
        assert "disk" in r.get_json()["error"]
        group._sync = real  # a later fsync that works proves nothing about the failed one
        with pytest.raises(NotDurable):
            host.runtime.storage.write(lambda db: None, durable=True)
        health = host.client.get("/healthz")
        assert health.status_code != 200 and "fsync" in health.get_data(as_text=True), health.get_data(as_text=True)
    finally:
        group._sync = real
        group._failed = None  # let the fixture stop the host


# ---- one leader at a time: companions share its sync, and an interrupted one hands over ----

def _waiting(group: Any, seq: int) -> threading.Thread:
    t = threading.Thread(target=group.wait, args=(seq,), daemon=True)
    t.start()
    return t


def test_commits_made_while_the_leader_lingers_share_its_one_sync():
    from host.group_sync import GroupSync
    calls: list[int] = []
    group = GroupSync(lambda: calls.append(1), linger_s=1.0)
    group.begin()
    group.begin()  # a companion on its way: the leader lingers for it
    first = _waiting(group, group.end(True))
    time.sleep(0.1)  # the leader lingers (up to 1 s) for the companion
    second = _waiting(group, group.end(True))
    for t in (first, second):
        t.join(2)
        assert not t.is_alive()
    assert calls == [1]


def test_a_sync_interrupted_by_an_error_that_is_not_the_disks_lets_the_next_waiter_lead():
    from host.group_sync import GroupSync
    calls: list[int] = []

    def sync() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("interrupted")
    group = GroupSync(sync, linger_s=0)
    group.begin()
    seq = group.end(True)
    with pytest.raises(RuntimeError):
        group.wait(seq)
    again = _waiting(group, seq)
    again.join(2)
    assert not again.is_alive() and calls == [1, 1]  # led anew: nothing waits for the sync that never was
    assert group.failed is None


def test_the_acks_of_orders_sent_together_share_one_commit_made_after_the_last_is_placed(host):
    """A batch of paper orders was placed one by one, each ack committed on its own, while the engine waited for
    the write lock (issue 17: the sender held it 32% of the time in a burst). The batch's acks are one commit."""
    storage, broker = host.runtime.storage, host.runtime.broker
    real_place, gate = broker.place, threading.Event()
    sender_writes: list[str] = []
    placed: list[str] = []
    real_write = storage.write

    def write(fn: Any, durable: bool = False, on_commit: Any = None) -> Any:
        if threading.current_thread().name == "order-sender":
            sender_writes.append(f"{'mark' if durable else 'write'} after {len(placed)} placed")
        return real_write(fn, durable, on_commit)

    def place(req: Any) -> Any:
        gate.wait(10)  # the first order is held at the broker while the next ones are decided
        placed.append(req.remarks)
        return real_place(req)
    storage.write = write
    broker.place = place
    try:
        _one_then_a_batch_of_five(host, gate, lambda: sender_writes)
    finally:
        storage.write, broker.place = real_write, real_place
    assert sender_writes == ["mark after 0 placed", "write after 1 placed",
                             "mark after 1 placed", "write after 6 placed"], sender_writes
    orders = host.orders()
    assert len(orders) == 6 and {o["status"] for o in orders} == {"FILLED"}
    assert all(o["broker_order_id"] for o in orders)  # each ack's id was kept, though the fill came first
