"""Online backups of the database: VACUUM INTO a temp name, then an atomic rename; the newest 14 of each kind kept."""
from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Optional, Union

from . import ownership
from .storage import BUSY_TIMEOUT_MS, RESERVE_BYTES, _is_full, database_is_empty

log = logging.getLogger(__name__)
FOLDER = "backups"
KEEP = 14  # of each kind
EVERY = timedelta(hours=24)  # a backup is due when the newest is older than this, once the market is closed
LATEST = timedelta(hours=30)  # and while it is open too, once the newest is this old
STALE = timedelta(hours=36)  # the dashboard warns when the newest is older than this
RETRY_S = 3600.0  # after a skipped or failed daily backup
STALE_TMP_S = 600.0  # a temp file untouched this long was left by a backup that died
NAME = re.compile(r"^host-(\d{8}T\d{6})(\d{3})Z(?:-\d+)?-(daily|manual|pre-migration-v\d+|before-restore)\.sqlite$")
STAMP = "%Y%m%dT%H%M%S"


@dataclass(frozen=True)
class BackupFile:
    """One backup in DATA_DIR/backups."""

    path: Path
    at: datetime
    kind: str  # daily, manual, pre-migration-vN, before-restore
    size: int

    @property
    def group(self) -> str:
        """What retention counts it with: pre-migration copies of every version count together."""
        return self.kind.split("-v")[0]


class BackupSkipped(Exception):
    """No backup was written (not enough room, a full disk, an unreadable database); the message says why."""


def folder_of(data_dir: Path) -> Path:
    return Path(data_dir) / FOLDER


def listing(folder: Path) -> list[BackupFile]:
    """The backups in a folder, oldest first (files of other names are left alone)."""
    found = []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        m = NAME.match(name)
        if not m:
            continue
        try:
            size = (folder / name).stat().st_size
        except OSError:
            continue
        at = datetime.strptime(m.group(1), STAMP).replace(microsecond=int(m.group(2)) * 1000, tzinfo=timezone.utc)
        found.append(BackupFile(folder / name, at, m.group(3), size))
    return sorted(found, key=lambda b: (b.at, b.path.name))


def newest(folder: Path) -> Optional[BackupFile]:
    found = listing(folder)
    return found[-1] if found else None


