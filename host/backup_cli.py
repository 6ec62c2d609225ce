"""`strategy-host backup` and `strategy-host restore FILE`."""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import backup, restore
from .config import SECRET_NAMES, ConfigError, Settings, load
from .storage import MIGRATIONS


def _settings(env: str | None) -> Settings:
    """Where DATA_DIR and the database are; secrets are not needed (a new server being restored has none yet)."""
    placeholders = {name: "x" * 32 for name in SECRET_NAMES}
    try:
        return load(env, environ={**placeholders, **os.environ})
    except ConfigError as e:
        print(f"configuration problems ({len(e.problems)}):", file=sys.stderr)
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_backup(args: argparse.Namespace) -> int:
    """Write one backup now; safe while the host runs (VACUUM INTO reads a consistent snapshot)."""
    settings = _settings(args.env)
    started = time.monotonic()
    try:
        made = backup.write(settings.db_path, backup.folder_of(settings.data_dir), "manual",
                            settings.DISK_MIN_FREE_MB)
    except backup.BackupSkipped as e:
        print(f"no backup written: {e}", file=sys.stderr)
        return 1
    where = made.path.resolve()
    print(f"backed up {settings.db_path.resolve()} to {where} ({made.size / 1e6:.1f} MB, "
          f"{time.monotonic() - started:.1f} s)")
    print(f"  the newest {backup.KEEP} manual backups are kept; restore one with: strategy-host restore {where}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Replace the database with a checked backup, with the host stopped; the replaced one is kept."""
    settings = _settings(args.env)
    try:
        with restore.host_stopped(settings.data_dir, settings.db_path):
            done = restore.restore(args.file, settings.db_path, settings.data_dir)
    except restore.RestoreRefused as e:
        print(e, file=sys.stderr)
        return 1
    c = done.checked
    print(f"restored {done.source.resolve()} into {done.db_path.resolve()}")
    print(f"  checked: PRAGMA integrity_check ok, strategy-host schema version {c.version}"
          + (f" (it is migrated to {len(MIGRATIONS)} at the next start, after a backup)"
             if c.version < len(MIGRATIONS) else ""))
    print(f"  it holds {c.orders} orders, {c.alerts} alerts (newest received {c.newest_alert or 'never'}), "
          f"{c.open_positions} open positions")
    print(f"  the database it replaced is kept as {done.kept.resolve()}" if done.kept
          else "  there was no database in place to keep")
    print("  start the host with `strategy-host run`: it reconciles with the broker's books at start; check the "
          "positions and orders at the broker, which a backup cannot bring back")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the two commands to the strategy-host parser."""
    b = sub.add_parser("backup", help="write a backup of the database now (safe while the host runs)")
    b.add_argument("--env", help="config file (for DATA_DIR and ORDERS_DB_PATH)")
    b.set_defaults(func=cmd_backup)
    r = sub.add_parser("restore", help="replace the database with a backup FILE (the host must be stopped)")
    r.add_argument("file", metavar="FILE", help="a backup, e.g. var/backups/host-20250101T160000000Z-daily.sqlite")
    r.add_argument("--env", help="config file (for DATA_DIR and ORDERS_DB_PATH)")
    r.set_defaults(func=cmd_restore)
