"""Group commit under stress: many writers against a fake disk that records what each sync covers.

The fake sync reads, at its start, how many commits were done before it was called (what a real fsync
of the WAL would put on the disk), sleeps a random short time, and sometimes fails. Every wait() that
returns must have been preceded by the end of a successful sync that began after its commit.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from host.group_sync import GroupSync, NotDurable

JOIN_S = 20  # no wait() may hang: every join is bounded


@dataclass
class Sync:
    """One call of the fake fsync: the commits it covers (done before it began) and how it ended."""
    covers: int
    ok: bool = False


@dataclass
class Disk:
    """A fake WAL fsync: covers the commits done before it was called; sleeps; sometimes fails."""
    group: Any = None
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    max_sleep_s: float = 0.002
    p_error: float = 0.0        # a non-disk exception (the sync never happened)
    fail_at: Optional[int] = None  # the n-th sync raises OSError (EIO)
    syncs: list = field(default_factory=list)
    failed_at: Optional[float] = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    most_in_flight: int = 0

    def __call__(self) -> None:
        with self.lock:
            s = Sync(self.group._committed)  # the commits done before this call: what a real fsync would cover
            self.syncs.append(s)
            n = len(self.syncs)
            r = self.rng.random()
            pause = self.rng.random() * self.max_sleep_s
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(pause)
            if self.fail_at is not None and n >= self.fail_at:
                with self.lock:
                    self.failed_at = self.failed_at or time.monotonic()
                raise OSError(5, "Input/output error")
            if r < self.p_error:
                raise RuntimeError("interrupted")
            with self.lock:
                s.ok = True
        finally:
            with self.lock:
                self.in_flight -= 1

    def covered(self, seq: int) -> bool:
        """A successful sync that began after commit `seq` has ended."""
        with self.lock:
            return any(s.ok and s.covers >= seq for s in self.syncs)


@dataclass
class Run:
    """What the writers saw."""
    early: list = field(default_factory=list)      # wait() returned before its commit was on the disk
    returned: int = 0
    not_durable: int = 0
    other_errors: int = 0
    after_failure_returned: list = field(default_factory=list)  # began after the EIO, returned normally
    commits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _writers(group: GroupSync, disk: Disk, threads: int, rounds: int, seed: int = 1,
             commit_pause_s: float = 0.0, think_s: float = 0.0) -> Run:
    """Writers in the storage's pattern: begin(), commit under the write lock (end), then wait(seq)."""
    run, write_lock = Run(), threading.Lock()

    def writer(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        for _ in range(rounds):
            if think_s:
                time.sleep(rng.random() * think_s)
            group.begin()
            with write_lock:
                if commit_pause_s:
                    time.sleep(rng.random() * commit_pause_s)
                committed = rng.random() < 0.9
                seq = group.end(committed)
            if not committed:
                continue
            with run.lock:
                run.commits += 1
            began = time.monotonic()
            try:
                group.wait(seq)
            except NotDurable:
                with run.lock:
                    run.not_durable += 1
                continue
            except RuntimeError:
                with run.lock:
                    run.other_errors += 1
                continue
            ok = disk.covered(seq)
            with run.lock:
                run.returned += 1
                if not ok:
                    run.early.append(seq)
                if disk.failed_at is not None and began > disk.failed_at and seq > max(
                        (s.covers for s in disk.syncs if s.ok), default=0):
                    run.after_failure_returned.append(seq)
    pool = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    deadline = time.monotonic() + JOIN_S
    for t in pool:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [t for t in pool if t.is_alive()]
    assert not hung, f"{len(hung)} writers still waiting after {JOIN_S} s (a lost wake-up?): {_state(group)}"
    return run


def _state(group: GroupSync) -> dict:
    return {k: v for k, v in vars(group).items() if k.startswith("_") and k not in ("_cond", "_sync")}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_wait_returns_before_a_sync_that_began_after_its_commit_has_ended(seed):
    disk = Disk(rng=random.Random(seed), p_error=0.05)
    group = GroupSync(disk, linger_s=0.0005)
    disk.group = group
    run = _writers(group, disk, threads=12, rounds=60, seed=seed, commit_pause_s=0.0002)
    assert not run.early, f"released before a sync covering them ended: {run.early[:10]}"
    assert run.returned + run.other_errors == run.commits and run.not_durable == 0
    assert run.returned > run.commits * 0.8
    assert group.failed is None


@pytest.mark.parametrize("fail_at", [1, 5, 40])
def test_after_a_failed_fsync_every_new_commit_raises_not_durable(fail_at):
    disk = Disk(fail_at=fail_at)
    group = GroupSync(disk, linger_s=0.0005)
    disk.group = group
    run = _writers(group, disk, threads=8, rounds=40, commit_pause_s=0.0002)
    assert not run.early, f"released before a sync covering them ended: {run.early[:10]}"
    assert not run.after_failure_returned, f"answered durable after the fsync failed: {run.after_failure_returned[:10]}"
    assert isinstance(group.failed, OSError) and run.not_durable > 0
    group.begin()
    seq = group.end(True)
    with pytest.raises(NotDurable):
        group.wait(seq)


def _ratio(seed: int) -> tuple[int, int, int]:
    disk = Disk(rng=random.Random(seed), max_sleep_s=0.004)
    group = GroupSync(disk)  # the host's linger
    disk.group = group
    run = _writers(group, disk, threads=16, rounds=25, seed=seed, commit_pause_s=0.0001, think_s=0.0005)
    assert not run.early
    return len(disk.syncs), run.commits, disk.most_in_flight


def test_many_commits_at_once_still_share_syncs():
    """16 writers against a 0-4 ms disk: far fewer fsyncs than commits."""
    syncs, commits, _ = _ratio(11)
    assert syncs * 3 < commits, f"{syncs} syncs for {commits} commits"
