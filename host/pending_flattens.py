"""Flattens decided and not yet done: a strategy's stop, the square-off, a strategy's MTM stop.

Each is stored in the transaction that decides it (the stop's mark for the day), and taken off in the transaction
of the flatten that does it (RiskLoop.flatten_pending): a death, a failed write or a slow broker read in between
leaves it here, and risk does it on its next beat, once.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any, Optional

from .storage import Storage

log = logging.getLogger(__name__)
KEY = "risk_flatten_pending"


@dataclass(frozen=True)
class Pending:
    """One flatten to do: `strategy`'s positions, or `product`'s, decided on `day` (Asia/Kolkata) for `why`.
    `everything`: what risk otherwise leaves alone too (a strategy's own MTM stop exits all of its positions)."""

    why: str
    day: str
    strategy: Optional[str] = None
    product: Optional[str] = None
    everything: bool = False


class Unreadable(ValueError):
    """The stored list is not one this release can read."""


def read(db: Any) -> list[Pending]:
    """The flattens waiting, in the order they were decided (read in the caller's transaction)."""
    row = db.execute("select value from state where key = ?", (KEY,)).fetchone()
    if not row:
        return []
    try:
        return [Pending(**e) for e in json.loads(row[0])]
    except (ValueError, TypeError) as e:
        raise Unreadable(f"{e}: {row[0][:200]!r}") from e


def _readable(db: Any) -> list[Pending]:
    try:
        return read(db)
    except Unreadable as e:  # risk's loop says so (RiskLoop.flatten_pending); a write here replaces it
        log.error("risk: the stored flattens to do are unreadable (%s); replaced", e)
        return []


def add(db: Any, entries: list[Pending]) -> None:
    """Add flattens to do, in the transaction that decided them; one already waiting is not added twice."""
    if entries:
        waiting = _readable(db)
        _write(db, waiting + [e for e in entries if e not in waiting])


def done(db: Any, entry: Pending) -> None:
    """Take a flatten off, in the transaction that did it (or dropped it)."""
    _write(db, [e for e in _readable(db) if e != entry])


def clear(db: Any) -> None:
    _write(db, [])


def _write(db: Any, entries: list[Pending]) -> None:
    if entries:
        Storage.put_state(db, KEY, json.dumps([asdict(e) for e in entries]))
    else:
        db.execute("delete from state where key = ?", (KEY,))
