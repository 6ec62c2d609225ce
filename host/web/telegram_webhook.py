"""Telegram's webhook (TELEGRAM_MODE=webhook): verify the secret header, store the update once."""
from __future__ import annotations

import hmac
import json

from flask import Blueprint, current_app, jsonify, request

from ..storage import utcnow
from ..validation import shown

bp = Blueprint("telegram_webhook", __name__)
HEADER = "X-Telegram-Bot-Api-Secret-Token"


@bp.post("/telegram/webhook")
def receive():
    """Any worker may take it: the update goes to the database, where the notifier picks it up."""
    rt = current_app.extensions["host"]
    s = rt.settings
    if s.TELEGRAM_MODE != "webhook":
        return jsonify({"status": "error", "error": "the Telegram webhook is off: TELEGRAM_MODE is polling"}), 404
    given = request.headers.get(HEADER, "")
    if not given or not hmac.compare_digest(given.encode(), s.TELEGRAM_WEBHOOK_SECRET.encode()):
        return jsonify({"status": "error", "error": f"{HEADER}: missing or wrong"}), 401
    update = request.get_json(silent=True)
    update_id = update.get("update_id") if isinstance(update, dict) else None
    if not isinstance(update_id, int) or isinstance(update_id, bool):
        return jsonify({"status": "error", "error": "invalid update", "errors": [
            {"field": "update_id", "expected": "a whole number", "found": shown(update_id)}]}), 400
    rt.storage.write(lambda db: db.execute(
        "insert or ignore into notifier_inbox (notifier, key, body, received_at) values (?, ?, ?, ?)",
        ("telegram", str(update_id), json.dumps(update), utcnow())), durable=True)  # Telegram resends: kept once
    return jsonify({"status": "ok"})
