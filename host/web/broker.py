"""The daily broker login: /broker/login -> the broker's authorize page -> /broker/callback?code=."""
from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import time
from typing import Optional
from urllib.parse import urlencode, urlsplit

from flask import Blueprint, current_app, flash, jsonify, redirect, request, url_for

from ..broker_session import save_token, session_state
from . import security

bp = Blueprint("broker", __name__)
LOGIN_WINDOW_S = 600
COOKIE = "broker_login"
STATE_KEY = "broker_login_started"


def _authorized(token: str) -> bool:
    header = request.headers.get("Authorization", "")
    given = header[7:].strip() if header.startswith("Bearer ") else request.args.get("token", "")
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


@bp.route("/broker/login", methods=["GET", "POST"])
def login():
    """Start the broker login: the dashboard's button (a session and its CSRF token), or the API token."""
    rt = current_app.extensions["host"]
    s = rt.settings
    if s.paper or s.SHOONYA_AUTH != "oauth":
        return jsonify({"status": "error", "error": "the broker login is for BROKER=shoonya with SHOONYA_AUTH=oauth"}), 404
    if request.method == "POST":
        problem = "log in to the dashboard first" if not security.logged_in() else security.csrf_problem()
        if problem:
            return jsonify({"status": "error", "error": problem}), 403
    elif not _authorized(s.API_TOKEN):
        if security.logged_in():  # a bare link (from a notification): the button is on the broker page
            return redirect(url_for("dashboard.broker"))
        return jsonify({"status": "error", "error": "log in to the dashboard and use Connect broker on /broker, or "
                                                    "open /broker/login?token=<API_TOKEN>: only you may connect "
                                                    "the broker"}), 401
    nonce = secrets.token_urlsafe(24)
    started = json.dumps({"nonce": nonce, "at": time.time()})
    rt.storage.write(lambda db: rt.storage.put_state(db, STATE_KEY, started))
    response = redirect(authorize_url(s.SHOONYA_OAUTH_URL, s.OAUTH_CLIENT_ID, url_for("broker.callback",
                                                                                     _external=True)))
    # the callback is accepted only in the browser that started the login
    response.set_cookie(COOKIE, nonce, max_age=LOGIN_WINDOW_S, httponly=True, samesite="Lax",
                        secure=s.DASHBOARD_COOKIE_SECURE, path="/broker")
    return response


@bp.get("/broker/callback")
def callback():
    """Exchange the code for an access token, save it (0600), and hand it to the engine."""
    rt = current_app.extensions["host"]
    s = rt.settings
    try:
        started = json.loads(rt.storage.get_state(STATE_KEY) or "{}")
    except ValueError:
        started = {}
    cookie = request.cookies.get(COOKIE, "")
    if (not started or time.time() - started.get("at", 0) > LOGIN_WINDOW_S or not cookie
            or not hmac.compare_digest(cookie.encode(), str(started.get("nonce", "")).encode())):
        return jsonify({"status": "error", "error": "no login in progress in this browser: start at /broker/login"}), 400
    rt.storage.write(lambda db: db.execute("delete from state where key = ?", (STATE_KEY,)))  # one use
    code = request.args.get("code", "")
    if not code:
        return jsonify({"status": "error", "error": "code: expected the code the broker sent back, found nothing"}), 400
    from ..brokers.shoonya import install_requests
    from NorenRestApiPy.NorenApi import NorenApi
    install_requests(10.0)
    try:
        got = NorenApi(host=s.SHOONYA_API_URL, websocket=s.SHOONYA_WS_URL).getAccessToken(
            code, s.OAUTH_SECRET, s.OAUTH_CLIENT_ID, s.USER_ID)
    except Exception as e:  # unreachable broker, odd reply
        return jsonify({"status": "error", "error": f"the broker did not exchange the code: {type(e).__name__}"}), 502
    if not got:
        return jsonify({"status": "error", "error": "the broker refused the code (expired or already used?); "
                                                    "start again at /broker/login"}), 502
    token, uid, _refresh, actid = got
    save_token(s.data_dir, token, uid, actid)
    from ..views import engine_alive
    result = rt.inbox.command("broker_session", {}, 10.0) if engine_alive(rt.storage, rt.engine_running) else None
    body = {"status": "ok", "broker_session": session_state(rt.storage)["state"],
            "engine": "updated" if result and result.get("ok") else "will load the token at its next start"}
    if security.logged_in():  # back to the dashboard's broker page
        flash(f"Broker connected: session {body['broker_session']}; the engine {body['engine']}.", "ok")
        return redirect(url_for("dashboard.broker"))
    return jsonify(body)


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def authorize_url(oauth_url: str, client_id: str, callback: str) -> str:
    """The broker's authorize page. An authorize page on loopback is the simulator (`strategy-host sim`): it is
    told to come back to this host, whatever its port. The real broker is never told: it sends the browser to
    the redirect URL registered with it."""
    query = {"client_id": client_id, **({"redirect_uri": callback} if _loopback(oauth_url) else {})}
    return f"{oauth_url}{'&' if '?' in oauth_url else '?'}{urlencode(query)}"


def redirect_problem(oauth_url: str, here: str) -> Optional[str]:
    """Why a Connect broker click from the page at `here` cannot come back, or None."""
    if _loopback(oauth_url) and not _loopback(here):
        return (f"The broker's authorize page {oauth_url} is on this server's loopback address: your browser, "
                f"on another machine, cannot open it. Open the dashboard on the server itself (or through an SSH "
                f"tunnel to 127.0.0.1), or point SHOONYA_OAUTH_URL at an address the browser can reach.")
    return None


def redirect_hint(oauth_url: str, here: str, public_url: str = "") -> str:
    """Where the login comes back to, as the broker page says it."""
    if _loopback(oauth_url):
        return f"The simulator sends you back to {here.rstrip('/')}/broker/callback."
    callback = (public_url or here).rstrip("/") + "/broker/callback"
    return (f"Shoonya sends you back to the redirect URL registered for your API key: register {callback}, and "
            f"connect from the dashboard at that address (the login is accepted only in the browser, and at the "
            f"address, that started it).")
