"""The live broker session: the saved OAuth token (mode 0600) and the session state everyone can read."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from .storage import Storage, utcnow

STATE_KEY = "broker_session"
TOKEN_FILE = "shoonya_token.json"
EXPIRED = "broker session expired — log in at /broker/login"
log = logging.getLogger(__name__)


def save_token(data_dir: Path, token: str, uid: str, actid: str) -> Path:
    """Write the access token with mode 0600 (atomically: temp file, then rename)."""
    path = Path(data_dir) / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"access_token": token, "uid": uid, "actid": actid, "saved_at": utcnow()}, f)
    os.replace(tmp, path)
    return path


def load_token(data_dir: Path) -> Optional[dict]:
    path = Path(data_dir) / TOKEN_FILE
    try:
        data = json.loads(path.read_text())
        return data if data.get("access_token") and data.get("uid") else None
    except (OSError, ValueError):
        return None


def session_state(storage: Storage) -> dict:
    raw = storage.get_state(STATE_KEY)
    return json.loads(raw) if raw else {"state": "unknown", "why": None, "at": None}


def set_session_state(storage: Storage, state: str, why: str) -> None:
    """Record the session state; an event and a log line only when it changes (said once, not at every call)."""
    if session_state(storage).get("state") == state:
        return
    message = {"expired": EXPIRED, "valid": "broker session is valid"}.get(state, f"broker session {state}")
    (log.warning if state == "expired" else log.info)("%s (%s)", message, why)

    def run(db: object) -> None:
        Storage.put_state(db, STATE_KEY, json.dumps({"state": state, "why": why, "at": utcnow()}))
        Storage.add_event(db, f"broker_session_{state}", f"{message} ({why})",
                          "error" if state == "expired" else "info", data={"login": "/broker/login"})
    storage.write(run)
