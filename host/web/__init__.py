"""Flask application factory; the web layer is a thin client of the engine. Nothing starts here."""
from __future__ import annotations

import logging
import os
from typing import Optional

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ..config import Settings, load
from ..runtime import Runtime

MAX_BODY = 64 * 1024
log = logging.getLogger(__name__)


def create_app(settings: Optional[Settings] = None, runtime: Optional[Runtime] = None) -> Flask:
    """Build the app; the engine is started by the server hooks (or a test), not by this call."""
    if runtime is None:
        settings = settings or load(os.environ.get("STRATEGY_HOST_ENV") or None)
        runtime = Runtime(settings)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.json.sort_keys = False
    app.extensions["host"] = runtime

    from . import api, broker, dashboard, format, security, telegram_webhook, webhook
    security.init_app(app, runtime.settings)
    format.init_app(app)
    app.register_blueprint(webhook.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(broker.bp)
    app.register_blueprint(telegram_webhook.bp)
    dashboard.init_app(app)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(e: RequestEntityTooLarge):
        return jsonify({"status": "error", "error": f"body too large: expected at most {MAX_BODY} bytes",
                        "code": 413}), 413

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return jsonify({"status": "error", "error": e.description, "code": e.code}), e.code

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        log.exception("unhandled error")
        return jsonify({"status": "error", "error": "internal error; see the host log", "code": 500}), 500

    return app
