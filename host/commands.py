"""Commands from the web and Telegram (halt, exit-all, plugins, ticks, broker session), run where they belong.

The control commands (halt, exit-all) run on risk's thread, so a slow alert or plugin never delays them;
the others on the engine's. Each command's result is stored, and its waiter woken.
"""
from __future__ import annotations

import json
import logging
from typing import Callable, Iterable

from .inbox import Inbox
from .storage import Storage, utcnow

log = logging.getLogger(__name__)
CONTROL = ("halt", "exit_all")


class Conflict(Exception):
    """The command cannot be done as asked (answered 409, with why)."""


class Commands:
    """Runs pending commands of some kinds with their handlers."""

    def __init__(self, storage: Storage, inbox: Inbox):
        self.storage, self.inbox = storage, inbox
        self.handlers: dict[str, Callable[[dict], dict]] = {}

    def run(self, kinds: Iterable[str]) -> None:
        """Run the pending commands of these kinds, oldest first."""
        kinds = tuple(kinds)
        marks = ",".join("?" * len(kinds))
        for row in self.storage.rows(f"select * from commands where status = 'pending' and kind in ({marks}) "
                                     f"order by id", kinds):
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
            result = {"ok": True, **(handler(json.loads(row["args"])) or {})}
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
