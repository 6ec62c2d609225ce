"""Dashboard sessions (the cookie side), CSRF tokens, debug refusal and the security headers every answer carries."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from datetime import timedelta
from typing import Any, Optional
from urllib.parse import urlsplit

from flask import Flask, Response, current_app, g, request, session
from itsdangerous import BadSignature, URLSafeSerializer

from ..config import ConfigError, Settings
from ..models import Problem
from .sessions import SessionStore, fingerprint

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
LOOPBACK_NAMES = ("localhost",)
DEVICE_COOKIE, DEVICE_DAYS = "strategy_host_device", 365


def init_app(app: Flask, settings: Settings) -> None:
    """Signed session cookie, server-side sessions, lifetime, debug refusal and the security headers."""
    refuse_debug_off_loopback(app, settings)
    key = hmac.new(settings.API_TOKEN.encode(), b"dashboard-session:" + settings.DASHBOARD_PASSWORD.encode(),
                   hashlib.sha256).hexdigest()  # a new password or token ends every session
    app.config.update(SECRET_KEY=key, SESSION_COOKIE_NAME="strategy_host_session", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_SECURE=settings.DASHBOARD_COOKIE_SECURE,
                      PERMANENT_SESSION_LIFETIME=timedelta(hours=settings.DASHBOARD_SESSION_HOURS),
                      SESSION_REFRESH_EACH_REQUEST=False)
    form_action = "'self'"
    if not settings.paper:  # "Connect broker" posts to us, and we redirect to the broker's authorize page
        parts = urlsplit(settings.SHOONYA_OAUTH_URL)
        form_action += f" {parts.scheme}://{parts.netloc}"
    csp = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
           f"object-src 'none'; base-uri 'none'; form-action {form_action}; frame-ancestors 'none'")

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", csp)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        if request.endpoint != "static":
            response.headers["Cache-Control"] = "no-store"
        return response

    app.jinja_env.globals["csrf_token"] = csrf_token


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refuse_debug_off_loopback(app: Flask, settings: Settings) -> None:
    """Flask's debugger runs code for whoever reaches it: never on an address others can reach."""
    if not app.debug:
        return
    import os
    for name, host in (("HOST", settings.HOST), ("FLASK_RUN_HOST", os.environ.get("FLASK_RUN_HOST", ""))):
        if host and not is_loopback(host):
            raise ConfigError([Problem(name, "a loopback address (127.0.0.1, ::1 or localhost) while Flask debug "
                                             "is on; or turn FLASK_DEBUG off", host)])
    run = app.run

    def run_on_loopback_only(host: Optional[str] = None, *args: Any, **kwargs: Any) -> None:
        if host and not is_loopback(host):
            raise ConfigError([Problem("host", "a loopback address while Flask debug is on", host)])
        run(host, *args, **kwargs)
    app.run = run_on_loopback_only  # type: ignore[method-assign]


# ---- sessions: the signed cookie carries only the id of a row in dashboard_sessions ----
def _sessions() -> SessionStore:
    """The app's session store, made at its first use (create_app opens no database)."""
    store = current_app.extensions.get("sessions")
    if store is None:
        rt = current_app.extensions["host"]
        store = SessionStore(rt.storage, rt.settings.DASHBOARD_SESSION_HOURS * 3600.0, fingerprint(rt.settings))
        store.purge()  # sessions opened under an earlier DASHBOARD_PASSWORD (or API_TOKEN) are gone for good
        current_app.extensions["sessions"] = store
    return store


def logged_in() -> bool:
    """The cookie names a session that still exists server-side (once per request)."""
    if "logged_in" not in g:
        store, sid = _sessions(), session.get("sid")
        g.logged_in = isinstance(sid, str) and store.valid(sid)
    return g.logged_in


def start_session(address: str) -> None:
    """A new session: any earlier id in this browser is forgotten (no fixation)."""
    old = session.get("sid")
    if isinstance(old, str):
        _sessions().end(old)
    session.clear()
    session.permanent = True
    session["sid"] = _sessions().open(address)
    g.logged_in = True


def end_session() -> None:
    """Logout: the row goes, so a copy of the cookie is worthless from now on."""
    sid = session.get("sid")
    if isinstance(sid, str):
        _sessions().end(sid)
    session.clear()
    g.logged_in = False


def end_every_session(address: str) -> int:
    """Log out everywhere: every session's row goes, this one's too."""
    n = _sessions().end_all(address)
    session.clear()
    g.logged_in = False
    return n


def known_device() -> Optional[str]:
    """This browser's id when it logged in here before (a cookie signed under the current password), else None."""
    raw = request.cookies.get(DEVICE_COOKIE)
    try:
        device = _device_signer().loads(raw) if raw else None
    except BadSignature:
        return None
    return device if isinstance(device, str) else None


def remember_device(response: Response) -> Response:
    """Mark this browser as one the owner logged in from: its logins are slowed only by its own failures."""
    response.set_cookie(DEVICE_COOKIE, _device_signer().dumps(known_device() or secrets.token_urlsafe(16)),
                        max_age=DEVICE_DAYS * 86400, path="/login", httponly=True, samesite="Lax",
                        secure=current_app.config["SESSION_COOKIE_SECURE"])
    return response


def _device_signer() -> URLSafeSerializer:
    return URLSafeSerializer(current_app.secret_key, salt="known-browser")


def csrf_token() -> str:
    """Bound to the session id once logged in (derived, so the cookie carries nothing else); before, random."""
    sid = session.get("sid")
    if isinstance(sid, str):
        return hmac.new(current_app.secret_key.encode(), b"csrf:" + sid.encode(), hashlib.sha256).hexdigest()
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def csrf_problem() -> Optional[str]:
    """Why this state-changing request is not from our own page, or None when it is."""
    origin = request.headers.get("Origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.host:
        return f"cross-site request refused: expected Origin {request.host_url.rstrip('/')}, found {origin}"
    given = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD) or ""
    expected = csrf_token()
    if not given or not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        return (f"CSRF token missing or wrong: expected the page's token in the {CSRF_FIELD!r} field or the "
                f"{CSRF_HEADER} header; reload the page and try again")
    return None


# ---- how fast one session may refresh panels ----
class RefreshLimiter:
    """A token bucket per session: an open page needs ~3 panels a second; a runaway client is slowed
    with 429 so that it cannot crowd out the engine (they share the process)."""

    def __init__(self, rate_per_s: float = 20.0, burst: float = 40.0):
        self.rate, self.burst = rate_per_s, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if len(self._buckets) > 1000:  # old sessions: forget them
                self._buckets.clear()
            self._buckets[key] = (tokens - 1, now) if tokens >= 1 else (tokens, now)
            return tokens >= 1


def password_ok(given: str, expected: str) -> bool:
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())


def mask(secret: Optional[str]) -> str:
    """A secret as the user may see it: whether it is set, and nothing of it."""
    return "•" * 8 + " (set)" if secret else "not set"