def room_needed(conn: sqlite3.Connection) -> int:
    """About how many bytes a VACUUM INTO copy of this database takes (its used pages)."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
    return page_size * pages


def write(source: Union[Path, sqlite3.Connection], folder: Path, kind: str, min_free_mb: int,
          keep: int = KEEP) -> BackupFile:
    """Copy the database (a path, or an open connection outside a transaction) into folder; prune its kind.

    The copy is a consistent snapshot taken while the host writes (VACUUM INTO reads in one transaction),
    written under a temp name, synced, then renamed. It is skipped (BackupSkipped) when it would leave less
    than DISK_MIN_FREE_MB free, so that a backup never eats the room trading needs.
    """
    conn = source if isinstance(source, sqlite3.Connection) else _open(source)  # no database: no folder made
    try:
        try:
            make_folder(folder)
        except OSError as e:
            raise BackupSkipped(f"the backups folder {folder} cannot be made ({e})") from None
        for stale in folder.glob(".host-*.tmp"):  # an earlier backup killed half-way (not one being written now)
            try:
                if time.time() - stale.stat().st_mtime > STALE_TMP_S:
                    stale.unlink()
            except OSError:
                pass
        try:
            need = room_needed(conn)
        except sqlite3.Error as e:
            raise BackupSkipped(f"the database cannot be read for a backup ({e})") from None
        free = shutil.disk_usage(folder).free
        floor = max(min_free_mb * 1_000_000, 3 * RESERVE_BYTES)
        if free - need < floor:
            raise BackupSkipped(f"not enough room on {folder}: a backup needs about {_mb(need)} and {_mb(free)} "
                                f"is free, which would leave less than DISK_MIN_FREE_MB={min_free_mb} for trading; "
                                f"free space or move old backups elsewhere")
        final = new_name(folder, kind)
        tmp = folder / f".{final.name}.tmp"
        try:
            conn.execute("VACUUM INTO ?", (str(tmp),))
            ownership.follow(tmp, folder.parent, 0o600)
            fsync(tmp)
            os.replace(tmp, final)
            fsync(folder)
        except (sqlite3.Error, OSError) as e:
            tmp.unlink(missing_ok=True)
            if _is_full(e):
                raise BackupSkipped(f"the disk filled up while backing up to {folder} ({e}); the partial copy "
                                    f"was removed") from None
            raise BackupSkipped(f"the backup to {folder} failed ({type(e).__name__}: {e}); nothing was kept") from None
    finally:
        if conn is not source:
            conn.close()
    made = next(b for b in listing(folder) if b.path == final)
    prune(folder, made.group, keep)
    return made


def make_folder(folder: Path) -> None:
    """The backups folder, 0700, owned as DATA_DIR is (a backup run as root must not leave a folder root's)."""
    if not folder.is_dir():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        ownership.follow(folder, folder.parent)


def new_name(folder: Path, kind: str) -> Path:
    """A backup's path in folder: its time (UTC, to the millisecond) and kind; never one that exists."""
    make_folder(folder)
    now = datetime.now(timezone.utc)
    name = f"host-{now.strftime(STAMP)}{now.microsecond // 1000:03d}Z-{kind}.sqlite"
    path, n = folder / name, 1
    while path.exists() or (folder / f".{path.name}.tmp").exists():
        n += 1
        path = folder / name.replace("Z-", f"Z-{n}-", 1)
    return path


def prune(folder: Path, group: str, keep: int = KEEP) -> list[Path]:
    """Delete all but the newest `keep` backups of a group; return what was deleted."""
    mine = [b for b in listing(folder) if b.group == group]
    gone = [b.path for b in mine[:-keep]] if keep > 0 else []
    for path in gone:
        path.unlink(missing_ok=True)
        Path(f"{path}-wal").unlink(missing_ok=True)  # a damaged database kept before a restore, with its WAL
    return gone


def _open(path: Path) -> sqlite3.Connection:
    if database_is_empty(Path(path)):
        raise BackupSkipped(f"there is no database with data at {path} to back up")
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


def fsync(path: Path) -> None:
    """Sync a file's or a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mb(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB"


class DailyBackup:
    """A backup when the newest is a day old and the market is closed (or 30 h old, open or not; at once when
    there is none), on its own thread; the engine polls it once a second. One skipped or failed is an error
    event, tried again an hour later."""

    def __init__(self, db_path: Path, folder: Path, min_free_mb: int,
                 emit: Callable[[str, str, str, Optional[dict]], None], every: timedelta = EVERY,
                 retry_s: float = RETRY_S):
        self.db_path, self.folder, self.min_free_mb, self.emit = Path(db_path), Path(folder), min_free_mb, emit
        self.every, self.retry_s = every, retry_s
        self._last: Optional[datetime] = None
        self._read = False
        self._retry_at = 0.0
        self._thread: Optional[threading.Thread] = None

    def due(self, now: datetime, market_open: bool) -> bool:
        """Whether a backup is due now; the market's hours are avoided while the newest is less than 30 h old."""
        if self._last is None:
            return True
        age = now - self._last
        return age >= self.every + (LATEST - EVERY if market_open else timedelta(0))

    def poll(self, market_open: bool = False) -> None:
        """Start a backup if one is due and none is running (cheap: no file is read after the first call)."""
        if (self._thread is not None and self._thread.is_alive()) or time.monotonic() < self._retry_at:
            return
        if not self._read:
            made = newest(self.folder)
            self._last, self._read = (made.at if made else None), True
        if not self.due(datetime.now(timezone.utc), market_open):
            return
        self._thread = threading.Thread(target=self.run, name="daily-backup", daemon=True)
        self._thread.start()

    def run(self) -> Optional[BackupFile]:
        started = time.monotonic()
        try:
            made = write(self.db_path, self.folder, "daily", self.min_free_mb)
        except Exception as e:  # never the engine's problem: said, and tried again in an hour
            if not isinstance(e, BackupSkipped):
                log.exception("the daily backup failed")
            self._retry_at = time.monotonic() + self.retry_s
            self._say("backup_failed", f"daily backup skipped: {e}; next try in {self.retry_s / 60:.0f} min",
                      "error", {"folder": str(self.folder)})
            return None
        self._last = made.at
        self._say("backup", f"database backed up to {made.path} ({_mb(made.size)}, in "
                  f"{time.monotonic() - started:.1f} s); the newest {KEEP} daily backups are kept", "info",
                  {"file": str(made.path), "size": made.size})
        return made

    def _say(self, kind: str, message: str, severity: str, data: dict) -> None:
        try:
            self.emit(kind, message, severity, data)
        except Exception as e:  # a full disk takes the event too: the log still has it
            log.error("%s (the event was not stored: %s)", message, e)

    def join(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
