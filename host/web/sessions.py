"""Dashboard sessions kept server-side: the signed cookie carries only a random id, SQLite the rest."""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import sqlite_utils

from ..config import Settings
from ..storage import Storage


def iso(epoch_s: float) -> str:
    """An epoch time as the database's ISO-8601 UTC text (milliseconds; sorts in time order)."""
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="milliseconds")


def fingerprint(settings: Settings) -> str:
    """What a session was opened under: a new DASHBOARD_PASSWORD (or API_TOKEN) gives another value."""
    return hmac.new(settings.API_TOKEN.encode(), b"dashboard-password:" + settings.DASHBOARD_PASSWORD.encode(),
                    hashlib.sha256).hexdigest()[:32]


def _row_id(token: str) -> str:
    """The stored id: a hash, so that reading the database yields no session to present."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class SessionStore:
    """Open, check and end dashboard sessions; every gunicorn worker sees the same rows."""

    storage: Storage
    lifetime_s: float
    fingerprint: str

    def open(self, address: str) -> str:
        """A new session from `address`; the token goes into the signed cookie, only its hash is stored."""
        token, now = secrets.token_urlsafe(32), time.time()
        self.storage.write(lambda db: (self._forget_ended(db, now), Storage.insert(db, "dashboard_sessions", {
            "id": _row_id(token), "created_at": iso(now), "expires_at": iso(now + self.lifetime_s),
            "address": address, "fingerprint": self.fingerprint})))
        return token

    def valid(self, token: str) -> bool:
        """The session exists, was opened under the current password, and within the current lifetime."""
        now = time.time()
        return self.storage.one("select 1 from dashboard_sessions where id = ? and fingerprint = ? and expires_at > ? "
                                "and created_at > ?", (_row_id(token), self.fingerprint, iso(now),
                                                       iso(now - self.lifetime_s))) is not None

    def end(self, token: str) -> None:
        self.storage.write(lambda db: db.execute("delete from dashboard_sessions where id = ?", (_row_id(token),)))

    def end_all(self, address: str) -> int:
        """Log out everywhere: every session ends; the number ended."""
        def run(db: sqlite_utils.Database) -> int:
            n = db.execute("delete from dashboard_sessions").rowcount
            Storage.add_event(db, "logout_all", f"every dashboard session ended ({n}) from {address}", "warning",
                              data={"address": address, "sessions": n})
            return n
        return self.storage.write(run)

    def purge(self) -> int:
        """Forget expired sessions and those opened under another password; the number removed."""
        return self.storage.write(lambda db: self._forget_ended(db, time.time()))

    def _forget_ended(self, db: sqlite_utils.Database, now: float) -> int:
        return db.execute("delete from dashboard_sessions where expires_at <= ? or created_at <= ? or fingerprint != ?",
                          (iso(now), iso(now - self.lifetime_s), self.fingerprint)).rowcount
