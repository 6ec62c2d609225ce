"""POST /webhook: authenticate, parse, store, then answer with the engine's decision."""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
from decimal import Decimal
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from ..models import AlertStatus, ExecutionType
from ..inbox import AlertRecord, body_hash
from ..group_sync import NotDurable
from ..storage import StorageFull
from ..validation import client_alert_key, parse_alert, unencodable, unique_keys
from ..views import engine_alive, order_record
from .client_address import client_ip, in_networks, parse_address, unbelieved_forwarding

log = logging.getLogger(__name__)
bp = Blueprint("webhook", __name__)
DECISION_WAIT_S = 2.0
STATUS_CODE = {AlertStatus.ACCEPTED.value: 200, AlertStatus.DUPLICATE.value: 200, AlertStatus.BLOCKED.value: 409,
               AlertStatus.REFUSED.value: 423, AlertStatus.REJECTED.value: 422, AlertStatus.FAILED.value: 503,
               AlertStatus.RECEIVED.value: 202}


def _reply(status: str, code: int, **fields: Any) -> tuple[Response, int]:
    if code >= 400 and "error" in fields:  # a client's bad input: one line, never a traceback
        log.info("webhook %s from %s: %s", code, client_ip(), fields["error"])
    return jsonify({"status": status, **fields}), code


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _signature_ok(raw: bytes, secret: str, header: str) -> bool:
    given = header.strip()
    if given[:7].lower() == "sha256=":
        given = given[7:]
    if not given.isascii():
        return False
    expected = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), given.lower().encode())


def _secret_ok(given: Any, secret: str) -> bool:
    """Constant-time comparison that no text can make raise (lone surrogates, other scripts)."""
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), secret.encode())


def _json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's own words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a boolean)"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "a number"


