"""The broker mode a database was made with: paper and live data never share a DATA_DIR."""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .storage import connect_read_only

if TYPE_CHECKING:
    from .storage import Storage

KEY = "broker_mode"
_WORDS = {"paper": "paper-mode", "shoonya": "live (BROKER=shoonya)"}
_SUFFIX = {"paper": "var-paper", "shoonya": "var-live"}


def recorded_mode(db_path: Path, data_dir: Path) -> Optional[str]:
    """The mode written in the database; for an older database without it, paper if DATA_DIR holds the paper
    broker's book; None for no database, or no way to tell."""
    stored = None
    if db_path.is_file() and db_path.stat().st_size:
        try:
            conn = connect_read_only(db_path)
            try:
                row = conn.execute("select value from state where key = ?", (KEY,)).fetchone()
                stored = row[0] if row else None
            finally:
                conn.close()
        except sqlite3.DatabaseError:  # no state table yet, or damaged: check_database says which
            stored = None
    if stored:
        return stored
    return "paper" if (data_dir / "paper.sqlite").is_file() else None


def mode_problem(mode: str, db_path: Path, data_dir: Path) -> str:
    """Why this BROKER must not use this database (one line), or ""."""
    found = recorded_mode(db_path, data_dir)
    if not found or found == mode:
        return ""
    need = "live trading" if mode == "shoonya" else "paper trading"
    return (f"refusing to start: DATA_DIR {data_dir} holds {_WORDS.get(found, found)} data ({db_path}); {need} needs "
            f"its own DATA_DIR (e.g. DATA_DIR={_SUFFIX.get(mode, 'var-' + mode)}) — or move {data_dir} away")


def record_mode(storage: "Storage", mode: str) -> None:
    """Write the mode into the database once: at its first start, or the first start of an older database."""
    from .storage import Storage
    if storage.get_state(KEY) is None:
        storage.write(lambda db: Storage.put_state(db, KEY, mode))
