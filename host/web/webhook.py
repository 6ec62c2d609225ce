"""POST /webhook: authenticate, parse, store, then answer with the engine's decision."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from decimal import Decimal
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from ..models import AlertStatus
from ..inbox import AlertRecord, body_hash
from ..validation import lower_keys, parse_alert
from ..views import engine_alive, order_record

bp = Blueprint("webhook", __name__)
DECISION_WAIT_S = 2.0
STATUS_CODE = {AlertStatus.ACCEPTED.value: 200, AlertStatus.DUPLICATE.value: 200, AlertStatus.BLOCKED.value: 409,
               AlertStatus.REFUSED.value: 423, AlertStatus.REJECTED.value: 422, AlertStatus.FAILED.value: 503,
               AlertStatus.RECEIVED.value: 202}


def _reply(status: str, code: int, **fields: Any) -> tuple[Response, int]:
    return jsonify({"status": status, **fields}), code


def client_ip(trust_proxy: bool) -> str:
    """The real peer; X-Forwarded-For only when our own proxy sets it (its last entry)."""
    if trust_proxy and request.headers.get("X-Forwarded-For"):
        return request.headers["X-Forwarded-For"].split(",")[-1].strip()
    return request.remote_addr or ""


def _ip_allowed(ip: str, allowed: tuple) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in allowed)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _signature_ok(raw: bytes, secret: str, header: str) -> bool:
    given = header.strip()
    if given.lower().startswith("sha256="):
        given = given[7:]
    expected = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given.lower())


@bp.post("/webhook")
def webhook():
    rt = current_app.extensions["host"]
    s = rt.settings
    ip = client_ip(s.TRUST_PROXY_HEADERS)
    if s.WEBHOOK_ALLOWED_IPS and not _ip_allowed(ip, s.WEBHOOK_ALLOWED_IPS):
        return _reply("forbidden", 403, error=f"caller {ip} is not in WEBHOOK_ALLOWED_IPS")
    raw = request.get_data(cache=False)
    if not raw.strip():
        return _reply("bad_request", 400, error="empty body: expected a JSON object")
    try:
        parsed = json.loads(raw, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        return _reply("bad_request", 400, error=f"body is not valid JSON: {str(e)[:120]}")
    if not isinstance(parsed, dict):
        return _reply("bad_request", 400, error=f"expected a JSON object, found a JSON {type(parsed).__name__}")
    body = lower_keys(parsed)
    signature = request.headers.get("X-Signature")
    if signature is not None or s.WEBHOOK_REQUIRE_SIGNATURE:
        if not signature or not _signature_ok(raw, s.WEBHOOK_SECRET, signature):
            return _reply("unauthorized", 401, error="X-Signature is missing or does not match the body "
                                                     "(expected hex HMAC-SHA256 of the raw body with WEBHOOK_SECRET)")
    given = body.pop("secret_key", None)
    if not isinstance(given, str) or not hmac.compare_digest(given.encode(), s.WEBHOOK_SECRET.encode()):
        return _reply("unauthorized", 401, error="secret_key is missing or wrong")
    req, problems = parse_alert(body)
    if problems:
        aid = rt.inbox.store_rejected(body, problems, ip)
        return _reply("rejected", 422, alert_id=aid, errors=[p.as_dict() for p in problems])
    record = rt.inbox.store(req, body_hash(body), ip)
    if record.status == AlertStatus.DUPLICATE.value:
        return _answer(rt, record)
    if not engine_alive(rt.storage, rt.engine_running):
        record = rt.inbox.wait_alert(record.id, 0)
        return _answer(rt, record, note="the engine is not running: the alert is stored and will run when it "
                                        "starts, unless it is older than ALERT_MAX_AGE_S by then")
    return _answer(rt, rt.inbox.wait_alert(record.id, DECISION_WAIT_S))


def _answer(rt: Any, record: AlertRecord, note: str = "") -> tuple[Response, int]:
    orders = []
    if record.orders:
        marks = ",".join("?" * len(record.orders))
        orders = [order_record(r) for r in rt.storage.rows(f"select * from orders where id in ({marks})", record.orders)]
    fields: dict[str, Any] = {"alert_id": record.id, "reason": record.reason, "orders": orders}
    if record.duplicate_of:
        fields["duplicate_of"] = record.duplicate_of
    if record.status == AlertStatus.RECEIVED.value:
        fields["reason"] = note or "queued: the engine has not decided yet; see /api/alerts"
        return _reply("queued", 202, **fields)
    return _reply(record.status, STATUS_CODE[record.status], **fields)
