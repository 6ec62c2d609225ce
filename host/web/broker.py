"""The daily broker login: /broker/login -> the broker's authorize page -> /broker/callback?code=."""
from __future__ import annotations

import time

from flask import Blueprint, current_app, jsonify, redirect, request

from ..broker_session import save_token, session_state

bp = Blueprint("broker", __name__)
LOGIN_WINDOW_S = 600


@bp.get("/broker/login")
def login():
    rt = current_app.extensions["host"]
    s = rt.settings
    if s.paper or s.SHOONYA_AUTH != "oauth":
        return jsonify({"status": "error", "error": "the broker login is for BROKER=shoonya with SHOONYA_AUTH=oauth"}), 404
    rt.storage.write(lambda db: rt.storage.put_state(db, "broker_login_started", str(time.time())))
    return redirect(f"{s.SHOONYA_OAUTH_URL}?client_id={s.OAUTH_CLIENT_ID}")


@bp.get("/broker/callback")
def callback():
    """Exchange the code for an access token, save it (0600), and hand it to the engine."""
    rt = current_app.extensions["host"]
    s = rt.settings
    started = rt.storage.get_state("broker_login_started")
    if not started or time.time() - float(started) > LOGIN_WINDOW_S:
        return jsonify({"status": "error", "error": "no login in progress: start at /broker/login"}), 400
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
    rt.storage.write(lambda db: db.execute("delete from state where key = 'broker_login_started'"))
    from ..views import engine_alive
    result = rt.inbox.command("broker_session", {}, 10.0) if engine_alive(rt.storage, rt.engine_running) else None
    return jsonify({"status": "ok", "broker_session": session_state(rt.storage)["state"],
                    "engine": "updated" if result and result.get("ok") else "will load the token at its next start"})
