"""Control commands from the web (API or dashboard) to the engine, through the inbox's commands table."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flask import current_app

from .. import views

COMMAND_WAIT_S = 5.0


@dataclass(frozen=True)
class Outcome:
    """What became of a command: an HTTP code, and the engine's result or the error."""

    code: int
    error: str = ""
    result: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.code == 200


def send(kind: str, args: Any) -> Outcome:
    """Hand a command to the engine and wait for its result; the engine does the work, on its thread."""
    rt = current_app.extensions["host"]
    if not views.engine_alive(rt.storage, rt.engine_running):
        return Outcome(503, "the engine is not running; the command was not sent")
    result = rt.inbox.command(kind, args, COMMAND_WAIT_S)
    if result is None:
        return Outcome(504, f"the engine did not finish {kind} within {COMMAND_WAIT_S:g} s; see /api/events")
    if not result.pop("ok"):
        code = 409 if result.get("conflict") else 404 if result.get("missing") else 500
        return Outcome(code, result.get("error", "command failed"))
    return Outcome(200, result=result)
