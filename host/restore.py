"""Put a backup in place of the database with the host stopped: check it, keep the current one, swap atomically."""
from __future__ import annotations

import os
import shutil
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from . import backup, ownership
from .locks import FileLock
from .storage import (MIGRATIONS, _schema, connect_read_only, database_is_empty, foreign_code, foreign_code_problem,
                      schema_gaps)

HOST_LOCKS = ("host.lock", "engine.lock")  # held by `strategy-host run`, and by whichever process runs the engine


class RestoreRefused(Exception):
    """Nothing was changed; the message says why and what to do."""


@dataclass(frozen=True)
class Checked:
    """What a sane copy of our database holds."""

    version: int
    orders: int
    alerts: int
    open_positions: int
    newest_alert: Optional[str]


@dataclass(frozen=True)
class Restored:
    source: Path
    db_path: Path
    checked: Checked
    kept: Optional[Path]  # the database that was replaced, as it was


@contextmanager
def host_stopped(data_dir: Path, db_path: Path) -> Iterator[None]:
    """Hold the locks a running host holds, so that none runs (or starts) meanwhile; refuse if one runs.

    Lock files this made are removed again if no database came of it: they would mark a new DATA_DIR
    as one where a host has run.
    """
    held: list[FileLock] = []
    made = [Path(data_dir) / name for name in HOST_LOCKS if not (Path(data_dir) / name).exists()]
    try:
        for name in HOST_LOCKS:
            lock = FileLock(Path(data_dir) / name)
            if not lock.acquire():
                raise RestoreRefused(f"refusing to restore: strategy-host is running on {Path(data_dir).resolve()} "
                                     f"(pid {lock.holder()} holds {lock.path}); stop it first (systemctl stop "
                                     f"strategy-host, or Ctrl-C), then run the restore again. Nothing was changed.")
            held.append(lock)
            if lock.path in made:  # a lock file root made must stay openable by the service's user
                ownership.follow(lock.path, Path(data_dir))
        yield
    finally:
        for lock in held:
            lock.release()
        if database_is_empty(Path(db_path)):
            for path in made:
                path.unlink(missing_ok=True)


def check(path: Path, shown: Optional[Path] = None) -> Checked:
    """A full integrity check and our schema; RestoreRefused naming what is wrong (in `shown`, if path is a copy)."""
    try:
        conn = connect_read_only(path)
        try:
            problems = [r[0] for r in conn.execute("PRAGMA integrity_check(5)").fetchall()]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            actual = _schema(conn)
            if problems != ["ok"]:
                raise RestoreRefused(f"it is damaged (PRAGMA integrity_check: {'; '.join(problems)[:300]})")
            if version < 1:
                raise RestoreRefused("it holds no strategy-host data (schema version 0)")
            if version > len(MIGRATIONS):
                raise RestoreRefused(f"it has schema version {version}, written by a newer strategy-host (this one "
                                     f"knows {len(MIGRATIONS)}); restore it with that version")
            missing = schema_gaps(actual, version)
            if missing:
                raise RestoreRefused(f"it is not a strategy-host database of schema {version}: it lacks "
                                     f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
            found = foreign_code(conn, version)
            if found:
                raise RestoreRefused(foreign_code_problem(found, shown or path))
            one = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
            return Checked(version, one("select count(*) from orders"), one("select count(*) from alerts"),
                           one("select count(*) from positions where net_qty != 0"),
                           one("select max(received_at) from alerts"))
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise RestoreRefused(f"it is not a readable SQLite database ({e})") from None


def restore(source: Path, db_path: Path, data_dir: Path) -> Restored:
    """With the host's locks held: check a copy of `source`, keep the current database, put the copy in place."""
    source, db_path = Path(source), Path(db_path)
    if not source.is_file():
        raise RestoreRefused(f"FILE: expected a backup file, found nothing at {source}. Nothing was changed. "
                             f"Backups are in {backup.folder_of(data_dir)}/")
    if db_path.exists() and source.resolve() == db_path.resolve():
        raise RestoreRefused(f"FILE: expected a backup, found the database itself ({db_path}). Nothing was changed.")
    staged = db_path.with_name(f".{db_path.name}.restore-{os.getpid()}.tmp")
    try:
        _single_file_copy(source, staged)  # the backup is never opened for writing; its -wal goes in, if any
        try:
            checked = check(staged, source)
        except RestoreRefused as e:
            raise RestoreRefused(f"refusing to restore {source}: {e}. Nothing was changed.") from None
        # the restored file takes the owner and mode of the database it replaces (or DATA_DIR's owner, 0600):
        # run as root, it would otherwise be root's, and the service's user could not open it
        ownership.follow(staged, db_path if db_path.exists() else Path(data_dir),
                         _mode(db_path) if db_path.exists() else 0o600)
        kept = _keep_current(db_path, backup.folder_of(data_dir))
        for companion in ("-wal", "-shm"):  # an old -wal applied to the restored file would corrupt it
            Path(f"{db_path}{companion}").unlink(missing_ok=True)
        os.replace(staged, db_path)
        backup.fsync(db_path.parent)
    except OSError as e:
        raise RestoreRefused(f"refusing to restore {source}: {type(e).__name__}: {e}. The database in place was "
                             f"not replaced.") from None
    finally:
        for leftover in (staged, Path(f"{staged}-wal"), Path(f"{staged}-shm")):
            leftover.unlink(missing_ok=True)
    return Restored(source, db_path, checked, kept)


def _single_file_copy(src: Path, dest: Path) -> None:
    """Copy a database (and its -wal, if any) to dest as one file in rollback mode, the WAL's commits folded in
    where possible (a damaged one is copied as it is)."""
    shutil.copyfile(src, dest)
    wal = Path(f"{src}-wal")
    if wal.is_file() and wal.stat().st_size > 0:
        shutil.copyfile(wal, f"{dest}-wal")
    try:
        conn = sqlite3.connect(str(dest))
        try:
            conn.execute("PRAGMA journal_mode=DELETE")  # checkpoints the WAL into the file and removes it
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        pass  # damaged: the copy is checked next, or kept as it was


def _mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def _keep_current(db_path: Path, folder: Path) -> Optional[Path]:
    """A copy of the database being replaced, in the backups folder (None when there is nothing to keep)."""
    if not db_path.is_file() or db_path.stat().st_size == 0:
        return None
    kept = backup.new_name(folder, "before-restore")
    tmp = folder / f".{kept.name}.tmp"
    try:
        _single_file_copy(db_path, tmp)
        if Path(f"{tmp}-wal").exists():  # damaged and with a WAL: keep both, the pair is the database
            os.replace(f"{tmp}-wal", f"{kept}-wal")
        ownership.follow(tmp, db_path, 0o600)
        if Path(f"{kept}-wal").exists():
            ownership.follow(Path(f"{kept}-wal"), db_path, 0o600)
        os.replace(tmp, kept)
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}-wal").unlink(missing_ok=True)
    backup.fsync(folder)
    backup.prune(folder, "before-restore")
    return kept