def _decode(raw: bytes) -> tuple[Any, str]:
    """The body as a JSON value, or None and the reason it is not one (UTF-8 only)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"body is not valid UTF-8 text (byte {e.start}): expected a JSON object"
    text = text[1:] if text.startswith("\ufeff") else text  # a byte-order mark some editors write first
    if not text.strip():
        return None, "empty body: expected a JSON object"
    try:
        return json.loads(text, parse_float=Decimal, parse_constant=_reject_constant, object_pairs_hook=unique_keys), ""
    except (ValueError, RecursionError) as e:
        kind = request.mimetype or "no content type"
        why = "a number with more than 4300 digits" if "digits" in str(e) else str(e)[:120]
        return None, f"body is not valid JSON ({kind}): {why}; expected a JSON object such as " \
                     "{\"secret_key\": ..., \"execution_type\": ..., \"legs\": [...]}"


@bp.errorhandler(StorageFull)
def storage_full(e: StorageFull) -> tuple[Response, int]:
    """A full disk: nothing was stored (the transaction rolled back); 507, never a generic 500."""
    log.error("webhook from %s not stored: %s", client_ip(), e)
    return jsonify({"status": "not_stored", "error": str(e)}), 507


@bp.errorhandler(NotDurable)
def not_durable(e: NotDurable) -> tuple[Response, int]:
    """The disk did not confirm the write: never answer accepted for what a power cut could lose."""
    log.critical("webhook from %s not confirmed on disk: %s", client_ip(), e)
    return jsonify({"status": "not_stored", "error": f"{e}: the alert may not have been kept; check the host's disk "
                                                     f"and /api/alerts before sending it again"}), 503


@bp.post("/webhook")
def webhook():
    rt = current_app.extensions["host"]
    s = rt.settings
    ip = client_ip()
    if s.WEBHOOK_ALLOWED_IPS and not in_networks(parse_address(ip), s.WEBHOOK_ALLOWED_IPS):
        return _reply("forbidden", 403, error=f"caller {ip} is not in WEBHOOK_ALLOWED_IPS{unbelieved_forwarding()}")
    raw = request.get_data(cache=False)
    parsed, why = _decode(raw)
    if why:
        return _reply("bad_request", 400, error=why)
    if not isinstance(parsed, dict):
        return _reply("bad_request", 400, error=f"expected a JSON object, found {_json_kind(parsed)}")
    body = parsed  # keys lower-cased, each once (unique_keys)
    signature = request.headers.get("X-Signature")
    if signature is not None or s.WEBHOOK_REQUIRE_SIGNATURE:
        if not signature or not _signature_ok(raw, s.WEBHOOK_SECRET, signature):
            return _reply("unauthorized", 401, error="X-Signature is missing or does not match the body "
                                                     "(expected hex HMAC-SHA256 of the raw body with WEBHOOK_SECRET)")
    given = body.pop("secret_key", None)
    if not _secret_ok(given, s.WEBHOOK_SECRET):
        return _reply("unauthorized", 401, error="secret_key is missing or wrong")
    body = _without_secret(body, s.WEBHOOK_SECRET)  # pasted into another field: never echoed, stored or notified
    bad_text = unencodable(body)
    if bad_text:
        return _reply("bad_request", 400, error=f"{bad_text}: expected Unicode text, found a lone surrogate "
                                                "(\\ud800-\\udfff escape without its pair)")
    req, problems = parse_alert(body)
    if problems:
        aid = rt.inbox.store_rejected(body, problems, ip)
        return _reply("rejected", 422, alert_id=aid, client_alert_id=client_alert_key(body.get("alert_id")),
                      errors=[p.as_dict() for p in problems])
    if rt.storage.low_space and req.execution_type is not ExecutionType.EXIT:
        return _reply("not_stored", 507, error=f"the disk holding {rt.storage.path.parent} is nearly full (the "
                                               f"reserve kept for risk and exits is in use): only EXIT alerts are "
                                               f"taken until space is freed")
    record = rt.inbox.store(req, body_hash(body), ip)
    if record.status == AlertStatus.DUPLICATE.value:
        return _answer(rt, record)
    if not engine_alive(rt.storage, rt.engine_running):
        record = rt.inbox.wait_alert(record.id, 0)
        return _answer(rt, record, note="the engine is not running: the alert is stored and will run when it "
                                        "starts, unless it is older than ALERT_MAX_AGE_S by then")
    return _answer(rt, rt.inbox.wait_alert(record.id, DECISION_WAIT_S))


SECRET_SHOWN = "[WEBHOOK_SECRET]"
SECRET_IN_TEXT_LEN = 16  # a secret this long is random enough to be found inside other text; a shorter one whole


def _without_secret(value: Any, secret: str) -> Any:
    """The body with the webhook secret replaced wherever else it was written (a field's text, a key): inside any
    text when it is long, else where it is the whole text (`ema_trend` must not rewrite strategy `ema_trend_pos`)."""
    if isinstance(value, str):
        if not secret or secret not in value:
            return value
        return value.replace(secret, SECRET_SHOWN) if len(secret) >= SECRET_IN_TEXT_LEN or value == secret else value
    if isinstance(value, dict):
        return {_without_secret(k, secret): _without_secret(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_secret(v, secret) for v in value]
    return value


def _answer(rt: Any, record: AlertRecord, note: str = "") -> tuple[Response, int]:
    orders = []
    if record.orders:
        marks = ",".join("?" * len(record.orders))
        rows = {r["id"]: r for r in rt.storage.rows(f"select * from orders where id in ({marks})", record.orders)}
        orders = [order_record(rows[oid]) for oid in record.orders if oid in rows]  # in the order of the legs
    fields: dict[str, Any] = {"alert_id": record.id, "client_alert_id": record.client_alert_id,
                              "reason": record.reason, "orders": orders}
    if record.notes:
        fields["notes"] = list(record.notes)
    if record.duplicate_of:
        fields["duplicate_of"] = record.duplicate_of
    if record.status == AlertStatus.RECEIVED.value:
        fields["reason"] = note or "queued: the engine has not decided yet; see /api/alerts"
        return _reply("queued", 202, **fields)
    return _reply(record.status, STATUS_CODE[record.status], **fields)
