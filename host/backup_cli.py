"""`strategy-host backup` and `strategy-host restore FILE`."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from dotenv import dotenv_values

from . import backup, restore
from .config import SECRET_NAMES, ConfigError, Settings, load
from .deploy import ENV_PATH
from .storage import MIGRATIONS, database_is_empty


def _settings(env: str | None) -> Settings:
    """Where DATA_DIR and the database are; secrets are not needed (a new server being restored has none yet)."""
    placeholders = {name: "x" * 32 for name in SECRET_NAMES}
    try:
        settings = load(env, environ={**placeholders, **os.environ})
    except ConfigError as e:
        print(f"configuration problems ({len(e.problems)}):", file=sys.stderr)
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"DATA_DIR {settings.data_dir.resolve()} ({data_dir_source(env)}); database {settings.db_path.resolve()}")
    return settings


def data_dir_source(env: str | None) -> str:
    """Where DATA_DIR came from, in words: the environment wins over --env, and the default is ./var."""
    if os.environ.get("DATA_DIR", "").strip():
        return "from the environment variable DATA_DIR"
    if env and (dotenv_values(env).get("DATA_DIR") or "").strip():
        return f"from DATA_DIR in {env}"
    hint = (f"; the server's config is {ENV_PATH}: add --env {ENV_PATH} (with sudo) for its DATA_DIR"
            if Path(ENV_PATH).is_file() and env != ENV_PATH else "")
    return f"the default: ./var in the current folder {Path.cwd()}, as neither --env nor the environment set DATA_DIR{hint}"


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
    if Path(args.file).is_file() and database_is_empty(settings.db_path) and not args.yes:
        print(f"there is no database at {settings.db_path.resolve()}: nothing would be replaced, so this is either a "
              f"new server (then run the same command again with --yes) or the wrong DATA_DIR (then name the "
              f"host's config with --env, e.g. sudo strategy-host restore --env {ENV_PATH} FILE). Nothing was "
              f"changed.", file=sys.stderr)
        return 1
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
    r.add_argument("--yes", action="store_true",
                   help="go on when DATA_DIR has no database yet (a new server); without it that is refused")
    r.set_defaults(func=cmd_restore)
