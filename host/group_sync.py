"""Group commit: concurrent durable writes share one fsync of SQLite's write-ahead log.

Each durable write commits as usual (synchronous=NORMAL: the frames are in the WAL file, not yet on the
disk) and is given a sequence number; it then waits until a sync that began after its commit has ended.
One waiter leads: it lingers up to LINGER_S while other durable writes are still on their way to their
commit, then fdatasyncs the WAL once for all of them. This is what synchronous=FULL does after each
commit, done once per group, outside the write lock (other writers go on while the disk works).
An fsync that fails is sticky: no later sync can prove the earlier data reached the disk.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)
LINGER_S = 0.001  # how long a leader waits for companions still on their way to their commit


class NotDurable(OSError):
    """The disk did not confirm a durable write (fsync failed); nothing after it can be promised either."""


class WalFile:
    """An open descriptor on the database's -wal file, reopened if SQLite made a new one."""

    def __init__(self, db_path: Path):
        self.path = db_path.with_name(db_path.name + "-wal")
        self._fd: Optional[int] = None
        self._ino: Optional[int] = None

    def sync(self) -> None:
        """fdatasync the WAL (and, the first time a WAL file is seen, its directory entry)."""
        st = os.stat(self.path)
        if self._fd is None or st.st_ino != self._ino:
            self.close()
            self._fd, self._ino = os.open(self.path, os.O_RDONLY), st.st_ino
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)  # a new WAL file's name must survive a power cut too
            finally:
                os.close(dfd)
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class GroupSync:
    """Sequence numbers for durable commits, and one sync per group of waiters."""

    def __init__(self, sync: Callable[[], None], linger_s: float = LINGER_S):
        self._sync = sync
        self.linger_s = linger_s
        self._cond = threading.Condition()
        self._committed = 0   # durable commits done (their frames are in the WAL file)
        self._synced = 0      # every commit up to this one is on the disk
        self._coming = 0      # durable writes begun and not yet committed (companions worth waiting for)
        self._leading = False
        self._failed: Optional[BaseException] = None
        self.syncs = 0        # for benches and tests: how many fsyncs covered how many commits

    @property
    def failed(self) -> Optional[BaseException]:
        """The fsync error that ended durability in this process, if any."""
        return self._failed

    def begin(self) -> None:
        """A durable write is on its way (called before it takes the write lock)."""
        with self._cond:
            self._coming += 1

    def end(self, committed: bool) -> int:
        """The write has committed (under the write lock, so numbers follow the WAL's order) or given up."""
        with self._cond:
            self._coming -= 1
            if committed:
                self._committed += 1
            self._cond.notify_all()
            return self._committed

    def wait(self, seq: int) -> None:
        """Return once commit `seq` is on the disk; raise NotDurable if the disk did not confirm it."""
        with self._cond:
            while self._synced < seq:
                if self._failed is not None:
                    raise NotDurable(f"the disk did not confirm the write ({self._failed})") from self._failed
                if self._leading:
                    self._cond.wait()
                    continue
                self._leading = True
                try:
                    deadline = time.monotonic() + self.linger_s
                    while self._coming and (left := deadline - time.monotonic()) > 0:
                        self._cond.wait(left)
                    target = self._committed
                    self._cond.release()
                    try:
                        self._sync()
                    except OSError as e:
                        log.critical("fsync of the database's write-ahead log failed: %s; durable writes now fail "
                                     "until the host is restarted and the disk checked", e)
                        self._failed = e
                    finally:
                        self._cond.acquire()
                    if self._failed is None:
                        self._synced = max(self._synced, target)
                        self.syncs += 1
                finally:
                    self._leading = False
                    self._cond.notify_all()
