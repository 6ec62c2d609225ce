"""Commands from the web and Telegram (halt, exit-all, plugins, ticks, broker session), run where they belong.

The control commands (halt, exit-all) run on risk's threads, so a slow alert or plugin never delays them:
a halt or reduce-only (a state write) on one of its own, so that it never waits behind an exit-all's read of
the broker's books either; exit-all and resume on risk's. The others run on the engine's thread. Each
command's result is stored, and its waiter woken.
"""
from __future__ import annotations

import json
import logging
from typing import Callable, Iterable

from .inbox import Inbox
from .storage import Storage, utcnow

log = logging.getLogger(__name__)
CONTROL = ("halt", "exit_all")


def is_halt(row: dict) -> bool:
    """A halt or reduce-only (not a resume): run at once on its own thread."""
    if row["kind"] != "halt":
        return False
    try:
        return json.loads(row["args"]).get("mode") != "active"
    except (ValueError, AttributeError):
        return False


def after_halts() -> Callable[[dict], bool]:
    """For one run on risk's thread: exit-all and resume, never a halt (its own thread runs those); a resume waits
    for the next run while a halt sent before it is pending, so that the two act in the order they were sent."""
    halt_before = False

    def which(row: dict) -> bool:
        nonlocal halt_before
        if is_halt(row):
            halt_before = True
            return False
        return not (halt_before and row["kind"] == "halt")
    return which


class Conflict(Exception):
    """The command cannot be done as asked (answered 409, with why)."""


class Commands:
    """Runs pending commands of some kinds with their handlers."""

    def __init__(self, storage: Storage, inbox: Inbox):
        self.storage, self.inbox = storage, inbox
        self.handlers: dict[str, Callable[[dict], dict]] = {}

    def run(self, kinds: Iterable[str], which: Callable[[dict], bool] = lambda row: True) -> None:
        """Run the pending commands of these kinds (those `which` takes), oldest first."""
        kinds = tuple(kinds)
        marks = ",".join("?" * len(kinds))
        for row in self.storage.rows(f"select * from commands where status = 'pending' and kind in ({marks}) "
                                     f"order by id", kinds):
            if which(row):
                self._one(row)

    def other_kinds(self) -> list[str]:
        """Pending kinds that are not control commands (unknown ones included, so that they get an answer)."""
        return [r["kind"] for r in self.storage.rows("select distinct kind from commands where status = 'pending'")
                if r["kind"] not in CONTROL]

    def _one(self, row: dict) -> None:
        handler = self.handlers.get(row["kind"])
        try:
            if handler is None:
                raise ValueError(f"unknown command {row['kind']!r}")
            result = {"ok": True, **(handler({**json.loads(row["args"]), "command_id": row["id"]}) or {})}
        except Conflict as e:
            result = {"ok": False, "conflict": True, "error": str(e)}
        except LookupError as e:
            result = {"ok": False, "missing": True, "error": str(e).strip("'\"")}
        except Exception as e:
            log.exception("command %s failed", row["kind"])
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        self.storage.write(lambda db: db.execute(
            "update commands set status = 'done', result = ?, done_at = ? where id = ?",
            (json.dumps(result, default=str), utcnow(), row["id"])))
        self.inbox.decided("commands", str(row["id"]))
